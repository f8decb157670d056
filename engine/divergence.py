"""Telling a rounding near-tie from a bug when two greedy outputs of the same target part.

A pass over k tokens rounds differently from k one-token passes, so in bfloat16 a speculative and a
plain greedy text can part where the target's two best tokens are within rounding of each other.
Anywhere else a difference is a bug. This re-runs the target once, from scratch, on the shared
prefix and measures the top-2 logit margin where the texts part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .target import Target

# How many units in the last place of the largest logit still count as rounding: generous enough
# for the error that a few dozen layers accumulate, far below a real preference of the model.
ULPS = 8


@dataclass
class Divergence:
    position: int  # index in the generated tokens where the two outputs first differ
    token_a: int
    token_b: int
    margin: float  # |logit(token_a) - logit(token_b)| at that position, in a fresh pass
    tolerance: float  # what the dtype's rounding can explain
    near_tie: bool  # True: within rounding; False: a real mismatch (a bug)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        verdict = "a near-tie within the dtype's precision" if self.near_tie else "a real mismatch"
        return (f"outputs part at token {self.position} ({self.token_a} vs {self.token_b}): logit margin "
                f"{self.margin:.3g}, rounding tolerance {self.tolerance:.3g}: {verdict}")


def rounding_tolerance(logits: torch.Tensor, dtype: torch.dtype) -> float:
    largest = float(logits.abs().max())
    ulp = torch.finfo(dtype).eps * 2.0 ** torch.tensor(max(largest, 1e-30)).log2().floor().item()
    return ULPS * ulp


@torch.inference_mode()
def explain_divergence(target: Target, prompt_ids: list[int], a: list[int], b: list[int]) -> Divergence | None:
    """None when a and b agree (one may be a prefix of the other, e.g. a shorter budget)."""
    n = min(len(a), len(b))
    position = next((i for i in range(n) if a[i] != b[i]), None)
    if position is None:
        return None
    ids = torch.tensor([list(prompt_ids) + list(a[:position])], device=target.device)
    logits = target.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
    la, lb = float(logits[a[position]]), float(logits[b[position]])
    margin, tolerance = abs(la - lb), rounding_tolerance(logits, target.dtype)
    # Both tokens must also be (within rounding) the target's best: two equally wrong tokens are a bug.
    best_gap = float(logits.max()) - max(la, lb)
    return Divergence(position, a[position], b[position], margin, tolerance, margin <= tolerance and best_gap <= tolerance)
