"""Our drafter against DeepSpec's own code: the same checkpoints must propose the same tokens,
round after round, with the same confidences (tests/data/deepspec_reference/README.md)."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from dspark_chat.engine.decode import decode
from dspark_chat.engine.loading import load_drafter
from .conftest import REFERENCE, Forcing, assert_rounds_match

VARIANTS = ["dspark", "dspark_gated", "dspark_rnn", "dflash"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_proposals_match_deepspec(variant, tiny_target, reference):
    drafter = load_drafter(str(REFERENCE / variant), tiny_target, int8=False)  # float, as DeepSpec runs it
    for run in reference["runs"][variant]:
        prompt = reference["prompts"][run["prompt_index"]]
        tiny_target.rewind(0)
        drafter.rewind(0)
        steps = list(decode(tiny_target, drafter, prompt, max_new_tokens=48))[1:]
        assert_rounds_match(steps, run)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forced_rounds_match_deepspec(variant, tiny_target, reference):
    """Rounds that accept 0..7 drafts: the drafter's context cache must grow and crop as DeepSpec's."""
    drafter = load_drafter(str(REFERENCE / variant), tiny_target, int8=False)  # float, as DeepSpec runs it
    for run, greedy in zip(reference["forced_runs"][variant], reference["baseline_output_ids_extended"]):
        prompt = reference["prompts"][run["prompt_index"]]
        tiny_target.rewind(0)
        drafter.rewind(0)
        forcing = Forcing(drafter, len(prompt), greedy, reference["forced_run_schedule"])
        steps = list(islice(decode(tiny_target, forcing, prompt, max_new_tokens=48), 1 + len(run["rounds"])))[1:]
        for own, step, theirs in zip(forcing.own, steps, run["rounds"]):
            assert own == theirs["draft_ids"], f"round {theirs['round']}"
            assert step.accepted == theirs["accepted"]
        assert len(steps) == len(run["rounds"])
        for step, theirs in zip(steps, run["rounds"]):
            if theirs["confidence_logits"] is not None:
                expected = torch.sigmoid(torch.tensor(theirs["confidence_logits"])).tolist()
                assert step.confidences == pytest.approx(expected, abs=1e-4)
