"""Hybrid targets (recurrent or convolution layers beside attention): speculative output is the target's own,
for every family whose states roll back exactly (engine/hybrid.py), across chat turns too; the others are
refused for speculation and still decode plainly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dspark_chat.engine.cli import main as cli
from dspark_chat.engine.decode import decode
from dspark_chat.engine.engine import Engine
from dspark_chat.engine.hybrid import SCANS, HybridStates
from dspark_chat.engine.loading import LoadError, load_drafter, load_target
from dspark_chat.engine.prompt_lookup import PromptLookupDrafter
from dspark_chat.engine.sampling import Sampling

from . import hybrids
from .conftest import REFERENCE, Forcing
from .test_lossless import RUNS, chi_square_pvalue, exact_distribution, sampled_counts
from .test_train import snippets

EXACT = [f for f in hybrids.FAMILIES if f in SCANS]
REFUSED = [f for f in hybrids.FAMILIES if f not in SCANS]
SCHEDULE = [3, 7, 0, 5, 1, 6, 2, 4]  # forced acceptances: every rollback length of a 7-draft block


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_family_is_covered():
    assert set(hybrids.FAMILIES) == set(SCANS) | {"jamba"} and REFUSED == ["jamba"]


@pytest.fixture(scope="session")
def hybrid_dir(tmp_path_factory, tokenizer):
    """family -> a saved tiny target of that family, made once per session."""
    folders = {}

    def get(family: str):
        if family not in folders:
            folders[family] = hybrids.save(family, tmp_path_factory.mktemp(family), tokenizer)
        return folders[family]

    return get


@pytest.fixture(scope="session")
def hybrid_target(hybrid_dir):
    targets = {}

    def get(family: str):
        if family not in targets:
            targets[family] = load_target(str(hybrid_dir(family)), "float32", "cpu")
        return targets[family]

    return get


def prompts() -> list[list[int]]:
    """A random prompt, and one that repeats itself so that prompt lookup drafts."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(4, 512, (9,), generator=g).tolist(), torch.randint(4, 512, (6,), generator=g).tolist() * 3]


def generated(target, drafter, prompt, max_new_tokens=32, fresh=True):
    if fresh:
        target.rewind(0)
        if drafter is not None:
            drafter.rewind(0)
    return [t for s in decode(target, drafter, prompt, Sampling(), max_new_tokens) for t in s.token_ids]


@torch.inference_mode()
def greedy_without_cache(model, prompt, max_new_tokens=32, stop=2):
    ids, out = list(prompt), []
    while len(out) < max_new_tokens and stop not in out:
        out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("family", EXACT)
def test_greedy_speculation_equals_plain_decoding(family, hybrid_target):
    target = hybrid_target(family)
    assert target.speculation_refusal is None
    drafter = load_drafter(str(REFERENCE / "dspark"), target)
    for prompt in prompts():
        baseline = generated(target, None, prompt)
        assert len(set(baseline)) >= 8  # greedy text that varies, so that a wrong state shows
        assert baseline == greedy_without_cache(target.model, prompt)  # the cache carries the state right
        assert generated(target, PromptLookupDrafter(), prompt) == baseline
        assert generated(target, drafter, prompt) == baseline
        assert generated(target, Forcing(drafter, len(prompt), baseline + [0] * 8, SCHEDULE), prompt) == baseline


@pytest.mark.parametrize("family", ["qwen3_next", "nemotron_h", "lfm2"])
def test_a_rollback_puts_every_layer_where_the_kept_tokens_alone_lead(family, hybrid_target, hybrid_dir):
    """A verify pass of 8 tokens, then rollbacks inside it (as a stop token among accepted drafts makes two):
    the next pass gives what plain decoding of the kept tokens gives (a state left after the rejected drafts
    is off by 0.1 to 4)."""
    target, plain = hybrid_target(family), load_target(str(hybrid_dir(family)), "float32", "cpu")
    prompt, drafts = prompts()[0], [11, 22, 33, 44, 55, 66, 77, 88]
    for keeps in ([8], [3], [0], [5, 2]):
        target.rewind(0)
        target.forward(prompt, last_only=True)
        target.forward(drafts)
        for keep in keeps:
            target.rewind(len(prompt) + keep)
        plain.rewind(0)
        plain.forward(prompt, last_only=True)
        for token in drafts[: keeps[-1]] + [99]:
            logits, _ = plain.forward([token])
        assert torch.allclose(target.forward([99])[0], logits, atol=1e-4)
        assert_the_cache_follows(target)


