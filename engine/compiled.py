"""Compiled passes: a target whose key/value cache is preallocated for the planned context and whose
passes run compiled, with only the hidden states of the drafter's feature layers leaving the graph.

A pass writes its keys and values in place at its positions and attends, through a causal mask, to the
cache up to a bucketed length: rolling the cache back is a length change. The pass width (1 + drafts
for a verify pass) and the attended length are symbolic, so one compilation serves every width and
length. A one-token step (plain decoding) runs as two tokens, the second a padding token: torch would
otherwise specialise width 1 into a second graph, doubling the compile time, and a product over two
rows costs what one over one row does (cpu_linear.py runs one row as two for the same reason). The
padding's key and value land past the committed length, hidden from every real token by the causal
mask and overwritten by the next pass. Padding every pass to a few captured widths would save nothing:
on a CPU the symbolic graph runs each width exactly, and on CUDA each (width, length) pair is recorded
once as a CUDA graph, cheap next to compiling. Attended lengths are multiples of 64 on a CPU and two
sizes per doubling on CUDA, where each one is a recording of its own.

On CUDA the passes run as CUDA graphs through torch.compile(mode="reduce-overhead") rather than an
explicit torch.cuda.CUDAGraph capture: its graph trees record a graph per shape, share one memory pool
between them and keep the cache buffers in place (marked static), which explicit captures would have to
reimplement for every width and length. On a CPU, inductor fuses the elementwise work between the
products and drops Python's dispatch of every operation, while the products themselves run over packed
copies of the weights that engine/cpu_linear.py makes and calls (an opaque operation in the graph).
Inductor's own packing of the weights ("freezing") is left off: it makes inductor bypass its on-disk
caches, and every start would compile for a minute again rather than once per machine.

The forward is our own, for the families whose layers it reproduces (Llama and SmolLM2, Qwen2, Qwen3);
a test holds its logits to transformers'. Other targets stay eager, with the reason (`refusal`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from . import cpu_linear
from .scheduler import device_identity
from .target import Target, TokenLog, device_ids

FAMILIES = ("llama", "qwen2", "qwen3")  # decoder layers: norm, attention (q/k norm for Qwen3), norm, gated MLP
CPU_KEY_STEP = 64  # on a CPU attention reads the cache up to the next multiple of this
# Seconds per layer of a first compilation where this machine has compiled nothing yet (CPU, CUDA):
# SmolLM2's 30 layers took 62 s on the 2-core CPU (CUDA: a guess, untried).
FIRST_COMPILE_GUESS = (2.1, 1.0)
# Where `--compile auto` compiles. CUDA: graphs remove the launch overhead that dominates a pass there
# (to confirm with bench/gpu_check.py). The CPU only where the bench measured that it pays.
COMPILE_BY_DEFAULT = ("cuda",)


def refusal(model) -> str | None:
    """Why this model's passes are not compiled here, or None when they can be."""
    config = model.config.get_text_config()
    kind = config.model_type
    if kind.startswith("gemma"):
        return (f"{kind} (Gemma) layers have sliding windows, scaled embeddings, sandwich norms and soft-capped "
                "logits that the compiled forward does not reproduce")
    if kind not in FAMILIES:
        return f"the compiled forward reproduces {', '.join(FAMILIES)} layers, not {kind}"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "it has sliding-window or recurrent layers; the compiled forward has full attention only"
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1 or any(d.type == "meta" for d in devices) or any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "its layers are split over devices by accelerate, whose hooks move tensors inside every pass"
    if getattr(model, "hf_quantizer", None) is not None or getattr(config, "quantization_config", None):
        return "its weights are quantised by bitsandbytes, whose kernels torch.compile does not trace"
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope in ("dynamic", "longrope"):
        return f"its {rope} RoPE changes with the sequence length"
    return None


