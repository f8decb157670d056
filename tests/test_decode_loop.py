"""The decode loop's bookkeeping: caches after many rounds, reuse across turns, stops, limits, events."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from dspark_chat.engine.decode import ContextLengthError, TextStream, decode
from dspark_chat.engine.engine import Engine
from dspark_chat.engine.loading import load_drafter
from dspark_chat.engine.sampling import Sampling
from dspark_chat.engine.stats import summarize
from dspark_chat.engine.target import GROUPED_SDPA, GrowingLayer, grouped_sdpa

from .conftest import REFERENCE, Forcing


@pytest.fixture
def drafter(tiny_target):
    tiny_target.rewind(0)
    return load_drafter(str(REFERENCE / "dspark"), tiny_target)


def baseline(target, prompt, n):
    target.rewind(0)
    return [t for s in decode(target, None, prompt, Sampling(), n) for t in s.token_ids]


def test_target_cache_after_many_rounds_equals_a_fresh_prefill(tiny_target, drafter, reference):
    prompt = reference["prompts"][1]
    greedy = baseline(tiny_target, prompt, 60)
    tiny_target.rewind(0)
    forcing = Forcing(drafter, len(prompt), greedy + [0] * 8, [3, 7, 0, 5, 1, 6, 2, 4])
    out = [t for s in decode(tiny_target, forcing, prompt, Sampling(), 60) for t in s.token_ids]
    ids = prompt + out
    assert tiny_target.cached_ids == ids[:-1]
    assert all(isinstance(layer, GrowingLayer) for layer in tiny_target.cache.layers)
    cached, _ = tiny_target.forward(ids[-1:])
    fresh = tiny_target.model(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(cached[-1], fresh, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reference_attention", ["sdpa", "eager"])
def test_cpu_attention_reads_grouped_heads_in_place_and_gives_transformers_logits(tiny_target, reference, reference_attention):
    # A verify pass: several tokens after a cached context, so there is a mask (the case the CPU path changes).
    assert tiny_target.model.config._attn_implementation == GROUPED_SDPA
    assert tiny_target.model.model.layers[0].self_attn.num_key_value_groups == 2
    ids = [t for prompt in reference["prompts"] for t in prompt]
    assert len(ids) > 10
    logits = {}
    for attention in (GROUPED_SDPA, reference_attention):
        tiny_target.model.set_attn_implementation(attention)
        try:
            tiny_target.rewind(0)
            tiny_target.forward(ids[:-5], last_only=True)
            logits[attention], _ = tiny_target.forward(ids[-5:])
        finally:
            tiny_target.model.set_attn_implementation(GROUPED_SDPA)
    torch.testing.assert_close(logits[GROUPED_SDPA], logits[reference_attention], atol=1e-5, rtol=1e-5)


def test_cpu_attention_leaves_what_it_does_not_handle_to_transformers():
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    query, key, value = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool).tril(2)
    with pytest.raises(ValueError, match="softcap"):  # transformers' SDPA refuses a soft cap rather than drop it
        grouped_sdpa(module, query, key, value, mask, softcap=30.0)


def test_growing_cache_layer_holds_what_transformers_layer_holds_through_growth_and_rollbacks():
    torch.manual_seed(0)
    growing, plain = GrowingLayer(limit=600), DynamicLayer()
    capacities, longest = set(), 0
    for step in range(240):
        n = 1 if step % 3 else int(torch.randint(2, 18, ()))
        keys, values = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
        for layer in (growing, plain):
            got = layer.update(keys, values)
        torch.testing.assert_close(got, (plain.keys, plain.values), rtol=0, atol=0)
        torch.testing.assert_close((growing.keys, growing.values), (plain.keys, plain.values), rtol=0, atol=0)
        longest = max(longest, growing.get_seq_length())
        assert growing.buffers[0].shape[-2] <= max(600, longest)  # no room past the limit
        if step % 4 == 1 and n > 1:  # a verify pass's rejected drafts
            for layer in (growing, plain):
                layer.crop(-(n - 1))
        assert growing.get_seq_length() == plain.get_seq_length()
        capacities.add(growing.buffers[0].shape[-2])
    assert len(capacities) >= 3  # 256 at first, then grown twice while keeping what was cached
    with pytest.raises(ValueError, match="negated"):
        growing.crop(3)


def test_drafter_context_grown_round_by_round_equals_one_built_at_once(tiny_target, reference):
    # In float: int8 activations take one scale per product, so context fed in chunks rounds otherwise.
    drafter = load_drafter(str(REFERENCE / "dspark"), tiny_target, int8=False)
    prompt = reference["prompts"][3]
    greedy = baseline(tiny_target, prompt, 30)
    tiny_target.rewind(0)
    forcing = Forcing(drafter, len(prompt), greedy + [0] * 8, [2, 6, 1])
    ids = prompt + [t for s in decode(tiny_target, forcing, prompt, Sampling(), 30) for t in s.token_ids]
    incremental = drafter.propose(torch.tensor(ids), 7, Sampling())

    fresh = load_drafter(str(REFERENCE / "dspark"), tiny_target, int8=False)
    tiny_target.rewind(0)
    _, features = tiny_target.forward(ids[:-1], fresh.feature_layers)
    fresh.observe(features)
    at_once = fresh.propose(torch.tensor(ids), 7, Sampling())
    assert incremental.tokens.tolist() == at_once.tokens.tolist()
    torch.testing.assert_close(incremental.confidence_logits, at_once.confidence_logits, atol=1e-4, rtol=1e-4)


def test_second_turn_reuses_the_cache_and_gives_the_same_answer(tiny_target, drafter, tokenizer):
    engine = Engine(tiny_target, drafter)
    first = [{"role": "user", "content": "def fibonacci(n):"}]
    answer = "".join(s.text for s in engine.chat(first, max_new_tokens=12))
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "import json"}]
    prompt = engine.chat_ids(second)

    prefilled = []
    real_forward = tiny_target.forward
    tiny_target.forward = lambda ids, *a, **k: prefilled.append(len(ids)) or real_forward(ids, *a, **k)
    try:
        reused = [t for s in engine.chat(second, max_new_tokens=12) for t in s.token_ids]
    finally:
        del tiny_target.forward
    shared = len(engine.chat_ids(first))
    assert prefilled[0] <= len(prompt) - shared  # only the new part of the conversation was prefilled
    tiny_target.rewind(0)
    drafter.rewind(0)
    assert [t for s in engine.chat(second, max_new_tokens=12) for t in s.token_ids] == reused


def test_a_turn_without_the_drafter_then_with_it_stays_lossless(tiny_target, drafter, reference):
    engine = Engine(tiny_target, drafter)
    prompt = reference["prompts"][0]
    plain = [t for s in engine.generate(prompt, max_new_tokens=20, speculative=False) for t in s.token_ids]
    longer = prompt + plain + [5, 6]
    spec = [t for s in engine.generate(longer, max_new_tokens=20) for t in s.token_ids]
    assert spec == baseline(tiny_target, longer, 20)


def test_stop_token_ends_the_answer_even_inside_accepted_drafts(tiny_target, drafter, reference):
    prompt = reference["prompts"][2]
    greedy = baseline(tiny_target, prompt, 30)
    stop = greedy[9]
    tiny_target.stop_ids = (stop,)
    try:
        tiny_target.rewind(0)
        forcing = Forcing(drafter, len(prompt), greedy + [0] * 8, [7])
        steps = list(decode(tiny_target, forcing, prompt, Sampling(), 30))
    finally:
        tiny_target.stop_ids = (2,)
    out = [t for s in steps for t in s.token_ids]
    assert out == greedy[: greedy.index(stop) + 1]
    assert steps[-1].finish_reason == "stop"
    assert tiny_target.cached_ids == (prompt + out)[:-1]


def test_context_length_is_enforced(tiny_target):
    with pytest.raises(ContextLengthError, match="context holds 1024"):
        next(decode(tiny_target, None, [5] * 1024, Sampling(), 10))
    tiny_target.rewind(0)
    steps = list(decode(tiny_target, None, [5] * 1020, Sampling(), 10))
    assert sum(len(s.token_ids) for s in steps) == 4 and steps[-1].finish_reason == "length"


def test_events_carry_what_the_stats_need(tiny_target, drafter, reference):
    prompt = reference["prompts"][0]
    greedy = baseline(tiny_target, prompt, 25)
    tiny_target.rewind(0)
    forcing = Forcing(drafter, len(prompt), greedy + [0] * 8, [4, 0, 7, 2])
    steps = list(decode(tiny_target, forcing, prompt, Sampling(), 25))
    first, rounds = steps[0], steps[1:]
    assert first.prefill and first.origins == ["target"] and first.verified == 0
    for s in rounds:
        assert len(s.draft_ids) <= 7 and s.verified <= len(s.draft_ids)
        assert s.origins == ["draft"] * s.accepted + ["target"] * (len(s.token_ids) - s.accepted)
        assert s.token_ids[: s.accepted] == s.draft_ids[: s.accepted]
        assert s.draft_ms >= 0 and s.verify_ms > 0
    assert [s.accepted for s in rounds[:4]] == [4, 0, 7, 2]
    stats = summarize([s.to_dict() for s in steps])
    assert stats["tokens"] == 25
    assert stats["rounds"] == len(rounds)
    assert stats["tau"] == pytest.approx(sum(len(s.token_ids) for s in rounds) / len(rounds))
    assert stats["acceptance_rate"] == pytest.approx(sum(s.accepted for s in rounds) / sum(s.verified for s in rounds))
    assert stats["time_to_first_token_ms"] == first.elapsed_ms
    assert stats["finish_reason"] == "length"


def test_summarize_by_hand():
    def step(tokens, drafts, verified, accepted, t, prefill=False):
        return {"token_ids": tokens, "draft_ids": drafts, "verified": verified, "accepted": accepted,
                "draft_ms": 1.0, "verify_ms": 3.0, "elapsed_ms": t, "prefill": prefill, "finish_reason": None}

    steps = [step([1], [], 0, 0, 100.0, True), step([2, 3, 4], [2, 3, 9], 3, 2, 300.0),
             step([5], [7, 7], 2, 0, 400.0), step([6, 7], [6], 1, 1, 600.0)]
    stats = summarize(steps)
    assert stats["tau"] == 2.0
    assert stats["acceptance_rate"] == 0.5
    # position 1: verified in 3 rounds, accepted in 2; position 2: reached in 1 round (the first), accepted;
    # position 3: reached once, rejected.
    assert stats["acceptance_by_position"] == [2 / 3, 1.0, 0.0]
    assert stats["decode_tokens_per_s"] == pytest.approx(6 / 0.5)
    assert stats["time_to_first_token_ms"] == 100.0
    assert stats["draft_ms"] == 3.0 and stats["verify_ms"] == 9.0


def test_text_stream_holds_back_split_characters(tokenizer):
    text = "café ✓ naïve — 日本語 fibonacci"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_prompt_lookup_copies_after_the_longest_match():
    from dspark_chat.engine.prompt_lookup import PromptLookupDrafter

    def propose(ids, limit=4):
        p = PromptLookupDrafter().propose(torch.tensor(ids), limit, Sampling())
        return p.tokens.tolist(), p.match

    # The 3-token match (5 6 7 -> 8 9) beats the later 1-token one (7 -> 1 2).
    assert propose([5, 6, 7, 8, 9, 0, 7, 1, 2, 3, 5, 6, 7]) == ([8, 9, 0, 7], 3)
    # Equal matches: the latest with a full continuation, not the one inside the repetition at the end.
    assert propose([4, 1, 2, 3, 4, 9, 9, 9, 4, 1, 2, 3, 4, 4]) == ([1, 2, 3, 4], 1)
    # A source that runs into the end of the context continues the repetition the match implies.
    assert propose([0, 0, 0, 0, 0, 0, 0, 0], limit=3) == ([0, 0, 0], 7)
    assert propose([1, 2, 1, 2, 1], limit=5) == ([2, 1, 2, 1, 2], 3)
    assert propose([1, 2, 3]) == ([], None) and propose([1, 2, 3, 2], limit=0) == ([], None)
