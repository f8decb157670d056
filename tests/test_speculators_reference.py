"""Our drafter against speculators' own model code: checkpoints written by speculators' save_pretrained
must propose, round after round, what its DSparkDraftModel / DFlashDraftModel propose for the same
context, with the same confidences (tests/data/speculators_reference/README.md)."""

from __future__ import annotations

import json
import shutil
from itertools import islice

import pytest
import torch

from dspark_chat.engine.decode import decode
from dspark_chat.engine.loading import load_drafter, load_target
from dspark_chat.engine.sampling import Sampling
from dspark_chat.engine.scheduler import Scheduler
from .conftest import DATA, SPECULATORS, Forcing, assert_rounds_match

EXPECTED = json.loads((SPECULATORS / "expected.json").read_text())
VARIANTS = list(EXPECTED["variants"])
BUDGET = EXPECTED["max_new_tokens"] + 8  # the reference's last round drafts a whole block: leave it room
# Unforced rounds accept almost nothing from these random drafters, one round per token: two of the four
# prompts (the shortest and the longest) keep that test cheap; the forced runs use all four.
PLAIN_PROMPTS = (0, 3)


@pytest.fixture(scope="module")
def targets(tiny_target, tmp_path_factory, tokenizer):
    """The reference targets by the verifier names the drafters give them."""
    gemma4 = tmp_path_factory.mktemp("gemma4") / "target"
    shutil.copytree(DATA / "deepspec_reference_gemma4" / "target", gemma4)
    tokenizer.save_pretrained(gemma4)
    return {"acme/tiny": tiny_target, "acme/tiny-gemma4": load_target(str(gemma4), dtype="float32", device="cpu")}


def test_the_reference_covers_every_layout():
    specs = [v["spec"] for v in EXPECTED["variants"].values()]
    dspark = [s for s in specs if s["kind"] == "dspark"]
    assert {s["sample_from_anchor"] for s in dspark} == {True, False} == {s["sample_from_anchor"] for s in specs if s["kind"] == "dflash"}
    assert {s["markov_head_type"] for s in dspark} == {"vanilla", "gated", "rnn"}
    assert {(s["enable_confidence_head"], s["confidence_head_with_markov"]) for s in dspark} == {(True, True), (True, False), (False, False)}
    assert {bool(s["draft_vocab"]) for s in specs} == {True, False}
    assert {s.get("sliding_window_non_causal", False) for s in specs if "sliding_window" in s} == {True, False}
    assert {v["verifier"] for v in EXPECTED["variants"].values()} == {"acme/tiny", "acme/tiny-gemma4"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_proposals_match_speculators(variant, targets):
    data = EXPECTED["variants"][variant]
    target = targets[data["verifier"]]
    drafter = load_drafter(str(SPECULATORS / variant), target, int8=False)  # float, as speculators runs it
    spec = data["spec"]
    assert drafter.layout == "speculators" and drafter.block_size == spec["block_size"] - (0 if spec["sample_from_anchor"] else 1)
    assert (drafter.draft_vocab is None) == (not spec["draft_vocab"])
    for i in PLAIN_PROMPTS:
        prompt, run = EXPECTED["prompts"][i], data["runs"][i]
        target.rewind(0)
        drafter.rewind(0)
        steps = list(decode(target, drafter, prompt, max_new_tokens=BUDGET))[1:]
        assert_rounds_match(steps, run)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forced_rounds_match_speculators(variant, targets):
    """Rounds that accept none to all of the drafts: the context cache must grow and crop as the context
    speculators' model saw, recomputed from scratch, and the confidences must agree."""
    data = EXPECTED["variants"][variant]
    target = targets[data["verifier"]]
    drafter = load_drafter(str(SPECULATORS / variant), target, int8=False)
    for prompt, greedy, run in zip(EXPECTED["prompts"], data["baseline_output_ids"], data["forced_runs"]):
        target.rewind(0)
        drafter.rewind(0)
        forcing = Forcing(drafter, len(prompt), greedy, EXPECTED["forced_run_schedule"])
        steps = list(islice(decode(target, forcing, prompt, max_new_tokens=BUDGET), 1 + len(run["rounds"])))[1:]
        assert len(steps) == len(run["rounds"])
        for own, step, theirs in zip(forcing.own, steps, run["rounds"]):
            assert own == theirs["draft_ids"], f"round {theirs['round']}"
            assert step.draft_ids == theirs["verify_ids"] and step.accepted == theirs["accepted"]
            if theirs["confidence_logits"] is None:
                assert step.confidences is None
            else:
                expected = torch.sigmoid(torch.tensor(theirs["confidence_logits"])).tolist()
                assert step.confidences == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_identity_in_every_layout(variant, targets):
    """The engine's default drafter (int8 on x86) under the auto scheduler, rounds forced to accept 0 to all
    drafts: the output is plain greedy decoding's."""
    data = EXPECTED["variants"][variant]
    target = targets[data["verifier"]]
    drafter = load_drafter(str(SPECULATORS / variant), target)
    scheduler = Scheduler(mode="auto", sps=[100.0, 90.0, 85.0, 80.0, 75.0, 70.0, 65.0, 60.0, 55.0])
    i = VARIANTS.index(variant) % len(EXPECTED["prompts"])
    prompt, greedy = EXPECTED["prompts"][i], data["baseline_output_ids"][i]
    target.rewind(0)
    drafter.rewind(0)
    forcing = Forcing(drafter, len(prompt), greedy, [3, 7, 0, 5, 1, 6, 2, 4])
    steps = list(decode(target, forcing, prompt, Sampling(), 40, scheduler))
    assert [t for s in steps for t in s.token_ids] == greedy[:40]
    assert any(s.accepted for s in steps[1:]) and any(s.verified > s.accepted for s in steps[1:])