def assert_the_cache_follows(target):
    """The cache's own count of positions is the tokens kept (from transformers 5.25 layer 0's, a stateful layer's
    here), and past recording holds no recurrent states beyond the live ones (5.25 adds one before every pass)."""
    assert target.cache.get_seq_length() == target.log.length
    assert not any(h for layer in target.hybrid.layers for h in getattr(layer, "recurrent_states_history", {}).values())


@pytest.mark.parametrize("family", ["qwen3_5_text", "jamba"])
def test_the_auto_scheduler_profiles_a_hybrid(family, hybrid_target):
    """The profile times passes of 1..B tokens, each rolled back to the same context (to the checkpoint after the
    context for one-token passes, which keep no per-position states; Jamba runs the context again)."""
    from dspark_chat.engine.scheduler import measure_sps

    target = hybrid_target(family)
    prompt = prompts()[0]
    before = generated(target, None, prompt, 12)
    assert len(measure_sps(target, 4, repeats=1)) == 4
    assert generated(target, None, prompt, 12) == before


def test_the_identity_check_catches_recurrent_states_left_after_the_rejected_drafts(hybrid_target, monkeypatch):
    """What main did: keys and values cropped, the recurrent states left as the verify pass left them."""
    target = hybrid_target("qwen3_next")
    drafter = load_drafter(str(REFERENCE / "dspark"), target)
    monkeypatch.setattr(HybridStates, "drop", lambda self, drop: None)
    prompt = prompts()[0]
    baseline = generated(target, None, prompt)
    with pytest.raises((AssertionError, RuntimeError)):
        assert generated(target, Forcing(drafter, len(prompt), baseline + [0] * 8, SCHEDULE), prompt) == baseline


def chat_turns(target, drafter, turns, max_new_tokens=16):
    """A conversation: each prompt is the last one, its answer, then the next turn's text; the cache is reused.
    `edit` replaces the previous answer's last tokens, as a chat template that rewrites old answers does."""
    context, answers = [], []
    for text, edit in turns:
        if edit:
            context = context[:-edit] + [7] * edit
        context = context + text
        answer = generated(target, drafter, context, max_new_tokens, fresh=False)
        answers.append(answer)
        context = context + answer
    return answers


@pytest.mark.parametrize("family", ["qwen3_5_text", "bamba", "lfm2", "jamba"])
def test_chat_turns_reuse_the_cache_and_match_fresh_plain_decoding(family, hybrid_target, monkeypatch):
    """Turns that extend the conversation, edit the last answer (back to the checkpoint after the prompt), and
    edit the previous prompt (rebuilt from nothing): each answer equals plain decoding from an empty cache."""
    target = hybrid_target(family)
    restored = []
    restore = HybridStates.restore_checkpoint
    monkeypatch.setattr(HybridStates, "restore_checkpoint", lambda self: restored.append(1) or restore(self))
    g = torch.Generator().manual_seed(3)
    turns = [(torch.randint(4, 512, (n,), generator=g).tolist(), edit) for n, edit in ((8, 0), (5, 0), (6, 10), (4, 40))]
    drafter = None
    if target.speculation_refusal is None:
        drafter = Forcing(load_drafter(str(REFERENCE / "dspark"), target), 0, [], SCHEDULE)
    target.rewind(0)
    answers = chat_turns(target, drafter, turns) if drafter is None else None
    # Plain decoding from an empty cache for each turn's whole prompt.
    expected, context = [], []
    for (text, edit), answer in zip(turns, answers or [None] * len(turns)):
        if edit:
            context = context[:-edit] + [7] * edit
        context = context + text
        expected.append(generated(target, None, context, 16))
        context = context + expected[-1]
    if drafter is None:
        assert answers == expected
        assert not restored  # Jamba cannot continue a multi-token pass: every such pass runs the context again
        return
    # With speculation, forced to accept the target's own tokens at every length.
    target.rewind(0)
    drafter.drafter.rewind(0)
    context = []
    for (text, edit), want in zip(turns, expected):
        if edit:
            context = context[:-edit] + [7] * edit
        context = context + text
        drafter.prompt_len, drafter.greedy = len(context), want + [0] * 8
        assert generated(target, drafter, context, 16, fresh=False) == want
        assert_the_cache_follows(target)
        context = context + want
    assert restored == [1]  # the edit of the last answer went back to the checkpoint, the other rebuilt


