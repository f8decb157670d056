"""Sequential temperature scaling (STS) of a DSpark confidence head.

The scheduler multiplies confidences into prefix survival, a_k = c_1 * ... * c_k, and compares expected
tokens across lengths, so it needs calibrated absolute values. Per position k, c_k = sigmoid(z_k / T_k);
T_1, T_2, ... are fitted left to right, each with the ones before it fixed, so that a_k matches the observed
survival s_k (1 when the target accepted drafts 1..k) in the log-likelihood sense. The result is the file
the scheduler reads: {"temperatures": [T_1, ..., T_block]}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

GRID = torch.logspace(-3, 3, 481, base=2.718281828459045)  # T from e^-3 to e^3, in steps of 1.25%


def survival(logits: torch.Tensor, temperatures: list[float] | None = None) -> torch.Tensor:
    """Predicted prefix survival a [N, g] from confidence logits [N, g]."""
    t = torch.ones(logits.shape[1]) if temperatures is None else torch.tensor(temperatures)
    return torch.sigmoid(logits.float() / t).cumprod(-1)


def ece(predicted: torch.Tensor, observed: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error: per equal-width bin of prediction, |mean prediction - observed rate|,
    weighted by the bin's share of the pairs."""
    p, o = predicted.flatten().float(), observed.flatten().float()
    which = (p * bins).long().clamp(0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = which == b
        if chosen.any():
            error += float(chosen.float().mean() * (p[chosen].mean() - o[chosen].mean()).abs())
    return error


def fit_temperatures(logits: torch.Tensor, accepted: torch.Tensor) -> list[float]:
    """logits [N, g] confidence logits of N rounds; accepted [N, g] whether the target accepted each
    position's draft (positions after a rejection are ignored: survival is already 0 there)."""
    s = accepted.float().cumprod(-1)
    z = logits.float()
    before = torch.ones(z.shape[0])
    temperatures = []
    for k in range(z.shape[1]):
        a = (before[:, None] * torch.sigmoid(z[:, k, None] / GRID[None])).clamp(1e-6, 1 - 1e-6)  # [N, grid]
        nll = -(s[:, k, None] * a.log() + (1 - s[:, k, None]) * (1 - a).log()).mean(0)
        best = int(nll.argmin())
        temperatures.append(round(float(GRID[best]), 4))
        before = a[:, best]
    return temperatures


def fit_and_write(logits: torch.Tensor | None, accepted: torch.Tensor, path: Path) -> dict:
    """Fit on one half of the rounds, report ECE of prefix survival before and after on the other half,
    write the calibration file."""
    if logits is None:
        raise ValueError("the drafter has no confidence head to calibrate")
    order = torch.randperm(logits.shape[0], generator=torch.Generator().manual_seed(0))
    fit, held = order[::2], order[1::2]
    temperatures = fit_temperatures(logits[fit], accepted[fit])
    observed = accepted[held].float().cumprod(-1)
    report = {
        "temperatures": temperatures,
        "ece_before": round(ece(survival(logits[held]), observed), 4),
        "ece_after": round(ece(survival(logits[held], temperatures), observed), 4),
        "rounds": int(logits.shape[0]),
        "acceptance_by_position": [round(float(v), 4) for v in accepted.float().cumprod(-1).mean(0)],
    }
    Path(path).write_text(json.dumps(report, indent=1))
    return report
