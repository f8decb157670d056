"""Faster matrix products on CPU, for verify passes and plain decoding steps.

A verify pass multiplies every weight matrix by a handful of rows (the anchor and the drafts). Some
BLAS builds take a slow path there: torch's MKL on an AMD EPYC runs SmolLM2's 576 -> 1536 projection
over 2 rows 1.7x slower than over 1, and its 49152-way LM head 2.2x slower, so a pass over 2 tokens
cost 1.7x a pass over 1 and speculation could barely pay. The same product computed the other way
round, (W @ x^T)^T, takes the fast path for few rows (the LM head over 2 rows: 5 ms instead of 20).
Which way wins depends on the BLAS, the CPU, the shape and the row count, so it is measured once per
weight shape and row count on this machine (a few seconds) and cached; each nn.Linear on the CPU then
takes the faster way for the row counts where it measured clearly faster (by FASTER_BY). Each way is
timed over the model's layers of that shape in turn, as a pass meets them: the weights stream from
memory, and each timing spans many products. Timed on one matrix, a product takes a fraction of a
millisecond and a busy machine's noise decides: so measured, SmolLM2's 576 -> 1536 projection kept the
slow way for 2, 3 and 5-8 rows, where over 30 such matrices in turn 5 rows take 8.5 ms transposed against
13.1 plain. One row (a plain decoding step) can gain too: it goes as two rows, the second zero, where
BLAS's matrix-vector product is the slower one (SmolLM2's LM head: 7.8 ms, against 5.1 ms).

A third way is oneDNN's product over a copy of the weights in its own blocked layout ("packed"). Both
other ways slow down past 4-6 rows, and this one much less: over 12 rows SmolLM2's LM head takes 8.8 ms
packed against 22-24 the other ways. A way must beat each one before it (plain, transposed, packed) by
FASTER_BY to be taken, so near-ties keep the older way. The copies double the memory of the layers that
take it, so packing is measured only when a copy of all the model's CPU weights fits in half the free
memory.

Compiled passes (engine/compiled.py) call every product through one opaque operation, `dspark::routed_linear`:
inductor would otherwise lower it to its own matrix product, MKL's slow few-row path (twice eager's time per
pass for SmolLM2). Where the model's weights have packed copies (pack_for_graphs, when they fit) it runs the
packed product at every row count, which in a compiled pass beat each layer's measured way; otherwise the way
measured for the call's row count, chosen per call since the graph is symbolic in its width. Letting inductor
pack the weights itself instead (its "freezing") makes it bypass its on-disk caches, so that every start would
compile for a minute again.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import types
import weakref
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 17  # the longest verify pass the engine runs: a block of 16 drafts and its anchor
MEASURED_ROWS = "1..,streamed,packed"  # choices cached by an older way of measuring are measured again
FASTER_BY = 0.1  # a way is taken only where it is this much faster than each way before it (torch's own first)
# Smaller matrices cost microseconds either way: measuring them would only pick noise. SmolLM2's 576 -> 192
# key and value projections (110,592 weights) are just above: over 4 rows 74 us plain against about 45
# transposed, 60 of them a pass.
MIN_WEIGHTS = 1 << 16
# A shape is timed over its layers until they hold this many bytes: more than a CPU's caches, so the
# products read from memory as in a pass, without a big model's measurement streaming all its weights.
STREAMED_BYTES = 1 << 28


def _fast_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # the row count may be symbolic: choose per call, at run time
        return torch.ops.dspark.routed_linear(x, self.weight, self.bias)
    return _routed(self, x)


def _routed(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    way = self.way_for_rows.get(rows)
    if way == "packed" and not x.requires_grad:  # oneDNN's packed product has no backward
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
    if way != "transposed":
        return F.linear(x, self.weight, self.bias)
    out = _transposed(self.weight, x.reshape(rows, -1))
    if self.bias is not None:
        out = out + self.bias
    return out.contiguous().view(*x.shape[:-1], out.shape[-1])


# Routed layers by their weight's address: the opaque operation is handed the weight, not the layer. The
# layer is held weakly and its weight compared on use, so a freed layer's address, reused by another
# tensor, never routes that tensor's products through the old layer's packed copy.
_ROUTED: dict[int, weakref.ref] = {}


def routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in a compiled graph: over the weight's packed copy where its layer has one (see pack_for_graphs),
    else the way this machine measured fastest for the layer and x's row count."""
    entry = _ROUTED.get(weight.data_ptr())
    layer = entry() if entry is not None else None
    if layer is None or layer.weight.data_ptr() != weight.data_ptr():
        return F.linear(x, weight, bias)
    packed = getattr(layer, "packed_weight", None)
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return _routed(layer, x)


