"""Eagle3 drafters against DeepSpec's and speculators' own code (tests/data/eagle3_reference/README.md):
the same checkpoints must propose the same chains, round after round, also when rounds accept 0..7
drafts; and the refusals of a drafter that does not fit its target."""

from __future__ import annotations

import json
import shutil
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_chat.engine.decode import decode
from dspark_chat.engine.eagle3 import Eagle3Drafter
from dspark_chat.engine.loading import LoadError, load_drafter, load_target
from dspark_chat.engine.sampling import Sampling

from .conftest import EAGLE3, Forcing, drafter_copy

# (folder of the expected.json, drafter) -> whose code made the expected proposals
CASES = [("qwen3", "eagle3"), ("gemma4", "eagle3"), ("gemma4", "eagle3_kv"),
         ("speculators", "speculators_llama"), ("speculators", "speculators_qwen3")]
PLAIN_ROUNDS = 10


@pytest.fixture(scope="module")
def expected():
    return {family: json.loads((EAGLE3 / family / "expected.json").read_text()) for family in ("qwen3", "gemma4", "speculators")}


@pytest.fixture(scope="module")
def gemma4_target(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("eagle3-gemma4") / "target"
    shutil.copytree(EAGLE3 / "gemma4" / "target", out)
    tokenizer.save_pretrained(out)
    return load_target(str(out), dtype="float32", device="cpu")


@pytest.mark.parametrize("family,variant", CASES)
def test_proposals_match_the_reference_code(family, variant, expected, eagle3_target, request):
    """Plain runs (random drafters: nothing accepted) and forced runs (accepting 3, 7, 0, 5, ... drafts),
    every round's own proposal compared."""
    target = eagle3_target if family != "gemma4" else request.getfixturevalue("gemma4_target")
    reference = expected[family]
    drafter = load_drafter(str(EAGLE3 / family / variant), target, int8=False)  # float, as the references ran
    assert isinstance(drafter, Eagle3Drafter)
    greedy = reference.get("baseline_output_ids_extended") or reference["greedy_output_ids"]
    for forced in (False, True):
        # Plain rounds all accept nothing: the first rounds of two runs say what the rest would.
        runs = reference["forced_runs"][variant] if forced else reference["runs"][variant][:2]
        for run in runs:
            prompt = reference["prompts"][run["prompt_index"]]
            target.rewind(0)
            drafter.rewind(0)
            used = Forcing(drafter, len(prompt), greedy[run["prompt_index"]], reference["forced_run_schedule"]) if forced else drafter
            rounds = run["rounds"] if forced else run["rounds"][:PLAIN_ROUNDS]
            steps = list(islice(decode(target, used, prompt, max_new_tokens=64), 1 + len(rounds)))[1:]
            assert len(steps) == len(rounds)
            for i, (step, theirs) in enumerate(zip(steps, rounds)):
                own = used.own[i] if forced else step.draft_ids
                assert own == theirs["draft_ids"], f"{'forced' if forced else 'plain'} run {run['prompt_index']} round {i}"
                assert step.accepted == theirs["accepted"] and step.token_ids == theirs["committed"]


def test_deepspec_layer_ids_count_as_ours_and_speculators_ones_from_one(eagle3_target, expected):
    deepspec = load_drafter(str(EAGLE3 / "qwen3" / "eagle3"), eagle3_target, int8=False)
    assert deepspec.feature_layers == tuple(expected["qwen3"]["target_layer_ids"]) and deepspec.block_size == 7
    llama = load_drafter(str(EAGLE3 / "speculators" / "speculators_llama"), eagle3_target, int8=False)
    assert llama.feature_layers == (0, 2, 4) and llama.block_size == 5  # eagle_aux_hidden_state_layer_ids [1, 3, 5]
    assert llama.draft_vocab is not None and len(llama.draft_vocab) == 128


def test_speculators_default_layers_come_from_the_target(eagle3_target, tmp_path):
    """Without eagle_aux_hidden_state_layer_ids speculators reads [2, L // 2, L - 3] of an L-layer verifier."""
    folder = drafter_copy(tmp_path, "speculators_qwen3", EAGLE3 / "speculators", eagle_aux_hidden_state_layer_ids=None)
    assert load_drafter(str(folder), eagle3_target, int8=False).feature_layers == (1, 2, 2)


def test_a_new_request_reuses_the_drafter_context_it_can(eagle3_target, expected):
    """A follow-up prompt that shares a prefix with the last request (a chat's next turn, or an edit of
    an earlier turn): the drafter drops the cache entries whose next token changed, and proposes what a
    fresh drafter proposes."""
    drafter = load_drafter(str(EAGLE3 / "qwen3" / "eagle3"), eagle3_target, int8=False)
    first = expected["qwen3"]["prompts"][3]
    answer = [t for s in decode(eagle3_target, drafter, first, max_new_tokens=12) for t in s.token_ids]
    follow_ups = [first + answer + [7, 8, 9], first[:10] + [11, 12, 13, 14], first + answer[:5]]
    for prompt in follow_ups:
        kept = [s.draft_ids for s in decode(eagle3_target, drafter, prompt, max_new_tokens=10)]
        eagle3_target.rewind(0)
        drafter.rewind(0)
        fresh = [s.draft_ids for s in decode(eagle3_target, drafter, prompt, max_new_tokens=10)]
        assert kept == fresh


def test_rewinding_into_the_cache_gives_back_one_position(eagle3_target, expected):
    drafter = load_drafter(str(EAGLE3 / "qwen3" / "eagle3"), eagle3_target, int8=False)
    prompt = expected["qwen3"]["prompts"][2]
    eagle3_target.rewind(0)
    drafter.rewind(0)
    list(islice(decode(eagle3_target, drafter, prompt, max_new_tokens=8), 3))  # two proposals folded the context
    cached = drafter._cached
    assert drafter.rewind(cached + 1) == cached + 1  # only pending states dropped
    assert drafter.rewind(cached) == cached - 1  # entry cached - 1 paired with the token at `cached`
    assert drafter.rewind(1) == 0


def test_sampled_proposals_carry_the_distributions_they_were_drawn_from(eagle3_target, expected):
    """Every draft is drawn from its row of probs, over the target's vocabulary, zero outside a pruned one."""
    drafter = load_drafter(str(EAGLE3 / "speculators" / "speculators_llama"), eagle3_target, int8=False)
    prompt = expected["speculators"]["prompts"][1]
    eagle3_target.rewind(0)
    drafter.rewind(0)
    _, features = eagle3_target.forward(prompt, drafter.feature_layers)
    drafter.observe(features)
    ids = torch.tensor(prompt + [5])
    outside = torch.ones(512, dtype=torch.bool).index_fill_(0, drafter.draft_vocab.cpu(), False)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        proposal = drafter.propose(ids, 5, Sampling(0.9, top_k=20), g)
        assert proposal.probs.shape == (5, 512) and torch.allclose(proposal.probs.sum(-1), torch.ones(5))
        assert (proposal.probs[:, outside] == 0).all()
        assert (proposal.probs.gather(1, proposal.tokens[:, None]) > 0).all()
        assert ((proposal.probs > 0).sum(-1) <= 20).all()


def edited(tmp_path, family, variant, **changes):
    return drafter_copy(tmp_path, variant, EAGLE3 / family, **changes)


@pytest.mark.parametrize("family,variant,changes,message", [
    ("qwen3", "eagle3", {"vocab_size": 600}, "vocabulary size 600, target .* has 512"),
    ("qwen3", "eagle3", {"hidden_size": 32}, "hidden size 32, target .* has hidden size 64"),
    ("qwen3", "eagle3", {"target_layer_ids": [0, 1, 2, 3, 5]}, "target_layer_ids has 5, which names the target's last layer"),
    ("qwen3", "eagle3", {"target_layer_ids": [0, 1, 2, 3, 9]}, r"has 9, which is out of range; valid ids are -1\.\.4"),
    ("qwen3", "eagle3", {"num_hidden_layers": 2}, r"(?s)\(a Qwen3Eagle3Model\): .*`num_hidden_layers` \(2\) must be equal to the number of `layer_types` \(1\)"),
    ("speculators", "speculators_llama", {"eagle_aux_hidden_state_layer_ids": [1, 3, 6]},
     r"eagle_aux_hidden_state_layer_ids has 6, which names the target's last layer.*valid ids are 0\.\.5"),
    ("speculators", "speculators_llama", {"target_hidden_size": 128}, "target_hidden_size 128, target .* has hidden size 64"),
    ("speculators", "speculators_llama", {"draft_vocab_size": 100}, "draft_vocab_size is 100, but the checkpoint has a d2t of 128"),
    ("speculators", "speculators_llama", {"fc_norm": True}, "norm_before_fc and fc_norm are both set"),
])
def test_a_drafter_that_does_not_fit_is_refused_with_the_reason(family, variant, changes, message, eagle3_target, tmp_path):
    with pytest.raises(LoadError, match=message):
        load_drafter(str(edited(tmp_path, family, variant, **changes)), eagle3_target)


def test_a_deepspec_config_without_its_eagle3_fields_is_refused(eagle3_target, tmp_path):
    folder = edited(tmp_path, "qwen3", "eagle3")
    config = json.loads((folder / "config.json").read_text())
    del config["ttt_length"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="config.json lacks 'ttt_length', which Qwen3Eagle3Model reads"):
        load_drafter(str(folder), eagle3_target)


def test_speculators_layer_kinds_it_cannot_run_are_refused(eagle3_target, tmp_path):
    folder = edited(tmp_path, "speculators", "speculators_llama")
    config = json.loads((folder / "config.json").read_text())
    config["transformer_layer_config"]["model_type"] = "gpt_oss"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="its layers are 'gpt_oss'; Eagle3 drafters with llama or qwen3 layers are supported"):
        load_drafter(str(folder), eagle3_target)
    config["transformer_layer_config"] |= {"model_type": "llama", "layer_types": ["sliding_attention"], "sliding_window": 8}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="sliding-window layers"):
        load_drafter(str(folder), eagle3_target)


