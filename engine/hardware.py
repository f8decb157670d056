"""What this machine has, what a pair needs, and where to put it.

The planner tries, in order: one GPU in bfloat16; the fewest GPUs that hold it together (accelerate
device map within max_memory); the same with bitsandbytes 8-bit, then 4-bit; Apple MPS; the CPU in
float32, then bfloat16. A pair that fits nowhere is refused before anything is downloaded. Hardware is a
plain dataclass, so a test (or `--max-memory`) can describe any machine."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .catalog import Pair

GiB = 1 << 30
DEFAULT_CONTEXT = 8192
HEADROOM = 0.9  # of the free memory a plan may fill: allocator fragmentation, other processes, the desktop
DEVICE_OVERHEAD = 1 * GiB  # per device: CUDA context and workspaces, activations of a prefill chunk, the logits
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Per quantised weight: int8 plus a float32 scale per row (negligible); NF4 plus a float32 absmax per 64 weights.
QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5625}
QUANT_NAMES = {None: "", "8bit": "8-bit", "4bit": "4-bit NF4"}


@dataclass(frozen=True)
class Gpu:
    name: str
    total: int
    free: int
    index: int = 0
    unified: bool = False  # memory shared with the CPU (DGX Spark's GB10): CPU RAM is not extra room
    bf16: bool = True


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...] = ()
    ram_total: int = 0
    ram_free: int = 0
    mps_memory: int = 0  # what Metal recommends a process use on Apple silicon; 0 without MPS

    def describe(self) -> str:
        parts = [
            f"cuda:{g.index} {g.name} ({gib(g.free)} free of {gib(g.total)}{', unified with the CPU' if g.unified else ''})"
            for g in self.gpus
        ]
        if self.mps_memory:
            parts.append(f"Apple MPS ({gib(self.mps_memory)} usable)")
        parts.append(f"RAM {gib(self.ram_free)} free of {gib(self.ram_total)}")
        return "; ".join(parts)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def detect() -> Hardware:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            props = torch.cuda.get_device_properties(i)
            gpus.append(Gpu(props.name, total, free, i, bool(getattr(props, "is_integrated", False)), props.major >= 8))
    mps = 0
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        mps = int(torch.mps.recommended_max_memory())
    total, free = _ram()
    return Hardware(tuple(gpus), total, free, mps)


def _ram() -> tuple[int, int]:
    """Total and available RAM. MemAvailable counts reclaimable page cache, which is what a new allocation gets."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(info["MemTotal"].split()[0]) * 1024, int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        try:
            return total, page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):  # macOS has no SC_AVPHYS_PAGES
            return total, total // 2


@dataclass(frozen=True)
class Need:
    """Bytes a pair needs: target weights, target KV cache at the context length, the drafter (its own
    weights and context keys/values), and a hybrid target's recurrent and convolution states, whose size does
    not grow with the context. Per-device runtime overhead comes on top."""

    weights: int
    kv: int
    drafter: int
    state: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.drafter + self.state


def estimate(pair: Pair, dtype: str = "bfloat16", quant: str | None = None, context: int = DEFAULT_CONTEXT) -> Need:
    t = pair.target
    b = DTYPE_BYTES[dtype]
    if quant:
        # bitsandbytes quantises the decoder's linear layers; embeddings and the LM head stay in the compute dtype
        kept = t.vocab_size * t.hidden_size * (1 if t.tied_embeddings else 2)
        weights = kept * b + (t.params - kept) * QUANT_BYTES[quant]
    else:
        weights = t.params * b
    drafter = 0
    if pair.drafter:
        # embed_tokens and lm_head in a DeepSpec drafter are frozen copies of the target's: the loader shares them
        own = max(pair.drafter_params - 2 * t.vocab_size * t.hidden_size, 0)
        drafter = own * b + t.kv_bytes_per_token(b, pair.drafter_layers) * context
    # A hybrid keeps its live states, a checkpoint after each prefill, through a pass the copy transformers' past
    # recording keeps from 5.25 on (counted on older ones too: the plan holds for either) and, through a verify pass,
    # each position's states (engine/hybrid.py); only its attention layers keep keys and values (kv_bytes_per_token).
    copies = 3 + (pair.block_size + 1 if pair.kind != "none" else 0)
    return Need(int(weights), int(t.kv_bytes_per_token(b) * context), int(drafter), t.state_bytes * copies)


class PlanError(ValueError):
    """A pair that does not fit this machine; the message says what it needs and what there is."""


