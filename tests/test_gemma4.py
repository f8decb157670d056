"""Gemma 4 drafters (DeepSpec's Gemma4DSparkModel) against DeepSpec's own code, on a tiny random Gemma 4
target whose sliding-window layers are shorter than the runs (tests/data/deepspec_reference_gemma4/README.md)."""

from __future__ import annotations

import copy
import json
import shutil
from itertools import islice

import pytest
import torch

from dspark_chat.engine.decode import decode
from dspark_chat.engine.dspark_gemma4 import Gemma4DSparkDrafter, ScaledEmbedding
from dspark_chat.engine.loading import LoadError, load_drafter, load_target

from .conftest import DATA, REFERENCE, Forcing

GEMMA4 = DATA / "deepspec_reference_gemma4"
VARIANTS = ["dspark", "dflash"]


@pytest.fixture(scope="session")
def gemma4_target(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("gemma4") / "target"
    shutil.copytree(GEMMA4 / "target", folder)
    tokenizer.save_pretrained(folder)
    return load_target(str(folder), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def gemma4_reference() -> dict:
    return json.loads((GEMMA4 / "expected.json").read_text())


def fresh(target, drafter=None):
    target.rewind(0)
    if drafter is not None:
        drafter.rewind(0)


def test_the_target_is_the_multimodal_gemma4_and_sizes_come_from_its_text_config(gemma4_target):
    assert type(gemma4_target.model).__name__ == "Gemma4ForConditionalGeneration"
    assert (gemma4_target.num_layers, gemma4_target.hidden_size, gemma4_target.vocab_size) == (4, 64, 512)
    assert gemma4_target.model.config.get_text_config().sliding_window == 16


@pytest.mark.parametrize("variant", VARIANTS)
def test_proposals_match_deepspec(variant, gemma4_target, gemma4_reference):
    drafter = load_drafter(str(GEMMA4 / variant), gemma4_target, int8=False)  # float, as DeepSpec runs it
    assert isinstance(drafter, Gemma4DSparkDrafter)
    for run in gemma4_reference["runs"][variant]:
        prompt = gemma4_reference["prompts"][run["prompt_index"]]
        fresh(gemma4_target, drafter)
        steps = list(decode(gemma4_target, drafter, prompt, max_new_tokens=48))[1:]
        assert len(steps) >= len(run["rounds"])
        for ours, theirs in zip(steps, run["rounds"]):
            assert ours.draft_ids == theirs["draft_ids"], f"round {theirs['round']}"
            assert ours.accepted == theirs["accepted"]
            if theirs["confidence_logits"] is not None:
                expected = torch.sigmoid(torch.tensor(theirs["confidence_logits"])).tolist()
                assert ours.confidences == pytest.approx(expected, abs=1e-4)
        produced = [t for s in steps for t in s.token_ids]
        assert produced[: len(run["output_ids"]) - 1] == run["output_ids"][1:]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forced_rounds_match_deepspec(variant, gemma4_target, gemma4_reference):
    """Rounds that accept 0..7 drafts, past the target's sliding window: both caches crop as DeepSpec's."""
    drafter = load_drafter(str(GEMMA4 / variant), gemma4_target, int8=False)  # float, as DeepSpec runs it
    schedule = gemma4_reference["forced_run_schedule"]
    for run, greedy in zip(gemma4_reference["forced_runs"][variant], gemma4_reference["baseline_output_ids_extended"]):
        prompt = gemma4_reference["prompts"][run["prompt_index"]]
        fresh(gemma4_target, drafter)
        forcing = Forcing(drafter, len(prompt), greedy, schedule)
        steps = list(islice(decode(gemma4_target, forcing, prompt, max_new_tokens=48), 1 + len(run["rounds"])))[1:]
        assert len(steps) == len(run["rounds"])
        for own, step, theirs in zip(forcing.own, steps, run["rounds"]):
            assert own == theirs["draft_ids"], f"round {theirs['round']}"
            assert step.accepted == theirs["accepted"]
            if theirs["confidence_logits"] is not None:
                expected = torch.sigmoid(torch.tensor(theirs["confidence_logits"])).tolist()
                assert step.confidences == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_block_logits_match_deepspec(variant, gemma4_target, gemma4_reference):
    """The soft-capped logits themselves, not just their argmax: scaled embeddings, norms, RoPE, layer scalars."""
    drafter = load_drafter(str(GEMMA4 / variant), gemma4_target, int8=False)  # float, as DeepSpec runs it
    for run in gemma4_reference["runs"][variant]:
        prompt = gemma4_reference["prompts"][run["prompt_index"]]
        fresh(gemma4_target, drafter)
        logits, features = gemma4_target.forward(prompt, drafter.feature_layers)
        drafter.observe(features)
        anchor = torch.tensor(run["rounds"][0]["current_token"])
        with torch.inference_mode():
            base = drafter.logits(drafter.backbone(anchor))
        first = run["first_round"]
        torch.testing.assert_close(base[:, :8], torch.tensor(first["base_logits_head"]), atol=1e-4, rtol=0)
        torch.testing.assert_close(base.max(-1).values, torch.tensor(first["base_logits_max"]), atol=1e-4, rtol=0)
        assert base.argmax(-1).tolist() == first["base_top1"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_speculative_output_equals_the_baseline(variant, gemma4_target, gemma4_reference):
    drafter = load_drafter(str(GEMMA4 / variant), gemma4_target)
    for prompt, baseline in zip(gemma4_reference["prompts"], gemma4_reference["baseline_output_ids_extended"]):
        fresh(gemma4_target, drafter)
        forcing = Forcing(drafter, len(prompt), baseline, gemma4_reference["forced_run_schedule"])
        speculative = [t for s in decode(gemma4_target, forcing, prompt, max_new_tokens=48) for t in s.token_ids]
        fresh(gemma4_target)
        plain = [t for s in decode(gemma4_target, None, prompt, max_new_tokens=48) for t in s.token_ids]
        assert speculative == plain == baseline


def test_rewinding_past_the_sliding_window_rebuilds_the_cache(gemma4_target, gemma4_reference):
    """A new turn that edits text older than the window: the sliding layers no longer hold it."""
    drafter = load_drafter(str(GEMMA4 / "dspark"), gemma4_target)
    prompt, baseline = gemma4_reference["prompts"][1], gemma4_reference["baseline_output_ids_extended"][1]
    fresh(gemma4_target, drafter)
    list(decode(gemma4_target, drafter, prompt, max_new_tokens=40))
    length = len(prompt) + 10
    drop = len(gemma4_target.cached_ids) - length
    sliding = gemma4_target.cache.layers[0]
    assert sliding.is_sliding and sliding.keys.shape[-2] < sliding.sliding_window - 1 + drop
    gemma4_target.rewind(length)
    assert gemma4_target.cached_ids == prompt + baseline[:10]
    logits, _ = gemma4_target.forward(baseline[10:16])
    fresh(gemma4_target)
    expected, _ = gemma4_target.forward(prompt + baseline[:16])
    torch.testing.assert_close(logits, expected[-6:], atol=1e-5, rtol=0)
    assert logits.argmax(-1).tolist() == baseline[11:17]


def test_the_targets_embeddings_and_head_are_shared(gemma4_target):
    drafter = load_drafter(str(GEMMA4 / "dspark"), gemma4_target)
    assert drafter.embed_tokens is gemma4_target.model.get_input_embeddings()
    assert drafter.lm_head is gemma4_target.model.get_output_embeddings()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_unshared_embedding_is_scaled_as_the_targets(gemma4_target, dtype):
    theirs = copy.deepcopy(gemma4_target.model.get_input_embeddings()).to(dtype)
    ours = ScaledEmbedding(*theirs.weight.shape).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
    ids = torch.tensor([0, 3, 77, 511])
    with torch.inference_mode():
        assert torch.equal(ours(ids), theirs(ids))


def test_a_gemma4_drafter_with_a_qwen3_target_is_refused(tiny_target):
    with pytest.raises(LoadError, match="is a Gemma4DSparkModel, made for Gemma 4 targets; target .* is a qwen3 model: not a pair"):
        load_drafter(str(GEMMA4 / "dspark"), tiny_target)


def test_a_qwen3_drafter_with_a_gemma4_target_is_refused(gemma4_target):
    with pytest.raises(LoadError, match="is a Qwen3DSparkModel, made for targets other than Gemma 4; target .* is a gemma4_text model"):
        load_drafter(str(REFERENCE / "dspark"), gemma4_target)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"global_head_dim": None}, "lacks 'global_head_dim', which Gemma4DSparkModel reads"),
        ({"enable_moe_block": True}, "enable_moe_block is set, but Gemma4DSparkModel layers have no MoE block"),
        ({"hidden_size_per_layer_input": 256}, "hidden_size_per_layer_input is set"),
        ({"num_global_key_value_heads": None}, "attention_k_eq_v is set without num_global_key_value_heads"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}}, "must have rope_type default or proportional"),
        ({"target_layer_ids": [-1, 1, 3]}, "target_layer_id 3 names the target's last layer"),
    ],
)
def test_unsupported_gemma4_configs_are_refused(gemma4_target, tmp_path, changes, message):
    folder = tmp_path / "drafter"
    shutil.copytree(GEMMA4 / "dspark", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None or k not in changes}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=message):
        load_drafter(str(folder), gemma4_target)
