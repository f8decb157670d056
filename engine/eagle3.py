"""Eagle3 drafters, implemented here for inference: DeepSpec's Qwen3Eagle3Model and Gemma4Eagle3Model, and
vllm-project/speculators' Eagle3 format (`speculators_model_type: "eagle3"`, Llama- or Qwen3-style layers).

An Eagle3 drafter drafts a chain, one token per pass, with a key/value cache of its own. Entry i of that
cache reads the target's hidden states at position i (a few layers, concatenated and projected by `fc`)
and the embedding of token i + 1, at RoPE position i; its output predicts token i + 2. So once the target
has committed up to the anchor at position `start`, entries 0..start-1 are known, and the last one drafts
the token after the anchor. Each further draft is one more entry: the drafter's own output hidden state
stands in for the target's, with the token just drafted. After a round the chain's entries are dropped
and the target's hidden states of the committed positions take their place.

Layers take [input_layernorm(embedding), hidden_norm(hidden)] (2d wide) and keep `hidden` as the residual.
DeepSpec builds every layer so; speculators only the first, the others are plain decoder layers over d.
speculators' optional norms: `norm_before_residual` (the residual is the normed hidden), `norm_before_fc`
(one RMS norm over the concatenated features), `fc_norm` (one per feature layer), `norm_output` (the
normed hidden state is what the next step reads, Eagle 3.1). A pruned draft vocabulary (`d2t`: target id =
draft id + d2t[draft id]) shrinks the LM head to its rows. Parameter names follow the checkpoints.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from transformers import AutoConfig, Qwen3Config
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

from . import cpu_linear
from .dspark import _rope
from .dspark_gemma4 import Gemma4DraftMLP, Gemma4DraftRotary, ScaledEmbedding, gemma4_config, mlp_size
from .sampling import Proposal, Sampling

DEEPSPEC_ARCHITECTURES = ("Qwen3Eagle3Model", "Gemma4Eagle3Model")
SPECULATORS_LAYER_TYPES = ("llama", "qwen3")
SPECULATORS_DEFAULT_STEPS = 3  # speculators' training default (ttt_steps) when the config names no count


def is_eagle3(raw: dict) -> bool:
    """Whether a drafter's config.json describes an Eagle3 drafter this module loads."""
    return raw.get("speculators_model_type") == "eagle3" or (raw.get("architectures") or [None])[0] in DEEPSPEC_ARCHITECTURES


@dataclass
class Eagle3Layout:
    """What an Eagle3 checkpoint's config.json says, in one shape for every format."""

    style: str  # "qwen3", "llama" or "gemma4": the layers' norms, attention and MLP
    layer: object  # the transformer config the layers are built from
    feature_layers: tuple[int, ...]  # target layers read (this project's convention: i is layer i's output)
    chain_length: int  # drafts per round it was trained for
    draft_vocab_size: int
    every_layer_eagle: bool  # DeepSpec: every layer reads [embedding, hidden]; speculators: the first only
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False

    @property
    def hidden_size(self) -> int:
        return int(self.layer.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.layer.vocab_size)


def layout_from(raw: dict, target_layers: int) -> Eagle3Layout:
    """The layout of a DeepSpec or speculators Eagle3 config.json; ValueError says what is missing or
    unsupported. target_layers: the target's layer count (speculators' default feature layers need it)."""
    if raw.get("speculators_model_type") == "eagle3":
        return _speculators_layout(raw, target_layers)
    arch = raw["architectures"][0]
    missing = [f for f in ("target_layer_ids", "ttt_length") if f not in raw]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(map(repr, missing))}, which {arch} reads")
    fields = {k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "dtype")}
    if arch == "Gemma4Eagle3Model":
        layer, style = gemma4_config(raw, arch, ("target_layer_ids", "ttt_length")), "gemma4"
    else:
        layer, style = Qwen3Config(**fields), "qwen3"
    return Eagle3Layout(style, layer, tuple(int(i) for i in raw["target_layer_ids"]), int(raw["ttt_length"]),
                        int(layer.vocab_size), every_layer_eagle=True)