@dataclass(frozen=True)
class Plan:
    pair: Pair
    context: int
    placement: str  # "gpu", "sharded", "mps" or "cpu"
    dtype: str
    quant: str | None
    devices: tuple[str, ...]
    need: Need
    usable: int  # bytes the chosen devices offer the plan, after headroom and per-device overhead
    max_memory: dict | None = None  # accelerate's form, {0: bytes, 1: bytes}, when sharded
    notes: tuple[str, ...] = ()  # what was tried first and why it did not fit
    warnings: tuple[str, ...] = ()
    device_map: str | None = None  # an explicit --device-map that the loader passes on

    @property
    def drafter_device(self) -> str:
        # the last device holds the final layers and the LM head: the drafter reads both there
        return self.devices[-1]

    @property
    def fits(self) -> bool:
        return self.need.total <= self.usable

    def summary(self) -> str:
        where = {"gpu": self.devices[0], "mps": "mps", "cpu": "cpu"}.get(self.placement)
        if self.placement == "sharded":
            where = "+".join(self.devices)
        text = f"{where} {QUANT_NAMES[self.quant] or self.dtype}"
        return text + (" (slow)" if self.placement == "cpu" else "") + ("" if self.fits else " (may not fit)")

    def explain(self) -> str:
        p, n = self.pair, self.need
        drafter = {"prompt-lookup": "prompt lookup", "none": "no drafter"}.get(p.kind, f"{p.drafter} ({p.kind})")
        if p.kind == "dspark+lookup" and p.drafter is None:
            drafter = "the shipped DSpark drafter, with prompt lookup"
        weights = f"{QUANT_NAMES[self.quant]} weights" if self.quant else f"{self.dtype} weights"
        lines = [
            f"{p.name}: {p.target.repo} + {drafter}, context {self.context} tokens",
            f"  needs {gib(n.weights)} {weights} + {gib(n.kv)} KV cache + {gib(n.drafter)} drafter"
            + (f" + {gib(n.state)} recurrent state" if n.state else "")
            + f" = {gib(n.total)}, plus {gib(DEVICE_OVERHEAD)} runtime per device",
        ]
        if self.placement == "gpu":
            lines.append(f"  plan: one GPU, {self.devices[0]} ({gib(self.usable)} usable), {self._dtypes()}; drafter on the same GPU")
        elif self.placement == "sharded":
            caps = ", ".join(f"cuda:{i} {gib(v)}" for i, v in self.max_memory.items())
            lines.append(f"  plan: split over {', '.join(self.devices)} with accelerate (weights per GPU at most: {caps}), "
                         f"{self._dtypes()}; the last layers, the LM head and the drafter on {self.drafter_device}")
        elif self.placement == "mps":
            lines.append(f"  plan: Apple MPS ({gib(self.usable)} usable), {self.dtype}")
        else:
            lines.append(f"  plan: the CPU ({gib(self.usable)} of RAM usable), {self.dtype}")
        lines += [f"  why: {note}" for note in self.notes]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def _dtypes(self) -> str:
        return f"bitsandbytes {QUANT_NAMES[self.quant]} weights, {self.dtype} compute" if self.quant else self.dtype

    def load_kwargs(self, config=None) -> dict:
        """from_pretrained keyword arguments for the target. With the target's config, a sharded plan gets an
        explicit device map (see place); without one, accelerate's sequential fill within max_memory."""
        import torch

        kwargs: dict = {"dtype": getattr(torch, self.dtype)}
        if self.placement == "sharded":
            kwargs["max_memory"] = dict(self.max_memory)
            explicit = config is not None and self.quant is None and self.device_map in (None, "sequential")
            kwargs["device_map"] = place(config, self.max_memory, self.dtype) if explicit else (self.device_map or "sequential")
        else:
            kwargs["device_map"] = {"": self.devices[0]}
        if self.quant:
            from transformers import BitsAndBytesConfig

            if self.quant == "8bit":
                # No outlier decomposition: LLM.int8 picks outlier columns from every token in the pass,
                # so a pass verifying k tokens would compute another function than k one-token passes
                # and speculative decoding would no longer match the 8-bit target token for token.
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=kwargs["dtype"],
                    bnb_4bit_use_double_quant=True,
                )
        return kwargs


