"""Confidence-scheduled verification: how many of the drafted tokens the target should check.

Modes:
  off        verify every drafted token.
  threshold  verify up to (not including) the first position whose confidence is below a threshold.
  auto       the hardware-aware prefix scheduler (DSpark, Algorithm 1, one request): admit positions
             left to right while the expected tokens per second, (1 + a_1 + ... + a_l) * SPS(1 + l),
             keeps rising, with a_k = c_1 * ... * c_k and SPS(B) the measured verify passes per second
             for B tokens; stop at the first position that does not raise it. Where SPS is not
             monotone (CPUs), position k is admitted when some longer pass, counting the positions
             after k as likely as k, beats stopping before k.
Both confidence rules look at c_1..c_k only to decide on position k, and c_k depends on the drafts
before k, never on x_k itself: the decision is independent of the token it admits, which keeps
rejection sampling exact.

Drafters without a confidence head (prompt lookup, DFlash) are verified in full, except in auto mode:
there the acceptance probabilities are learned from the engine's past rounds (AcceptanceModel) and the
count is the full argmax of the same expected throughput. That decision reads past rounds and the
proposal's metadata only, never how this round's drafts fare, so it is as lossless as a fixed count.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cpu_linear import cpu_identity

MODES = ("off", "threshold", "auto")
clock = time.perf_counter  # what measure_sps times passes with (tests replace it)


@dataclass
class AcceptanceModel:
    """P(draft k accepted | drafts 1..k-1 accepted) for drafters without a confidence head, learned
    online from the rounds the engine verified.

    A prompt lookup draft at position k continues a copy whose source matches the context's last
    `match + k - 1` tokens once the drafts before it are accepted, and that length predicts acceptance
    (SmolLM2 on HumanEval: 20% after a 1-token match, 64% after 3, about 90% from 8 on). So estimates
    are keyed by it, and one table serves every position. Other drafters key by position.

    Each key's estimate is the mean of Beta(1 + accepted, 1 + rejected): a new key starts at 1/2, which
    on a CPU is enough to verify one draft and start measuring. A key that stops being verified stops
    learning, so every `explore_every`-th time the first position left unverified has a given key, it is
    verified anyway (one more token: cheap); and counts are scaled down past `memory` verifications, so
    estimates follow the workload when it changes (a chat after a code edit)."""

    cap: int = 16  # match lengths from here on share one estimate
    explore_every: int = 16
    memory: int = 64
    counts: dict = field(default_factory=dict)  # key -> [accepted, verified]
    skipped: dict = field(default_factory=dict)  # key -> rounds it was the first position left unverified

    def key(self, match: int | None, k: int) -> tuple[str, int]:
        return ("position", min(k, self.cap)) if match is None else ("match", min(match + k - 1, self.cap))

    def probability(self, key: tuple[str, int]) -> float:
        accepted, verified = self.counts.get(key, (0, 0))
        return (accepted + 1) / (verified + 2)

    def verify_count(self, drafted: int, match: int | None, sps: list[float]) -> int:
        """The n in 0..drafted that maximises (1 + a_1 + ... + a_n) * SPS(1 + n), looking at every n:
        for prompt lookup the first position is the weakest, so throughput can fall, then rise."""
        survival, expected, best, chosen = 1.0, 1.0, sps[0], 0
        for k in range(1, drafted + 1):
            survival *= self.probability(self.key(match, k))
            expected += survival
            throughput = expected * sps[min(k, len(sps) - 1)]
            if throughput > best:
                best, chosen = throughput, k
        if chosen < drafted:
            key = self.key(match, chosen + 1)
            self.skipped[key] = self.skipped.get(key, 0) + 1
            if self.skipped[key] % self.explore_every == 0:
                return chosen + 1
        return chosen

    def observe(self, match: int | None, verified: int, accepted: int) -> None:
        """Position k was tried if the k - 1 before it were accepted."""
        for k in range(1, min(accepted + 1, verified) + 1):
            counts = self.counts.setdefault(self.key(match, k), [0.0, 0.0])
            counts[0] += k <= accepted
            counts[1] += 1
            if counts[1] > self.memory:
                counts[0], counts[1] = counts[0] * self.memory / counts[1], self.memory


@dataclass
class Scheduler:
    mode: str = "auto"
    threshold: float = 0.5
    sps: list[float] | None = None  # verify passes per second for B = 1, 2, ...; auto verifies every draft without it
    temperatures: list[float] | None = None  # per-position calibration (sequential temperature scaling)
    # Learned acceptance for drafters without a confidence head; copies made for one request share it.
    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown scheduler mode {self.mode!r}: use one of {', '.join(MODES)}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @property
    def weighs_confidences(self) -> bool:
        """Whether the count depends on the confidences, which must then be read before the pass."""
        return self.mode != "off"

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated P(accepted | all before accepted) per position, on the logits' device."""
        if self.temperatures:
            t = torch.tensor(self.temperatures[: len(logits)]).to(logits.device, non_blocking=True)
            t = torch.cat([t, t[-1:].expand(len(logits) - len(t))]) if len(t) < len(logits) else t
            logits = logits / t
        return torch.sigmoid(logits.float())

    def confidences(self, logits: torch.Tensor) -> list[float]:
        return self.calibrated(logits).tolist()

    def verify_count(self, drafted: int, confidences: list[float] | None, match: int | None = None) -> int:
        """How many of the drafted tokens to verify. `match` is the proposal's prompt lookup match length."""
        if self.mode == "off" or drafted == 0:
            return drafted
        if confidences is None:
            if self.mode == "auto" and self.sps:
                return self.acceptance.verify_count(drafted, match, self.sps)
            return drafted
        if self.mode == "threshold":
            return next((k for k, c in enumerate(confidences) if c < self.threshold), drafted)
        if not self.sps:
            return drafted  # no profile measured yet: every pass costs the same, as on a GPU
        survival, expected, admitted = 1.0, 1.0, 0
        for k, c in enumerate(confidences[:drafted], start=1):
            if self._best_ahead(k, drafted, c, survival, expected) <= expected * self._rate(k - 1):
                break
            survival *= c
            expected += survival
            admitted = k
        return admitted

    def _rate(self, drafts: int) -> float:
        return self.sps[min(drafts, len(self.sps) - 1)]

    def _best_ahead(self, k: int, drafted: int, c: float, survival: float, expected: float) -> float:
        """The best expected rate of verifying k..m drafts, m = k..drafted, with positions after k
        assumed as likely as k. m = k is the one-step rule's rate, so every position that rule admits
        is admitted here too; beyond it, a CPU's rate is not monotone (SmolLM2 in float32 runs 4-token
        passes faster than 2-token ones), and a pass over more drafts may be the cheaper one. It reads
        c_1..c_k only, so the decision on k stays independent of x_k."""
        best = 0.0
        for m in range(k, drafted + 1):
            survival *= c
            expected += survival
            best = max(best, expected * self._rate(m))
        return best

    def observe(self, confidences: list[float] | None, match: int | None, verified: int, accepted: int) -> None:
        """Learn from a verified round of a drafter without a confidence head (auto mode only)."""
        if self.mode == "auto" and confidences is None and verified:
            self.acceptance.observe(match, verified, accepted)


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
    return _sps(pass_times(target, max_tokens, context, repeats))


