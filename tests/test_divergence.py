"""When two greedy outputs part: a near-tie within the dtype's rounding, or a real mismatch."""

from __future__ import annotations

import pytest
import torch

from dspark_chat.engine.decode import decode
from dspark_chat.engine.divergence import explain_divergence, rounding_tolerance
from dspark_chat.engine.loading import load_target
from dspark_chat.engine.sampling import Sampling


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_near_tie_and_mismatch_are_told_apart(tiny_target_dir, reference, dtype):
    target = load_target(str(tiny_target_dir), dtype, "cpu")
    prompt = reference["prompts"][1]
    a = [t for s in decode(target, None, prompt, Sampling(), 12) for t in s.token_ids]
    chosen = a[5]
    twin = next(t for t in range(4, 512) if t not in a)
    # Give another token exactly the chosen token's output row: their logits tie everywhere.
    head = target.model.get_output_embeddings().weight
    with torch.no_grad():
        head[twin] = head[chosen]

    tie = explain_divergence(target, prompt, a, a[:5] + [twin] + a[6:])
    assert tie.position == 5 and tie.margin == 0.0 and tie.near_tie
    assert "near-tie within the dtype's precision" in tie.describe()

    logits = target.model(input_ids=torch.tensor([prompt + a[:5]])).logits[0, -1]
    worst = int(logits.argmin())
    bug = explain_divergence(target, prompt, a, a[:5] + [worst])
    assert bug.position == 5 and not bug.near_tie and bug.margin > bug.tolerance
    assert "a real mismatch" in bug.describe()

    assert explain_divergence(target, prompt, a, a[:7]) is None


def test_tolerance_follows_the_dtype():
    logits = torch.tensor([20.0, 3.0])
    assert rounding_tolerance(logits, torch.bfloat16) == pytest.approx(8 * 2**-7 * 16)
    assert rounding_tolerance(logits, torch.float32) == pytest.approx(8 * 2**-23 * 16)