def wants_compile(choice: str, device: torch.device) -> bool:
    """`--compile on|off|auto`: auto compiles on the devices in COMPILE_BY_DEFAULT."""
    if choice not in ("on", "off", "auto"):
        raise ValueError(f"compile must be on, off or auto, got {choice!r}")
    return choice == "on" or (choice == "auto" and device.type in COMPILE_BY_DEFAULT)


def verify_width(drafter) -> int:
    """The widest pass a drafter's rounds run: its block and the anchor."""
    return drafter.block_size + 1 if drafter is not None else 1


def key_length(tokens: int, device: torch.device) -> int:
    """How far attention reads the cache for a pass that ends at `tokens` positions. On CUDA each length
    is a CUDA graph of its own, so lengths come in two sizes per doubling (at most 1.5x what is needed)."""
    if device.type != "cuda":
        return -(-max(tokens, 1) // CPU_KEY_STEP) * CPU_KEY_STEP
    size = 256
    while size < tokens:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


class CompiledTarget(Target):
    """The Target interface over a preallocated cache, with compiled passes up to `max_width` tokens.
    Longer passes (a prefill) and passes that want the last row's logits only run the same forward
    eagerly. `feature_layers` are the layers whose hidden states every pass produces (the drafters')."""

    def __init__(self, model, tokenizer, name: str, cpu_linear: dict | None = None, max_width: int = 1,
                 feature_layers: tuple[int, ...] = (), max_length: int | None = None):
        problem = refusal(model)
        if problem:
            raise ValueError(f"{name}: not compiled: {problem}")
        config = model.config.get_text_config()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.max_width = max(2, max_width)  # a one-token pass runs as two
        self.built_layers = tuple(sorted(set(feature_layers)))
        self.buffers: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.compiled = None
        self.warmed = False  # compile() ran its passes: from then on a failing pass falls back to eager
        self.packed = False  # whether the graph's products run over packed copies of every weight (CPU)
        self.hybrid = None  # refusal() keeps targets with recurrent states eager: every compiled cache rolls back exactly
        super().__init__(model, tokenizer, name, cpu_linear)
        if max_length:
            self.max_length = min(self.max_length, max_length)

    @property
    def attention(self) -> str:
        """Part of the SPS profile's key: compiled passes cost otherwise than eager ones, and than the compiled
        passes of versions that froze the weights into the graph, whose cached profiles are not read."""
        return f"compiled, {'packed' if self.packed else 'routed'} products"

    def compile(self) -> None:
        """Compile, and run a pass of each graph's width once (the slow part of a first start; inductor keeps
        the result on disk). Raises what compiling raises: the caller decides to stay eager."""
        import torch._dynamo
        import torch._inductor.config

        # Frozen weights would bypass inductor's FX graph and AOTAutograd caches (see the module's docstring).
        torch._inductor.config.freezing = False
        # CUDA graph trees record a graph per width and attended length, each a "recompile" to dynamo.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.packed = self.device.type == "cpu" and cpu_linear.pack_for_graphs(self.model)
        self.compiled = torch.compile(self._pass, mode=mode, fullgraph=True, dynamic=False)
        for width in (2, self.max_width):
            self.rewind(0)
            self.forward([0] * width, self.built_layers)
        self.rewind(0)
        self.warmed = True

    def rewind(self, length: int) -> None:
        """Keep the cache for the first `length` tokens only: a length change."""
        if length <= 0:
            self.log, self.length = TokenLog(), 0
        elif length < self.length:
            self.log.truncate(length)
            self.length = length

    def _allocate(self) -> None:
        """Keys and values for the whole context; made at the first pass, and again if the context length
        changed (a server's --max-model-len). A verify pass near the end of the context may run past it:
        the rows after the budget are dropped, but the pass writes them, so there is room for them."""
        capacity = self.max_length + self.max_width
        if self.buffers is not None and self.buffers[0][0].shape[2] == capacity:
            return
        self.buffers = None  # the old cache goes before the new one is made
        shape = (1, self.kv_heads, capacity, self.head_dim)
        self.buffers = tuple([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.model.model.layers]
                             for _ in "kv")
        self.positions = torch.arange(capacity, device=self.device)
        if self.device.type == "cuda":
            for buffer in [*self.buffers[0], *self.buffers[1], self.positions]:
                torch._dynamo.mark_static_address(buffer)  # CUDA graphs read them in place instead of copying them in

    @torch.inference_mode()
    def forward(self, ids, feature_layers: tuple[int, ...] = (), last_only: bool = False, feature_device=None):
        if feature_layers and not set(feature_layers) <= set(self.built_layers):
            raise ValueError(f"the compiled passes produce layers {self.built_layers}, not {feature_layers}")
        self._allocate()
        tokens = device_ids(ids, self.device)
        start, count = self.length, tokens.shape[0]
        if start + count > self.buffers[0][0].shape[2]:
            raise ValueError(f"{start + count} positions do not fit the cache of {self.max_length}")
        if self.compiled is None or count > self.max_width or last_only:
            positions = self.positions[start : start + count]
            keys = self.positions[: key_length(start + count, self.device)]
            logits, features = self._pass(tokens, positions, keys, last_only)
        else:
            width = max(count, 2)
            padded = F.pad(tokens, (0, width - count))
            keys = self.positions[: key_length(start + width, self.device)]
            # A copy, not a view: dynamo would specialise on a view's offset, compiling again at every start.
            positions = self.positions[start : start + width].clone()
            logits, features = self._run_compiled(padded, positions, keys)
            logits, features = logits[:count], features[:count]
        self.length = start + count
        self.log.extend(ids)
        if not feature_layers:
            return logits, None
        d = features.shape[-1] // len(self.built_layers)
        columns = [self.built_layers.index(i) * d for i in feature_layers]
        features = torch.cat([features[:, column : column + d] for column in columns], -1)
        return logits, features if feature_device is None else features.to(feature_device)

    def _run_compiled(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor):
        for symbolic in (tokens, positions, keys):
            torch._dynamo.mark_dynamic(symbolic, 0)
        try:
            if self.device.type != "cuda":
                return self.compiled(tokens, positions, keys, False)
            # A CUDA graph's outputs are overwritten by its next replay: the features the drafter keeps
            # are copied out; the logits are read within the round.
            torch.compiler.cudagraph_mark_step_begin()
            logits, features = self.compiled(tokens, positions, keys, False)
            return logits, features.clone()
        except Exception as e:  # a recompilation that fails mid-request: never crash, go on eagerly
            if not self.warmed:
                raise  # compile() fails: compile_target keeps the eager target, with its warning
            print(f"warning: a compiled pass failed ({type(e).__name__}); {self.name} runs eagerly from now on",
                  file=sys.stderr)
            self.compiled = None
            return self._pass(tokens, positions, keys, False)

    def _pass(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, last_only: bool):
        """The forward over tokens at `positions`: writes their keys and values into the cache, attends to
        the cache's positions `keys` (causally), and returns the logits and the built layers' hidden states."""
        model = self.model.model
        width = tokens.shape[0]
        x = model.embed_tokens(tokens)[None]
        cos, sin = model.rotary_emb(x, positions[None])
        visible = keys[None, :] <= positions[:, None]
        kept = [x[0]] if -1 in self.built_layers else []
        for i, layer in enumerate(model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            q = attention.q_proj(h).view(1, width, self.heads, self.head_dim)
            k = attention.k_proj(h).view(1, width, self.kv_heads, self.head_dim)
            v = attention.v_proj(h).view(1, width, self.kv_heads, self.head_dim)
            if hasattr(attention, "q_norm"):  # Qwen3
                q, k = attention.q_norm(q), attention.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            cached_k, cached_v = self.buffers[0][i], self.buffers[1][i]
            cached_k[:, :, positions] = k
            cached_v[:, :, positions] = v.transpose(1, 2)
            length = keys.shape[0]
            out = F.scaled_dot_product_attention(q, cached_k[:, :, :length], cached_v[:, :, :length], attn_mask=visible,
                                                 scale=attention.scaling, enable_gqa=self.heads != self.kv_heads)
            x = x + attention.o_proj(out.transpose(1, 2).reshape(1, width, -1))
            h = layer.post_attention_layernorm(x)
            x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
            if i in self.built_layers:
                kept.append(x[0])
        x = model.norm(x[0, -1:] if last_only else x[0])
        logits = self.model.lm_head(x)
        return logits, torch.cat(kept, -1) if kept else x[:, :0]


def cache_folder(root: Path, device: torch.device) -> Path:
    """Where inductor keeps what it compiled for this device and torch: keyed like the SPS profile, so a
    home folder shared between machines never hands one machine's kernels to another."""
    key = json.dumps([device_identity(device), torch.__version__])
    return root / "compile" / hashlib.sha256(key.encode()).hexdigest()[:16]


def compile_target(target: Target, max_width: int, feature_layers: tuple[int, ...], cache: Path,
                   announce: Callable[[str], None] | None = None) -> Target:
    """The target with compiled passes, or the target itself (eager), with a one-line warning, when its
    model is not one the compiled forward reproduces or compiling fails. `announce` is told, as compiling
    starts, whether it is the first start on this machine and how long it should take."""
    problem = refusal(target.model)
    if problem:
        print(f"warning: {target.name} runs eagerly, not compiled: {problem}", file=sys.stderr)
        return target
    compiled = CompiledTarget(target.model, target.tokenizer, target.name, target.cpu_linear, max_width, feature_layers,
                              target.max_length)
    compiled.stop_ids = target.stop_ids  # it stops where the eager target was told to
    folder = cache_folder(cache, target.device)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")  # inductor reads it at every cache access
    timings = folder / "seconds.json"
    seconds = json.loads(timings.read_text()) if timings.is_file() else {}
    key = json.dumps([target.name, str(target.dtype), compiled.built_layers])
    if key in seconds:
        line = f"cached on this machine, about {seconds[key]['later'] or seconds[key]['first']:.0f} s"
    else:
        # Compiling takes about as long per layer: scale this machine's first start of its deepest model, if any
        # (a shallow test model's fixed costs would inflate the per-layer time: 17 s against SmolLM2's 2.2 s).
        deepest = max(seconds.values(), key=lambda entry: entry["layers"], default=None)
        rate = deepest["first"] / deepest["layers"] if deepest else FIRST_COMPILE_GUESS[target.device.type == "cuda"]
        guess = rate * target.num_layers
        line = f"first start on this machine, about {guess:.0f} s"
    if announce:
        announce(line)
    started = time.perf_counter()
    try:
        compiled.compile()
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"warning: {target.name} runs eagerly: compiling failed ({type(e).__name__}: {reason[:200]})", file=sys.stderr)
        return target
    took = time.perf_counter() - started
    if key in seconds:
        seconds[key]["later"] = took
    else:
        seconds[key] = {"first": took, "later": None, "layers": target.num_layers}
    tmp = timings.with_suffix(".tmp")
    tmp.write_text(json.dumps(seconds))
    tmp.replace(timings)
    return compiled


def compile_drafter(drafter, positions: int) -> None:
    """Compile a DSpark or Eagle3 drafter's greedy block or chain (the drafter of a LookupOrDraft too), with room
    for `positions` of context. One that cannot be compiled (int8 on a CPU) stays eager, with a note that says why."""
    from .dspark import DSparkDrafter
    from .eagle3 import Eagle3Drafter

    inner = getattr(drafter, "drafter", drafter)
    if not isinstance(inner, (DSparkDrafter, Eagle3Drafter)):
        return
    try:
        inner.compile(positions)
    except Exception as e:
        inner.compiled = None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"note: the drafter is not compiled: {reason[:200]}", file=sys.stderr)