class Interrupted(Exception):
    """A measurement given up because something more urgent came (a request for the server's worker)."""


def pass_times(target, max_tokens: int, context: int = 64, repeats: int = 5, interrupted=None) -> list[list[float]]:
    """Seconds per verify pass over B = 1..max_tokens tokens, `repeats` sweeps over B (interleaved, so
    a disturbance spreads over every B rather than landing on one). `interrupted()` is asked before
    every pass; when it says yes, the measurement stops with Interrupted. The target's cache is left empty."""
    ids = [(i * 7919) % target.vocab_size for i in range(context + max_tokens)]
    target.rewind(0)
    times: list[list[float]] = [[] for _ in range(max_tokens)]
    try:
        target.forward(ids[:context], last_only=True)
        for rep in range(repeats + 1):  # the first sweep warms up and is not counted
            for b in range(1, max_tokens + 1):
                if interrupted is not None and interrupted():
                    raise Interrupted
                _sync(target.device)
                t = clock()
                target.forward(ids[context : context + b])
                _sync(target.device)
                if rep:
                    times[b - 1].append(clock() - t)
                target.rewind(context)
    finally:
        target.rewind(0)
    return times


def disturbance(times: list[list[float]], spread: float = 0.2, rise: float = 1.0) -> str | None:
    """Why a measurement looks disturbed by other work on the machine, or None if it looks sound.
    On a quiet machine repeats of one pass agree within a few percent (one outlier per B is let
    through: the profile takes the fastest pass), and a pass over more tokens is not more than twice as fast
    as one over fewer: CPU kernels make steps up (SmolLM2 in float32 with the transposed products of
    cpu_linear.py runs B=4 51% faster than B=3), contention makes bigger ones."""
    for b, t in enumerate(times, 1):
        slow = sorted(t)[-2] if len(t) > 2 else max(t)
        if slow > min(t) * (1 + spread):
            return f"repeats of the B={b} pass differ by {slow / min(t) - 1:.0%}"
    return _implausible(_sps(times), rise)


