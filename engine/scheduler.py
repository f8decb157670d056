"""Confidence-scheduled verification: how many of the drafted tokens the target should check.

Modes:
  off        verify every drafted token.
  threshold  verify up to (not including) the first position whose confidence is below a threshold.
  auto       the hardware-aware prefix scheduler (DSpark, Algorithm 1, one request): admit positions
             left to right while the expected tokens per second, (1 + a_1 + ... + a_l) * SPS(1 + l),
             keeps rising, with a_k = c_1 * ... * c_k and SPS(B) the measured verify passes per second
             for B tokens; stop at the first position that does not raise it.
Both confidence rules look at c_1..c_k only to decide on position k, and c_k depends on the drafts
before k, never on x_k itself: the decision is independent of the token it admits, which keeps
rejection sampling exact. Drafters without a confidence head are always verified in full.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MODES = ("off", "threshold", "auto")


@dataclass
class Scheduler:
    mode: str = "auto"
    threshold: float = 0.5
    sps: list[float] | None = None  # verify passes per second for B = 1, 2, ... tokens
    temperatures: list[float] | None = None  # per-position calibration (sequential temperature scaling)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown scheduler mode {self.mode!r}: use one of {', '.join(MODES)}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    def confidences(self, logits: torch.Tensor) -> list[float]:
        """Calibrated P(accepted | all before accepted) per position."""
        if self.temperatures:
            t = torch.tensor(self.temperatures[: len(logits)], device=logits.device)
            t = torch.cat([t, t[-1:].expand(len(logits) - len(t))]) if len(t) < len(logits) else t
            logits = logits / t
        return torch.sigmoid(logits.float()).tolist()

    def verify_count(self, drafted: int, confidences: list[float] | None) -> int:
        if self.mode == "off" or confidences is None or drafted == 0:
            return drafted
        if self.mode == "threshold":
            return next((k for k, c in enumerate(confidences) if c < self.threshold), drafted)
        if not self.sps:
            raise ValueError("the auto scheduler needs an SPS profile")
        survival, expected, best, admitted = 1.0, 1.0, self.sps[0], 0
        for k, c in enumerate(confidences[:drafted], start=1):
            survival *= c
            expected += survival
            throughput = expected * self.sps[min(k, len(self.sps) - 1)]
            if throughput <= best:
                break
            best, admitted = throughput, k
        return admitted


def load_calibration(path: Path) -> list[float]:
    """An STS calibration file: {"temperatures": [T_1, ..., T_block]}."""
    try:
        temps = json.loads(Path(path).read_text())["temperatures"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a calibration file with a 'temperatures' list ({e})") from e
    if not temps or not all(isinstance(t, (int, float)) and t > 0 for t in temps):
        raise ValueError(f"{path}: temperatures must be positive numbers, got {temps!r}")
    return [float(t) for t in temps]


def measure_sps(target, max_tokens: int, context: int = 64, repeats: int = 5) -> list[float]:
    """Verify passes per second for B = 1..max_tokens on the loaded target, after a context."""
    ids = [(i * 7919) % target.vocab_size for i in range(context + max_tokens)]
    target.rewind(0)
    target.forward(ids[:context], last_only=True)
    times: dict[int, list[float]] = {b: [] for b in range(1, max_tokens + 1)}
    for rep in range(repeats + 1):  # the first pass warms up and is not counted
        for b in times:
            _sync(target.device)
            t = time.perf_counter()
            target.forward(ids[context : context + b])
            _sync(target.device)
            if rep:
                times[b].append(time.perf_counter() - t)
            target.rewind(context)
    target.rewind(0)
    return [1.0 / statistics.median(times[b]) for b in times]


def sps_profile(target, max_tokens: int, cache: Path) -> list[float]:
    """The SPS profile from the cache, measured (a few seconds) when this model, device and dtype
    have none yet."""
    import transformers

    device = torch.cuda.get_device_name(target.device) if target.device.type == "cuda" else target.device.type
    key = json.dumps([target.name, device, str(target.dtype), torch.__version__, transformers.__version__, max_tokens])
    path = cache / "sps" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    if path.is_file():
        return json.loads(path.read_text())["sps"]
    sps = measure_sps(target, max_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": json.loads(key), "sps": sps}))
    tmp.replace(path)
    return sps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