# Defined through torch.library's plain registration rather than its custom_op decorator, whose extra layers cost
# 3 us a call (8 against 5): a compiled pass makes one call per product, 211 of them for SmolLM2.
_LIBRARY = torch.library.Library("dspark", "DEF")
_LIBRARY.define("routed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("routed_linear", routed_linear, "CPU")


@torch.library.register_fake("dspark::routed_linear", lib=_LIBRARY)
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _packed(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's blocked layout for its own products, or None where this torch has none for it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except RuntimeError:
        return None


def _transposed(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(W @ x^T)^T. One row goes as two (the second zero): a matrix-vector product can be the slow one
    (the LM head over 1 row: 7.8 ms, over 2 rows this way: 5.1 ms)."""
    rows = x.shape[0]
    if rows == 1:
        x = torch.cat([x, torch.zeros_like(x)])
    return torch.mm(weight, x.t()).t()[:rows]


def _fastest_seconds(runs, repeats: int) -> list[float]:
    """Each run's fastest time over `repeats` interleaved rounds: other work on the machine only ever
    adds time, so the minimum is the least disturbed estimate, and interleaving spreads a busy moment
    over both ways rather than landing on one."""
    best = [float("inf")] * len(runs)
    for round_ in range(repeats + 1):  # round 0 warms up
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            if round_:
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def measure(weights: list[torch.Tensor], max_rows: int = MAX_ROWS, repeats: int = 7, pack: bool = True) -> dict[str, list[int]]:
    """For each row count (1..max_rows), the other way that beats F.linear over these weights (one shape
    and dtype) by FASTER_BY, if one does: {"transposed": [rows], "packed": [rows]}. Each product runs over
    all the weights in turn, as a pass runs them."""
    ways = {"transposed": lambda x: [_transposed(w, x).contiguous() for w in weights]}
    packed = [_packed(w) for w in weights] if pack else None
    if packed and all(p is not None for p in packed):
        ways["packed"] = lambda x: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]
    faster = {way: [] for way in ways}
    for rows in range(1, max_rows + 1):
        x = torch.randn(rows, weights[0].shape[1], dtype=weights[0].dtype)
        with torch.inference_mode():
            seconds = _fastest_seconds([lambda: [F.linear(x, w) for w in weights]]
                                       + [lambda run=run: run(x) for run in ways.values()], repeats)
        # Each way in turn must beat all those before it by FASTER_BY: a near-tie keeps the older way.
        best, chosen = seconds[0], None
        for way, time_ in zip(ways, seconds[1:]):
            if time_ < best * (1 - FASTER_BY):
                best, chosen = time_, way
        if chosen:
            faster[chosen].append(rows)
    return faster


def _key(shape, dtype) -> str:
    return f"{shape[0]}x{shape[1]}:{str(dtype).removeprefix('torch.')}"


def speed_up(model: nn.Module, cache: Path | None, measuring: Callable[[], None] | None = None) -> dict[str, dict[str, list[int]]]:
    """Measure (or read from the cache) and install the faster product in every nn.Linear of a model
    whose weights are on the CPU. Returns {"out x in:dtype": {"transposed": rows, "packed": rows}}, the
    row counts that take each way (the others take F.linear). `measuring` is called before a measurement
    (not when the cache has the choice): it takes half a minute for SmolLM2."""
    linears = [m for m in model.modules() if _plain_cpu_linear(m)]
    shapes = sorted({_key(m.weight.shape, m.weight.dtype) for m in linears})
    if not shapes:
        return {}
    # Packed copies sit beside the weights: only when a copy of them takes under half the free memory.
    pack = sum({m.weight.data_ptr(): m.weight.nbytes for m in linears}.values()) < _available_memory() / 2
    identity = [cpu_identity(), torch.__version__, torch.get_num_threads(), shapes, MEASURED_ROWS, pack]
    path = None
    if cache is not None:
        path = cache / "cpu-linear" / (hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16] + ".json")
    choice = None
    if path is not None and path.is_file():
        try:
            choice = json.loads(path.read_text())["ways"]
        except (ValueError, KeyError):
            choice = None  # a damaged cache file is measured again
    if choice is None or set(choice) != set(shapes):
        if measuring is not None:
            measuring()
        weights = {}
        for m in linears:
            same = weights.setdefault(_key(m.weight.shape, m.weight.dtype), [])
            if sum(w.nbytes for w in same) < STREAMED_BYTES:
                same.append(m.weight.detach())
        choice = {key: measure(weights[key], pack=pack) for key in shapes}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"identity": identity, "ways": choice}))
            tmp.replace(path)
    install(model, choice)
    return choice


def install(model: nn.Module, choice: dict[str, dict[str, list[int]]]) -> None:
    """Route each CPU nn.Linear's products over the chosen row counts the chosen way. A packed copy is
    made of the weights now: they must not change afterwards (the engine's target and drafters are frozen)."""
    for m in model.modules():
        if _plain_cpu_linear(m):
            ways = choice.get(_key(m.weight.shape, m.weight.dtype), {})
            way_for_rows = {rows: way for way, counts in ways.items() for rows in counts}
            if "packed" in way_for_rows.values():
                m.packed_weight = _packed(m.weight)
                if m.packed_weight is None:
                    way_for_rows = {rows: way for rows, way in way_for_rows.items() if way != "packed"}
            if way_for_rows:
                m.way_for_rows = way_for_rows
                m.forward = types.MethodType(_fast_linear, m)
                _ROUTED[m.weight.data_ptr()] = weakref.ref(m)


def pack_for_graphs(model: nn.Module) -> bool:
    """Give every float nn.Linear of a model on the CPU a packed copy of its weights and route it, so that its products
    in compiled graphs run packed at every row count: in a compiled pass that was faster than each product's own
    measured way (SmolLM2 over 11 rows: 34.6 ms against 39.0), the choice inductor's freezing makes too. Only where
    the copies fit in half the free memory, as for speed_up's; returns whether they did (if not, graphs take the
    measured ways). Eager products keep their measured ways. The weights must not change afterwards."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
               and m.weight.dtype.is_floating_point and not hasattr(m, "_hf_hook")]
    unpacked = [m for m in linears if getattr(m, "packed_weight", None) is None]
    if not linears or sum({m.weight.data_ptr(): m.weight.nbytes for m in unpacked}.values()) >= _available_memory() / 2:
        return False
    copies = {m: _packed(m.weight) for m in unpacked}
    if any(copy is None for copy in copies.values()):
        return False  # this torch has no packed product for some weight: the graphs keep the measured ways
    for m in linears:
        if m in copies:
            m.packed_weight = copies[m]
        if not hasattr(m, "way_for_rows"):
            m.way_for_rows = {}  # eagerly, F.linear at every row count, as before
            m.forward = types.MethodType(_fast_linear, m)
        _ROUTED[m.weight.data_ptr()] = weakref.ref(m)
    return True


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0  # unknown: no packed copies


def _plain_cpu_linear(m: nn.Module) -> bool:
    # Exactly nn.Linear: quantised layers (bitsandbytes) subclass it but hold packed weights. Layers
    # accelerate dispatched have a hooked forward of their own, which must stay. A layer routed already
    # (the target's LM head, which a drafter shares) keeps its choice rather than being measured again.
    return (type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype.is_floating_point
            and m.weight.numel() >= MIN_WEIGHTS and not hasattr(m, "_hf_hook") and not hasattr(m, "way_for_rows"))


def cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_identity() -> str:
    """What the measured costs depend on: the processor's architecture, name, generation and instruction
    sets. The name alone is not enough: a cloud VM's is often generic ("AMD EPYC" on both an AVX2 host and
    an AVX-512 one here, whose products and passes cost differently)."""
    fields = cpuinfo()
    flags = hashlib.sha256(fields.get("flags", "").encode()).hexdigest()[:12]
    generation = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return f"{platform.machine()} {fields.get('model name') or platform.processor()} {generation} flags {flags}"