def _implausible(sps: list[float], rise: float = 1.0) -> str | None:
    for b in range(1, len(sps)):
        if sps[b] > min(sps[:b]) * (1 + rise):
            return f"B={b + 1} measured {sps[b] / min(sps[:b]) - 1:.0%} faster than a smaller B"
    return None


@dataclass
class Profile:
    """A measured SPS profile. `noisy`: no measurement of it settled (other work kept disturbing the
    passes), so it holds each B's fastest rate over all its measurements, the best estimate there is,
    since disturbance only ever slows a pass; it is measured again, and replaced once a measurement settles.
    The profile only decides how many drafts are verified, never which tokens come out."""

    sps: list[float]
    noisy: bool = False


def _profile_path(target, max_tokens: int, cache: Path) -> tuple[Path, str]:
    import transformers

    key = json.dumps([target.name, device_identity(target.device), str(target.dtype), torch.__version__, transformers.__version__, max_tokens,
                      getattr(target, "cpu_linear", {}), getattr(target, "attention", None)])
    return cache / "sps" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json"), key


def cached_profile(target, max_tokens: int, cache: Path) -> Profile | None:
    """The cached profile of this model, device, dtype and library versions, if there is one."""
    path, _ = _profile_path(target, max_tokens, cache)
    try:
        saved = json.loads(path.read_text())
        profile = Profile(saved["sps"], saved.get("noisy", False))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # Older versions cached whatever they measured: an implausible profile not marked noisy is measured again.
    return profile if profile.noisy or _implausible(profile.sps) is None else None


def measure_profile(target, max_tokens: int, cache: Path, attempts: int = 3, repeats: int = 5, interrupted=None) -> Profile:
    """Measure the profile (a few seconds on a quiet machine) and cache it. A measurement that looks
    disturbed is retaken; one that stays disturbed is cached as noisy, merged with the noisy one cached
    before. Raises Interrupted when `interrupted()` says so between passes (nothing is cached then)."""
    path, key = _profile_path(target, max_tokens, cache)
    profiles = []
    for _ in range(attempts):
        times = pass_times(target, max_tokens, repeats=repeats, interrupted=interrupted)
        problem = disturbance(times)
        profiles.append(_sps(times))
        if problem is None:
            return _save(path, key, Profile(profiles[-1]))
    before = cached_profile(target, max_tokens, cache)
    if before is not None and before.noisy:
        profiles.append(before.sps)
    print(f"warning: the verify speed profile of {target.name} looks disturbed by other work on this machine "
          f"({problem}); caching each pass's fastest rate, marked noisy, to be measured again", file=sys.stderr)
    # Disturbance only slows passes down: the fastest rate seen for each B is the best guess.
    return _save(path, key, Profile([max(rates) for rates in zip(*profiles)], noisy=True))


def _save(path: Path, key: str, profile: Profile) -> Profile:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": json.loads(key), "sps": profile.sps, "noisy": profile.noisy}))
    tmp.replace(path)
    return profile


def sps_profile(target, max_tokens: int, cache: Path) -> Profile:
    """The cached profile, or one measured now when there is none."""
    return cached_profile(target, max_tokens, cache) or measure_profile(target, max_tokens, cache)


def device_identity(device: torch.device) -> str:
    """What a measurement on this device depends on: a GPU's name, a CPU's identity (a home folder may be
    shared between machines, or a VM moved to another host)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_identity() if device.type == "cpu" else device.type


def _sps(times: list[list[float]]) -> list[float]:
    """Each B's fastest pass. Other work on the machine only ever adds time, and on a shared machine it
    adds it often: SmolLM2's one-token pass ran in 21-25 ms at best and a median of 22-38 ms within one
    minute here, enough for a median profile to rank a 6-token pass below a 5-token one by chance."""
    return [1.0 / min(t) for t in times]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