def test_a_damaged_draft_vocabulary_is_refused(eagle3_target, tmp_path):
    folder = edited(tmp_path, "speculators", "speculators_llama")
    weights = load_file(folder / "model.safetensors")
    weights["d2t"] = weights["d2t"].clone()
    weights["d2t"][1] = weights["d2t"][0] - 1  # draft ids 0 and 1 both map to one target id
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(LoadError, match="d2t does not map the draft vocabulary one-to-one"):
        load_drafter(str(folder), eagle3_target)
    weights = load_file(edited(tmp_path / "b", "speculators", "speculators_llama") / "model.safetensors")
    weights["t2d"] = weights["t2d"].roll(1)
    save_file(weights, tmp_path / "b" / "speculators_llama" / "model.safetensors")
    with pytest.raises(LoadError, match="t2d and d2t name different draft vocabularies"):
        load_drafter(str(tmp_path / "b" / "speculators_llama"), eagle3_target)


def test_a_gemma4_drafter_is_refused_for_another_target_and_the_reverse(eagle3_target, gemma4_target):
    with pytest.raises(LoadError, match="is a Gemma4Eagle3Model, made for Gemma 4 targets; target .* is a qwen3 model"):
        load_drafter(str(EAGLE3 / "gemma4" / "eagle3"), eagle3_target)
    with pytest.raises(LoadError, match="is a Qwen3Eagle3Model, made for targets other than Gemma 4"):
        load_drafter(str(EAGLE3 / "qwen3" / "eagle3"), gemma4_target)


def test_the_engine_runs_an_eagle3_drafter(eagle3_target_dir):
    from dspark_chat.engine.engine import Engine

    engine = Engine.load(str(eagle3_target_dir), str(EAGLE3 / "qwen3" / "eagle3"), dtype="float32", device="cpu",
                         scheduler="off")
    assert engine.describe().endswith("Eagle3 drafter, chain 7 in int8, scheduler off")
    steps = list(engine.generate([5, 6, 7, 8], max_new_tokens=6))
    plain = list(engine.generate([5, 6, 7, 8], max_new_tokens=6, speculative=False))
    assert [t for s in steps for t in s.token_ids] == [t for s in plain for t in s.token_ids]
    assert len(steps[1].draft_ids) == 4  # the chain stops where the 6-token budget would