def parse_max_memory(text: str) -> dict:
    """'0=20GiB,1=22GiB,cpu=48GiB' -> {0: bytes, 1: bytes, 'cpu': bytes} (accelerate's keys)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    out: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", value)
        key = key.strip().removeprefix("cuda:")
        if not m or m.group(2).lower() not in units or not (key.isdigit() or key in ("cpu", "mps")):
            raise PlanError(f"--max-memory {item!r}: expected DEVICE=SIZE such as 0=20GiB, cpu=48GiB or mps=24GiB")
        out[int(key) if key.isdigit() else key] = int(float(m.group(1)) * units[m.group(2).lower()])
    return out


@dataclass
class _Budget:
    """Usable bytes per device, after headroom (an explicit --max-memory is taken as given)."""

    gpus: dict[int, int] = field(default_factory=dict)
    mps: int = 0
    cpu: int = 0


def _budget(hw: Hardware, max_memory: dict | None) -> _Budget:
    given = max_memory or {}
    return _Budget(
        {g.index: given.get(g.index, int(g.free * HEADROOM)) for g in hw.gpus},
        given.get("mps", int(hw.mps_memory * HEADROOM)),
        given.get("cpu", int(hw.ram_free * HEADROOM)),
    )


def _options(hw: Hardware, dtype: str | None, quants: list, device_map: str | None):
    """(placement, gpu indices, dtype, quant) in order of preference."""
    single = re.fullmatch(r"(?:cuda:)?(\d+)|cuda", device_map or "")
    shard_only = device_map in ("auto", "sequential", "balanced", "balanced_low_0")
    if hw.gpus and device_map not in ("cpu", "mps"):
        gpu_dtype = dtype or ("bfloat16" if all(g.bf16 for g in hw.gpus) else "float16")
        indices = [g.index for g in hw.gpus]
        if single and single.group(1) is not None:
            indices = [int(single.group(1))]
        for q in quants:
            if not shard_only:
                yield "gpu", indices, gpu_dtype, q
            if len(indices) > 1 and not single:
                yield "sharded", indices, gpu_dtype, q
    if None not in quants:
        return  # bitsandbytes is a CUDA library here
    if hw.mps_memory and device_map in (None, "mps"):
        yield "mps", [], dtype or "float16", None
    if device_map in (None, "cpu"):
        for d in [dtype] if dtype else ["float32", "bfloat16"]:
            yield "cpu", [], d, None


def _try(pair, hw, budget, context, placement, indices, dtype, quant):
    """A Plan for one option; `fits` tells whether it holds the need."""
    need = estimate(pair, dtype, quant, context)
    common = dict(pair=pair, context=context, placement=placement, dtype=dtype, quant=quant, need=need)
    if placement == "gpu":
        best = max(indices, key=lambda i: budget.gpus[i])
        return Plan(devices=(f"cuda:{best}",), usable=budget.gpus[best] - DEVICE_OVERHEAD, **common)
    if placement == "mps":
        return Plan(devices=("mps",), usable=budget.mps - DEVICE_OVERHEAD, **common)
    if placement == "cpu":
        return Plan(devices=("cpu",), usable=budget.cpu - DEVICE_OVERHEAD, **common)
    # Sharded: the fewest GPUs, in index order, whose room holds the weights once each GPU keeps its
    # runtime overhead and its share of the KV cache (and recurrent state), and the last one also the drafter.
    plan = None
    for k in range(2, len(indices) + 1):
        used = indices[:k]
        room = {i: budget.gpus[i] - DEVICE_OVERHEAD for i in used}
        whole = sum(room.values())
        caps = {i: int(room[i] - (need.kv + need.state) * room[i] / whole) for i in used}
        caps[used[-1]] -= need.drafter
        usable = whole if all(c > 0 for c in caps.values()) else 0
        plan = Plan(devices=tuple(f"cuda:{i}" for i in used), usable=usable, max_memory=caps, **common)
        if plan.fits:
            break
    return plan


def _label(plan: Plan) -> str:
    what = QUANT_NAMES[plan.quant] or plan.dtype
    where = {"gpu": f"one GPU ({plan.devices[0]}, ", "sharded": f"{len(plan.devices)} GPUs ({', '.join(plan.devices)}, ",
             "mps": "MPS (", "cpu": "the CPU ("}[plan.placement]
    return f"{what} on {where}{gib(max(plan.usable, 0))} usable) needs {gib(plan.need.total)}"


def plan_pair(
    pair: Pair,
    hardware: Hardware | None = None,
    context: int | None = None,
    dtype: str | None = None,
    quant: str | None = None,
    max_memory: dict | None = None,
    device_map: str | None = None,
) -> Plan:
    """The first option that fits. With overrides (dtype, quant, max_memory, device_map) the first option they
    allow is returned even if it does not fit, with a warning: the user may know better (swap, other limits)."""
    if pair.target.remote_code:
        raise PlanError(f"{pair.name}: its target {pair.target.repo} runs in transformers only with the repository's own code "
                        "(trust_remote_code), and dspark-chat never runs a model's own code: choose another pair")
    hw = hardware or detect()
    context = min(context or DEFAULT_CONTEXT, pair.target.max_positions)
    if quant not in (None, "none", "8bit", "4bit"):
        raise PlanError(f"quantisation {quant!r}: use none, 8bit or 4bit")
    # a dtype override means weights in that dtype: no quantisation unless asked for too
    quants = [None] if quant == "none" or (dtype and not quant) else [quant] if quant else [None, "8bit", "4bit"]
    if dtype is not None and dtype not in DTYPE_BYTES:
        raise PlanError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    forced = any(x is not None for x in (dtype, quant, max_memory, device_map))
    budget = _budget(hw, max_memory)
    tried: list[Plan] = []
    for option in _options(hw, dtype, quants, device_map):
        plan = _try(pair, hw, budget, context, *option)
        if plan.fits:
            return _finish(plan, hw, [f"{_label(p)}: too much" for p in tried], device_map)
        tried.append(plan)
    if forced and tried:
        plan = tried[0]
        return _finish(plan, hw, [], device_map, [f"it needs {gib(plan.need.total)} and the chosen devices offer "
                                                   f"{gib(max(plan.usable, 0))}: loading will likely run out of memory"])
    if forced:
        raise PlanError(f"{pair.name}: no device matches the overrides on this machine ({hw.describe()})")
    gpu = estimate(pair, "bfloat16", "4bit", context).total + DEVICE_OVERHEAD
    ram = estimate(pair, "bfloat16", None, context).total + DEVICE_OVERHEAD
    raise PlanError(
        f"{pair.name} does not fit this machine: at a {context}-token context it needs at least {gib(gpu)} on a "
        f"CUDA GPU (4-bit) or {gib(ram)} of RAM (bfloat16); this machine has {hw.describe()}. "
        "Tried: " + "; ".join(_label(p) for p in tried) + ". Choose a smaller pair or a shorter --context."
    )


def _finish(plan: Plan, hw: Hardware, notes: list[str], device_map: str | None, warnings: list[str] = ()) -> Plan:
    warnings = list(warnings)
    if plan.quant and importlib.util.find_spec("bitsandbytes") is None:
        warnings.append("bitsandbytes is not installed: pip install 'dspark-chat[quant]'")
    if plan.placement == "cpu":
        warnings.append("runs on the CPU: expect a few tokens per second for billion-parameter models")
        if plan.dtype == "bfloat16":
            warnings.append("bfloat16 because float32 does not fit; CPUs without bf16 units run it slower")
    if plan.placement == "gpu" and hw.gpus and any(g.unified for g in hw.gpus):
        warnings.append("the GPU shares its memory with the CPU: other programs compete for the same room")
    if plan.pair.has_estimates:
        warnings.append("some sizes of this pair are estimates (see `estimated` in models.toml)")
    return replace(plan, notes=tuple(notes), warnings=tuple(warnings), device_map=device_map)


def place(config, max_memory: dict, dtype: str = "bfloat16") -> dict:
    """An accelerate device map for the target, computed on the meta device (no weights are read): decoder
    layers fill the GPUs in order within max_memory; the final norm and the LM head (and the embedding tied
    to it) then join the last layer, whose device is where the drafter reads features and logits."""
    import torch
    from accelerate import infer_auto_device_map
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):  # unlike accelerate's init_empty_weights this also ties the embeddings
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=torch_dtype)
    stray = {k: v for k, v in device_map.items() if not isinstance(v, int)}
    if stray:
        raise PlanError(f"the target does not fit in max_memory {max_memory}: {', '.join(stray)} would go to "
                        f"{', '.join(sorted(set(map(str, stray.values()))))}")
    names = {id(m): n for n, m in model.named_modules()}
    layers = [n for n, m in model.named_modules() if type(m).__name__ in no_split]
    head = model.get_output_embeddings()
    last = _device_of(layers[-1], device_map)
    moved = [names[id(head)]]
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is not None:
        moved.append(names[id(norm)])
    if head.weight is model.get_input_embeddings().weight:
        moved.append(names[id(model.get_input_embeddings())])
    for name in moved:
        if name in device_map:
            device_map[name] = last
    return device_map


def _device_of(name: str, device_map: dict):
    while name not in device_map:
        if not name:
            raise KeyError(name)
        name = name.rpartition(".")[0]
    return device_map[name]