def _speculators_layout(raw: dict, target_layers: int) -> Eagle3Layout:
    layer_raw = raw.get("transformer_layer_config")
    if not isinstance(layer_raw, dict):
        raise ValueError("config.json lacks 'transformer_layer_config', which a speculators Eagle3 drafter needs")
    style = layer_raw.get("model_type", "llama")  # speculators' own default layer config was Llama's
    if style not in SPECULATORS_LAYER_TYPES:
        raise ValueError(f"its layers are {style!r}; Eagle3 drafters with {' or '.join(SPECULATORS_LAYER_TYPES)} layers are "
                         "supported, this one cannot run here")
    layer = AutoConfig.for_model(style, **{k: v for k, v in layer_raw.items() if k != "model_type"})
    if "sliding_attention" in (getattr(layer, "layer_types", None) or []):
        raise ValueError("it has sliding-window layers, which this engine's Eagle3 drafter does not run")
    if raw.get("norm_before_fc") and raw.get("fc_norm"):
        raise ValueError("norm_before_fc and fc_norm are both set; speculators allows one or the other")
    ids = raw.get("eagle_aux_hidden_state_layer_ids")
    if ids is None:  # speculators' default, from the verifier's layer count
        ids = [2, target_layers // 2, target_layers - 3]
    # speculators counts like vLLM: id k is the input of decoder layer k, the output of layer k - 1.
    features = tuple(int(i) - 1 for i in ids)
    methods = (raw.get("speculators_config") or {}).get("proposal_methods") or [{}]
    steps = int(methods[0].get("speculative_tokens") or SPECULATORS_DEFAULT_STEPS)
    return Eagle3Layout(
        style, layer, features, steps, int(raw.get("draft_vocab_size") or layer.vocab_size), every_layer_eagle=False,
        norm_before_residual=bool(raw.get("norm_before_residual")), norm_before_fc=bool(raw.get("norm_before_fc")),
        fc_norm=bool(raw.get("fc_norm")), norm_output=bool(raw.get("norm_output")),
    )


def _norm(layout: Eagle3Layout, size: int) -> nn.Module:
    eps = layout.layer.rms_norm_eps
    return Gemma4RMSNorm(size, eps=eps) if layout.style == "gemma4" else Qwen3RMSNorm(size, eps=eps)


class GrowingKV:
    """One layer's keys and values [kv_heads, n, head_dim], in buffers with room to spare: a chain step
    writes one row in place where concatenating would copy the whole cache seven times a round."""

    def __init__(self):
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[1]
        if self.buffers is None or end > self.buffers[0].shape[1]:
            capacity = max(256, 2 * end)
            grown = tuple(new.new_empty(new.shape[0], capacity, new.shape[2]) for new in (k, v))
            if self.buffers is not None:
                for old, buffer in zip(self.buffers, grown):
                    buffer[:, : self.length] = old[:, : self.length]
            self.buffers = grown
        self.buffers[0][:, self.length : end] = k
        self.buffers[1][:, self.length : end] = v
        self.length = end
        return self.buffers[0][:, :end], self.buffers[1][:, :end]

    def reserve(self, capacity: int, attention: "Eagle3Attention", dtype: torch.dtype, device: torch.device) -> None:
        """Buffers for `capacity` positions at once, made before it holds any: a compiled chain reads them in place
        (on CUDA, a buffer that moves is a new recording)."""
        shape = (attention.kv_heads, capacity, attention.head_dim)
        self.buffers = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in "kv")


class ChainRow:
    """A compiled chain step's view of a GrowingKV: it writes its key and value at a position given as a tensor
    (the graph serves every round) and attends to the buffers up to a bucketed length, masked past the step."""

    def __init__(self, cache: GrowingKV, position: torch.Tensor, length: int):
        self.cache, self.position, self.length = cache, position, length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.buffers
        keys.index_copy_(1, self.position, k)
        values.index_copy_(1, self.position, v)
        return keys[:, : self.length], values[:, : self.length]