@pytest.mark.parametrize("family", REFUSED)
def test_speculation_is_refused_where_states_cannot_be_rolled_back(family, hybrid_dir, hybrid_target):
    folder = str(hybrid_dir(family))
    for asked in (dict(prompt_lookup=True), dict(drafter=str(REFERENCE / "dspark"))):
        with pytest.raises(LoadError, match="selective scan.*--no-spec"):
            Engine.load(folder, dtype="float32", device="cpu", scheduler="off", **asked)
    target = hybrid_target(family)
    with pytest.raises(ValueError, match="would not give the model's own text"):
        generated(target, PromptLookupDrafter(), prompts()[1])
    # Plain decoding still runs, with no drafter by default, and gives the model's greedy text.
    engine = Engine.load(folder, dtype="float32", device="cpu", scheduler="off")
    assert engine.drafter is None
    ids = [t for s in engine.generate(prompts()[0], max_new_tokens=16) for t in s.token_ids]
    assert ids == greedy_without_cache(target.model, prompts()[0], 16)


def test_speculative_sampling_on_a_hybrid_matches_the_target_distribution(tmp_path, tokenizer):
    """RUNS (400, tests/test_lossless.py's reasoning) runs: p is 0.97 here. Recurrent states left after the rejected
    drafts add 0.68 per run to the statistic (measured over 400 and 600 runs): p 8e-51 at 400 runs, a chance below
    1e-26 that they pass p > 1e-3; the broken acceptance rule adds 0.22 (p 3e-14)."""
    target = load_target(str(hybrids.save("qwen3_5_text", tmp_path / "target", tokenizer, vocab_size=4)), "float32", "cpu")
    target.stop_ids = ()  # with four tokens, the end-of-text id 2 would cut sequences short
    drafter = load_drafter(str(hybrids.save_drafter(tmp_path / "drafter", vocab_size=4)), target)
    sampling, prefix, length, runs = Sampling(1.0), [1, 3, 0], 3, RUNS
    exact = exact_distribution(target, prefix, length, sampling)
    verified = []
    counts = sampled_counts(target, drafter, prefix, length, sampling, runs, verified=verified)
    assert chi_square_pvalue(counts, exact, runs) > 1e-3
    assert max(verified) >= 2  # rounds verified several drafts, so rollbacks ran


def test_a_drafter_trains_on_a_hybrid_target_and_decodes_losslessly(hybrid_dir, hybrid_target, tmp_path):
    """Qwen3.5-MoE: Gated DeltaNet layers, and experts only (the drafter's MLP takes the width a token passes
    through). The answers training caches are the target's own greedy answers."""
    family = "qwen3_5_moe_text"
    target = hybrid_target(family)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"turns": [s]}) + "\n" for s in snippets(0, 12)))
    out, cache = tmp_path / "drafter", tmp_path / "cache"
    assert cli(["train", "--target", str(hybrid_dir(family)), "--prompts", str(prompts_file), "--out", str(out),
                "--steps", "4", "--layers", "1", "--block-size", "4", "--markov-rank", "8", "--max-new-tokens", "12",
                "--gen-batch", "6", "--batch", "4", "--anchors", "4", "--cache-dir", str(cache), "--device", "cpu"]) == 0
    config = json.loads((out / "config.json").read_text())  # train writes the speculators format: 1-based layer ids
    assert config["transformer_layer_config"]["intermediate_size"] == 2 * 32 + 32 and config["aux_hidden_state_layer_ids"] == [2, 3]
    answered = 0
    for shard in sorted(cache.rglob("shard-*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in [k for k in f.keys() if k.endswith(".ids")]:
                ids, prompt_len = f.get_tensor(key).tolist(), int(f.get_tensor(key[:-3] + "prompt_len"))
                assert ids[prompt_len:] == generated(target, None, ids[:prompt_len], 12)
                answered += 1
    assert answered == 12
    drafter = load_drafter(str(out), target)
    for prompt in prompts():
        assert generated(target, drafter, prompt) == generated(target, None, prompt)