class Eagle3Attention(nn.Module):
    def __init__(self, layout: Eagle3Layout, input_dim: int):
        super().__init__()
        c, gemma = layout.layer, layout.style == "gemma4"
        self.heads = int(c.num_attention_heads)
        if gemma:
            k_eq_v = bool(c.attention_k_eq_v)
            self.head_dim = int(c.global_head_dim)
            self.kv_heads = int(c.num_global_key_value_heads if k_eq_v else c.num_key_value_heads)
            self.scale = 1.0  # the q/k norms already fix the logits' scale
        else:
            k_eq_v = False
            self.head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
            self.kv_heads = int(c.num_key_value_heads)
            self.scale = self.head_dim**-0.5
        bias = bool(getattr(c, "attention_bias", False))
        self.q_proj = nn.Linear(input_dim, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(input_dim, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = None if k_eq_v else nn.Linear(input_dim, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=bias)
        self.q_norm = self.k_norm = self.v_norm = None
        if layout.style != "llama":
            self.q_norm, self.k_norm = _norm(layout, self.head_dim), _norm(layout, self.head_dim)
        if gemma:
            self.v_norm = Gemma4RMSNorm(self.head_dim, eps=c.rms_norm_eps, with_scale=False)

    def forward(self, x, cos, sin, cache: GrowingKV, mask):
        """x [t, input_dim] at the cache's next t positions; mask [t, n] or None (attend to everything)."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.heads, self.head_dim)
        k = self.k_proj(x).view(t, self.kv_heads, self.head_dim)
        v = k if self.v_proj is None else self.v_proj(x).view(t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        q = _rope(q.transpose(0, 1), cos, sin)
        keys, values = cache.append(_rope(k.transpose(0, 1), cos, sin), v.transpose(0, 1))
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out[0].transpose(0, 1).reshape(t, -1))


class Eagle3Layer(nn.Module):
    def __init__(self, layout: Eagle3Layout, index: int, eagle: bool):
        super().__init__()
        c, d = layout.layer, layout.hidden_size
        self.eagle, self.gemma = eagle, layout.style == "gemma4"
        self.norm_before_residual = layout.norm_before_residual
        self.self_attn = Eagle3Attention(layout, 2 * d if eagle else d)
        if self.gemma:
            self.mlp = Gemma4DraftMLP(c, mlp_size(c, index))
            self.pre_feedforward_layernorm = _norm(layout, d)
            self.post_feedforward_layernorm = _norm(layout, d)
            self.register_buffer("layer_scalar", torch.ones(1))  # persistent: checkpoints store it
        else:
            self.mlp = LlamaMLP(c) if layout.style == "llama" else Qwen3MLP(c)
        if eagle:
            self.hidden_norm = _norm(layout, d)
        self.input_layernorm = _norm(layout, d)
        self.post_attention_layernorm = _norm(layout, d)

    def forward(self, embeds, hidden, cos, sin, cache, mask):
        if self.eagle:
            normed = self.hidden_norm(hidden)
            residual = normed if self.norm_before_residual else hidden
            x = torch.cat([self.input_layernorm(embeds), normed], -1)
        else:
            residual, x = hidden, self.input_layernorm(hidden)
        attended = self.self_attn(x, cos, sin, cache, mask)
        if self.gemma:
            h = residual + self.post_attention_layernorm(attended)
            h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
            return h * self.layer_scalar
        h = residual + attended
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Drafter(nn.Module):
    """One live sequence. Cache entries 0.._cached-1 are folded in; the target's hidden states of the
    positions after them wait in _pending until a proposal knows the tokens that pair with them."""

    def __init__(self, layout: Eagle3Layout, embed_tokens: nn.Embedding | None = None, lm_head: nn.Linear | None = None):
        super().__init__()
        self.layout = layout
        d, n_features = layout.hidden_size, len(layout.feature_layers)
        self.block_size = layout.chain_length
        self.feature_layers = layout.feature_layers
        gemma = layout.style == "gemma4"
        if embed_tokens is None:
            embed_tokens = (ScaledEmbedding if gemma else nn.Embedding)(layout.vocab_size, d)
        self.embed_tokens = embed_tokens  # shared with the target when the checkpoint's copy is identical
        self.input_norm = _norm(layout, n_features * d) if layout.norm_before_fc else None
        self.fc_norm = nn.ModuleList(_norm(layout, d) for _ in range(n_features)) if layout.fc_norm else None
        self.fc = nn.Linear(n_features * d, d, bias=False)
        c = layout.layer
        self.layers = nn.ModuleList(Eagle3Layer(layout, i, layout.every_layer_eagle or i == 0) for i in range(c.num_hidden_layers))
        self.norm = _norm(layout, d)
        self.rotary_emb = Gemma4DraftRotary(c) if gemma else Qwen3RotaryEmbedding(c)
        self.lm_head = nn.Linear(d, layout.draft_vocab_size, bias=False) if lm_head is None else lm_head
        self.softcap = getattr(c, "final_logit_softcapping", None) if gemma else None
        self.draft_vocab: torch.Tensor | None = None  # target id of each LM head row, when the vocabulary is pruned
        self.int8 = False
        self.rewind(0)

    def quantize(self) -> None:
        """The layers (and an LM head of its own, not the target's) with int8 weights, as DSparkDrafter.quantize
        does and for its reasons; fc stays float, for the target's outlier channels."""
        own = {"layers": per_channel_dynamic_qconfig}
        if self.layout.draft_vocab_size < self.layout.vocab_size:
            own["lm_head"] = per_channel_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch marks eager quantisation deprecated in favour of torchao, and keeps it
            quantize_dynamic(self, own, inplace=True)
        self.int8 = True

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    # --- the sequence state -------------------------------------------------------------------
    def rewind(self, length: int) -> int:
        """Forget every position from `length` on; returns how many positions of context remain. Entry
        length - 1 paired the target's state there with the token at `length`, which is forgotten: that
        entry goes too, so one position less remains, and the target recomputes it."""
        if length <= 1 or not hasattr(self, "_caches") or length <= self._cached:
            keep = max(0, min(length - 1, getattr(self, "_cached", 0)))
            if not hasattr(self, "_caches"):  # kept from then on: a compiled chain reads their buffers in place
                self._caches = [GrowingKV() for _ in self.layers]
            for cache in self._caches:
                cache.length = keep
            self._cached, self._pending, self._head = keep, None, None
        elif self._pending is not None:
            self._pending = self._pending[: length - self._cached]
        return self.context_length

    @property
    def context_length(self) -> int:
        return self._cached + (0 if self._pending is None else self._pending.shape[0])

    def observe(self, features: torch.Tensor) -> None:
        """Target features [n, len(feature_layers) * d] of the next n committed positions."""
        self._pending = features if self._pending is None else torch.cat([self._pending, features])

    # --- drafting -----------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, ids: torch.Tensor, limit: int, sampling: Sampling, generator=None) -> Proposal:
        """Draft a chain of min(limit, block_size) tokens after ids[-1] (the anchor, at position len(ids) - 1).
        When sampling, each draft is drawn from its own distribution, and those are the probabilities returned."""
        start = ids.shape[0] - 1
        if start != self.context_length:
            raise RuntimeError(f"drafter context has {self.context_length} positions, anchor is at {start}")
        n = min(limit, self.block_size)
        if n <= 0:
            return Proposal.empty(ids.device)
        if self._pending is not None:
            self._head = self._fold(ids[self._cached + 1 : start + 1])
        if self._head is None:
            raise RuntimeError("the drafter holds no context: observe the target's hidden states first")
        if self.compiled is not None and sampling.greedy and n == self.block_size:
            return self._propose_compiled(start, ids.device)
        hidden, tokens, probs = self._head[None], [], []  # rows [1, d]: int8 products take matrices only
        for k in range(n):
            token, p = sampling.pick(self._logits(hidden), generator)
            token = token if self.draft_vocab is None else self.draft_vocab[token]
            tokens.append(token[0])
            if p is not None:
                probs.append(p[0])
            if k + 1 < n:
                hidden = self._step(token, hidden, start + k)
        for cache in self._caches:  # the chain's entries: the target's states replace them next round
            cache.length = self._cached
        tokens = torch.stack(tokens).to(ids.device)
        if not probs:
            return Proposal(tokens, None)
        probs = torch.stack(probs)
        if self.draft_vocab is not None:  # the acceptance rule compares with the target's whole vocabulary
            probs = probs.new_zeros(n, self.layout.vocab_size).index_copy_(1, self.draft_vocab, probs)
        return Proposal(tokens, probs)

    def _fold(self, tokens: torch.Tensor) -> torch.Tensor:
        """Add the pending positions' entries, each with the token after it; returns the last one's output."""
        features = self._pending.to(self.device, self.dtype)
        if self.input_norm is not None:
            features = self.input_norm(features)
        if self.fc_norm is not None:
            features = torch.cat([norm(x) for norm, x in zip(self.fc_norm, features.chunk(len(self.fc_norm), -1))], -1)
        hidden = self._step(tokens.to(self.device), self.fc(features), self._cached)
        self._cached, self._pending = self._cached + len(tokens), None
        return hidden[-1]

    def _step(self, tokens: torch.Tensor, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Run entries for `tokens` [t] and input hidden states [t, d] at positions position.. (appended to
        the caches); returns their output hidden states [t, d]."""
        t = tokens.shape[0]
        mask = None  # one row attends to everything before it
        if t > 1:
            mask = torch.ones(t, position + t, dtype=torch.bool, device=self.device).tril(position)
        return self._entries(tokens, hidden, torch.arange(position, position + t, device=self.device), self._caches, mask)

    def _entries(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, caches: list, mask):
        """The layers over tokens [t] and hidden states [t, d] at `positions`, each layer's keys and values
        appended to its cache in `caches` (a GrowingKV, or a compiled chain step's ChainRow)."""
        embeds = self.embed_tokens(tokens.to(self.embed_tokens.weight.device)).to(self.device, self.dtype)
        cos, sin = self.rotary_emb(embeds, positions[None])
        for layer, cache in zip(self.layers, caches):
            hidden = layer(embeds, hidden, cos[0], sin[0], cache, mask)
        return self.norm(hidden) if self.layout.norm_output else hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden if self.layout.norm_output else self.norm(hidden))
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    # --- compiled drafting ----------------------------------------------------------------------
    compiled = None

    def compile(self, positions: int) -> None:
        """Compile the greedy chain (its block_size one-token steps, each attending to its caches up to a bucketed
        length, masked) into one graph, a CUDA graph on CUDA, with room for `positions` of context, and draft one
        chain with it. Raises what compiling raises; an int8 drafter is refused, as DSparkDrafter.compile does."""
        if self.int8:
            raise ValueError("its int8 products are not traced by torch.compile; it runs eagerly, in int8")
        # Caches of its own: a twin (bench's compiled modes) shares the eager drafter's modules, not its context.
        self._caches = [GrowingKV() for _ in self.layers]
        for layer, cache in zip(self.layers, self._caches):
            cache.reserve(positions + self.block_size, layer.self_attn, self.dtype, self.device)
            if self.device.type == "cuda":
                for buffer in cache.buffers:
                    torch._dynamo.mark_static_address(buffer)
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        if self.device.type == "cpu":
            cpu_linear.pack_for_graphs(self)
        self.compiled = torch.compile(self._greedy_chain, mode=mode, fullgraph=True, dynamic=False)
        self.rewind(0)
        self.observe(torch.zeros(1, len(self.feature_layers) * self.layout.hidden_size, dtype=self.dtype, device=self.device))
        self.propose(torch.zeros(2, dtype=torch.long), self.block_size, Sampling())
        self.rewind(0)

    def _propose_compiled(self, start: int, device: torch.device) -> Proposal:
        from .compiled import key_length

        capacity = self._caches[0].buffers[0].shape[1]
        keys = torch.arange(min(key_length(start + self.block_size, self.device), capacity), device=self.device)
        torch._dynamo.mark_dynamic(keys, 0)
        positions = torch.arange(start, start + self.block_size, device=self.device)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # A copy, not a view: dynamo would specialise on a view's offset.
        tokens = self.compiled(self._head.clone(), positions, keys)
        for cache in self._caches:  # the chain's entries: the target's states replace them next round
            cache.length = self._cached
        # A CUDA graph's outputs are overwritten by its next replay, and a proposal may outlive the round.
        return Proposal(tokens.clone().to(device), None)

    def _greedy_chain(self, head: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        hidden, tokens = head[None], []
        for k in range(self.block_size):
            token, _ = Sampling().pick(self._logits(hidden))
            tokens.append(token if self.draft_vocab is None else self.draft_vocab[token])
            if k + 1 < self.block_size:
                position = positions[k : k + 1]
                rows = [ChainRow(cache, position, keys.shape[0]) for cache in self._caches]
                hidden = self._entries(tokens[-1], hidden, position, rows, (keys <= position)[None])
        return torch.cat(tokens)


def draft_vocab_from(d2t: torch.Tensor, t2d: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """The target id of each draft id (draft id + d2t[draft id]); ValueError when the map is not one-to-one
    into the vocabulary, or t2d disagrees with it."""
    vocab = torch.arange(len(d2t)) + d2t.long().cpu()
    if vocab.min() < 0 or vocab.max() >= vocab_size or len(vocab.unique()) != len(vocab):
        raise ValueError(f"d2t does not map the draft vocabulary one-to-one into the target's {vocab_size} ids")
    if t2d is not None:
        mask = t2d.bool().cpu()
        if mask.shape != (vocab_size,) or int(mask.sum()) != len(vocab) or not bool(mask[vocab].all()):
            raise ValueError("t2d and d2t name different draft vocabularies")
    return vocab
