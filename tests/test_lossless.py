"""Losslessness: greedy speculative output equals the baseline token for token, and sampling keeps
the target's distribution (with a test that a broken acceptance rule fails)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

import dspark_chat.engine.decode as decode_module
from dspark_chat.engine.decode import decode
from dspark_chat.engine.loading import load_drafter, load_target
from dspark_chat.engine.prompt_lookup import LookupOrDraft, PromptLookupDrafter
from dspark_chat.engine.sampling import Proposal, Sampling
from dspark_chat.engine.scheduler import Scheduler, measure_sps
from dspark_chat.kernels.acceptance import accept_sampled
from dspark_chat.kernels.sampling import sample, to_probs

from .conftest import EAGLE3, REFERENCE, Forcing, drafter_copy, make_tiny_eagle3, make_tiny_pair


def prompts(reference) -> list[list[int]]:
    """The reference prompts plus prompts that repeat themselves (prompt lookup drafts from them; the
    random target rarely follows, so tests/test_smollm2.py checks prompt lookup's accepted drafts)."""
    g = torch.Generator().manual_seed(7)
    repeating = []
    for length in (6, 11, 19):
        piece = torch.randint(4, 512, (length,), generator=g).tolist()
        repeating.append(piece * 3)
    return reference["prompts"] + repeating


def generated(target, drafter, prompt, scheduler=None, max_new_tokens=40, sampling=Sampling()):
    target.rewind(0)
    if drafter is not None:
        drafter.rewind(0)
    return [t for s in decode(target, drafter, prompt, sampling, max_new_tokens, scheduler) for t in s.token_ids]


@pytest.fixture(scope="module")
def profile(tiny_target):
    return measure_sps(tiny_target, 8, repeats=2)


@pytest.mark.parametrize("mode", ["off", "threshold", "auto"])
@pytest.mark.parametrize("variant", ["dspark", "dspark_gated", "dspark_rnn", "dflash", "prompt_lookup"])
def test_greedy_speculative_equals_baseline(variant, mode, tiny_target, reference, profile):
    drafter = PromptLookupDrafter() if variant == "prompt_lookup" else load_drafter(str(REFERENCE / variant), tiny_target)
    scheduler = Scheduler(mode=mode, threshold=0.6, sps=profile)
    for prompt in prompts(reference):
        baseline = generated(tiny_target, None, prompt)
        assert generated(tiny_target, drafter, prompt, scheduler) == baseline
        if variant != "prompt_lookup":
            # Rounds that accept 0..7 drafts exercise every rollback length of both caches.
            forcing = Forcing(drafter, len(prompt), baseline + [0] * 8, [3, 7, 0, 5, 1, 6, 2, 4])
            assert generated(tiny_target, forcing, prompt, scheduler) == baseline


def with_draft_vocab(folder, variant, ids):
    """A copy of a reference drafter that drafts among `ids` only."""
    out = drafter_copy(folder, variant)
    (out / "draft_vocab.json").write_text(json.dumps({"ids": ids}))
    return out


@pytest.mark.parametrize("variant", ["dspark", "dspark_rnn", "dflash"])
def test_greedy_identity_with_a_draft_vocabulary(variant, tiny_target, reference, profile, tmp_path):
    vocab = list(range(1, 512, 3))
    drafter = load_drafter(str(with_draft_vocab(tmp_path, variant, vocab)), tiny_target)
    assert drafter.draft_vocab.tolist() == vocab and drafter.draft_head.out_features == len(vocab)
    for mode in ("off", "auto"):
        scheduler = Scheduler(mode=mode, threshold=0.6, sps=profile)
        for prompt in prompts(reference):
            baseline = generated(tiny_target, None, prompt)
            assert generated(tiny_target, drafter, prompt, scheduler) == baseline
            forcing = Forcing(drafter, len(prompt), baseline + [0] * 8, [3, 0, 5, 1])
            assert generated(tiny_target, forcing, prompt, scheduler) == baseline
            drafted = {t for block in forcing.own for t in block}
            assert drafted and drafted <= set(vocab)


def test_kept_markov_rows_follow_the_weights_and_the_vocabulary(tiny_target, reference, tmp_path):
    drafter = load_drafter(str(with_draft_vocab(tmp_path, "dspark", list(range(1, 512, 3)))), tiny_target)
    head, w2 = drafter.markov_head, drafter.markov_head.markov_w2.weight
    with torch.inference_mode():
        kept = head.weights(drafter.draft_vocab)["w2"]
        assert torch.equal(kept, w2[drafter.draft_vocab]) and head.weights(drafter.draft_vocab)["w2"] is kept
    with torch.no_grad():
        w2.mul_(2)  # an optimizer step, or a checkpoint loaded in place
    assert torch.equal(head.weights(drafter.draft_vocab)["w2"], w2[drafter.draft_vocab])
    other = torch.arange(0, 512, 5)
    assert torch.equal(head.weights(other)["w2"], w2[other])
    w2.requires_grad_(True)
    assert head.weights(other)["w2"].requires_grad  # training gathers with autograd, so W2 learns


def recording_sources(hybrid: LookupOrDraft) -> list[str]:
    """Which of its two drafters made each proposal: prompt lookup's carry their match length."""
    sources, propose = [], hybrid.propose

    def recorded(ids, limit, sampling, generator=None):
        proposal = propose(ids, limit, sampling, generator)
        sources.append("lookup" if proposal.match is not None else "drafter")
        return proposal

    hybrid.propose = recorded
    return sources


@pytest.mark.parametrize("variant", ["dspark", "dflash"])
def test_greedy_identity_when_prompt_lookup_and_a_drafter_take_turns(variant, tiny_target, reference, profile):
    drafter = load_drafter(str(REFERENCE / variant), tiny_target)
    for mode in ("off", "auto"):
        scheduler = Scheduler(mode=mode, sps=profile)
        used = []
        for prompt in prompts(reference):
            baseline = generated(tiny_target, None, prompt)
            hybrid = LookupOrDraft(drafter, PromptLookupDrafter(block_size=6, min_match=2))
            assert generated(tiny_target, hybrid, prompt, scheduler) == baseline
            # Forced acceptances: drafter rounds that accept several tokens, between lookup rounds.
            forced = LookupOrDraft(Forcing(drafter, len(prompt), baseline + [0] * 8, [3, 0, 2]), PromptLookupDrafter())
            sources = recording_sources(forced)
            assert generated(tiny_target, forced, prompt, scheduler) == baseline
            used += sources
        assert used.count("lookup") >= 3 and used.count("drafter") >= 3


def test_a_drafter_with_prompt_lookup_loads_as_the_two_taking_turns(tiny_target_dir):
    from dspark_chat.engine.dspark import DSparkDrafter
    from dspark_chat.engine.engine import Engine

    engine = Engine.load(str(tiny_target_dir), str(REFERENCE / "dspark"), prompt_lookup=True, dtype="float32",
                         device="cpu", scheduler="off")
    assert isinstance(engine.drafter, LookupOrDraft) and isinstance(engine.drafter.drafter, DSparkDrafter)
    assert engine.drafter.feature_layers == engine.drafter.drafter.feature_layers
    assert engine.describe().endswith("prompt lookup, else drafter block 7 in int8, scheduler off")
    floating = Engine.load(str(tiny_target_dir), str(REFERENCE / "dspark"), prompt_lookup=True, dtype="float32",
                           device="cpu", scheduler="off", float_drafter=True)
    assert floating.describe().endswith("prompt lookup, else drafter block 7, scheduler off")


class SteeredLookup(PromptLookupDrafter):
    """Prompt lookup whose first drafts are, on a schedule, the target's greedy tokens (its match length
    kept), so that rounds accept anything from none to all of what they verify, as on real text."""

    def __init__(self, prompt_len, greedy, schedule):
        super().__init__()
        self.prompt_len, self.greedy, self.schedule, self.rounds = prompt_len, greedy, schedule, 0

    def propose(self, ids, limit, sampling, generator=None):
        proposal = super().propose(ids, limit, sampling, generator)
        forced = self.schedule[self.rounds % len(self.schedule)]
        self.rounds += 1
        done = len(ids) - self.prompt_len
        tokens = proposal.tokens.clone()
        tokens[:forced] = torch.tensor(self.greedy[done : done + forced])[: len(tokens)]
        return Proposal(tokens, None, match=proposal.match)


def test_greedy_identity_for_prompt_lookup_under_the_learned_auto_policy(tiny_target, reference):
    """One scheduler learns across all prompts (as an engine's does across requests); whatever count it
    picks, the output is the plain greedy one."""
    smollm2_fp32 = [13.8, 8.5, 6.6, 6.6, 7.7, 7.2, 6.7, 7.0, 6.7, 7.4, 6.3]  # passes/s for B = 1..11 tokens
    scheduler = Scheduler("auto", sps=smollm2_fp32)
    g = torch.Generator().manual_seed(3)
    all_prompts = prompts(reference) + [torch.randint(4, 40, (n,), generator=g).tolist() for n in (8, 15, 30, 60)] * 2
    schedules = [[10, 0, 3, 10, 1, 7, 0, 10], [0] * 6 + [2], [10]]  # greedy tokens forced per round
    verified = []
    for i, prompt in enumerate(all_prompts):
        baseline = generated(tiny_target, None, prompt, max_new_tokens=48)
        drafter = SteeredLookup(len(prompt), baseline + [0] * 10, schedules[i % 3])
        tiny_target.rewind(0)
        steps = list(decode(tiny_target, drafter, prompt, Sampling(), 48, scheduler))
        assert [t for s in steps for t in s.token_ids] == baseline
        verified += [s.verified for s in steps[1:] if s.draft_ids]
    # The policy did vary the count (on this run: from none to all ten).
    assert len(set(verified)) >= 2


def test_greedy_identity_with_max_draft_and_budgets(tiny_target, reference):
    drafter = load_drafter(str(REFERENCE / "dspark"), tiny_target)
    prompt = reference["prompts"][2]
    full = generated(tiny_target, None, prompt, max_new_tokens=24)
    for budget, max_draft in itertools.product((1, 2, 9, 24), (1, 3, None)):
        forcing = Forcing(drafter, len(prompt), full + [0] * 8, [7, 2, 5])
        tiny_target.rewind(0)
        drafter.rewind(0)
        steps = list(decode(tiny_target, forcing, prompt, Sampling(), budget, None, max_draft))
        assert [t for s in steps for t in s.token_ids] == full[:budget]
        assert steps[-1].finish_reason == "length"
        assert all(s.verified <= (max_draft or 7) for s in steps)


# --- sampling ------------------------------------------------------------------------------------

def draws_of_acceptance(rule, p, q, n, seed=0):
    """First committed token when one draft x ~ q is verified against p, n times."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(p))
    target = torch.stack([p, torch.full_like(p, 1 / len(p))])
    for _ in range(n):
        x = sample(q, g).view(1)
        accepted, bonus = rule(target, x, q[None], g)
        counts[int(x) if accepted else int(bonus)] += 1
    return counts


def broken_rule(target_probs, draft_ids, draft_probs, generator=None):
    """Resamples a rejected draft from the target itself instead of the residual: a classic bug."""
    n = draft_ids.shape[0]
    if n == 0:
        return accept_sampled(target_probs, draft_ids, draft_probs, generator)
    p = target_probs[:n].gather(-1, draft_ids[:, None]).squeeze(-1)
    q = draft_probs.gather(-1, draft_ids[:, None]).squeeze(-1)
    accepted = (torch.rand(n, generator=generator) * q < p).cumprod(0).sum()
    return accepted, sample(target_probs[accepted], generator)


def test_acceptance_rule_keeps_the_target_distribution():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.1, 0.3, 0.1])
    # The broken rule commits min(p, q) + 0.45 p, an effect of w² = 0.134 per draw against p: the statistic's
    # expectation at 4000 draws is about 540, where p < 1e-6 needs 33 (4 degrees of freedom).
    n = 4000
    good = draws_of_acceptance(accept_sampled, p, q, n)
    assert chisquare(good, p * n).pvalue > 1e-3
    bad = draws_of_acceptance(broken_rule, p, q, n)
    assert chisquare(bad, p * n).pvalue < 1e-6


@torch.inference_mode()
def exact_distribution(target, prefix, length, sampling):
    """P(first `length` generated tokens) under the target, by enumeration."""
    vocab = target.vocab_size
    out = {}
    for seq in itertools.product(range(vocab), repeat=length):
        prob = 1.0
        for i in range(length):
            ids = torch.tensor([prefix + list(seq[:i])])
            logits = target.model(input_ids=ids).logits[0, -1]
            prob *= float(sampling.probs(logits)[seq[i]])
        out[seq] = prob
    return out


def sampled_counts(target, drafter, prefix, length, sampling, runs, scheduler=None, verified=None):
    counts = {}
    for seed in range(runs):
        target.rewind(0)
        drafter.rewind(0)
        s = Sampling(sampling.temperature, sampling.top_p, sampling.top_k, seed)
        steps = list(decode(target, drafter, prefix, s, 6, scheduler))
        tokens = tuple(t for step in steps for t in step.token_ids)[:length]
        counts[tokens] = counts.get(tokens, 0) + 1
        if verified is not None:
            verified += [step.verified for step in steps[1:] if step.draft_ids]
    return counts


# Runs per sampling test. Each must catch a broken acceptance rule (broken_rule: a rejected draft resampled from
# the target instead of the residual). Where every draft is sampled from a drafter, its effect measured over 500
# runs (the chi-square statistic minus its degrees of freedom, per run: 0.24-0.29) puts the chance that 400 runs
# miss it at p < 1e-3 below 2e-8. Where prompt lookup takes part its effect is smaller (lookup drafts are certain,
# and the learned count often verifies none), so those tests keep 1000 runs.
RUNS = 400
RUNS_WITH_LOOKUP = 1000


@pytest.fixture(scope="module")
def four_tokens(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A random target with a four-token vocabulary and a DSpark drafter for it (folders), for the sampling tests:
    small enough to enumerate the target's exact distribution over the first three tokens."""
    return make_tiny_pair(tmp_path_factory.mktemp("four-tokens"), tokenizer, vocab_size=4, block_size=4, markov_rank=4, std=0.8)


def four_token_target(folder: Path):
    target = load_target(str(folder), "float32", "cpu")
    target.stop_ids = ()  # with four tokens, the end-of-text id 2 would cut sequences short
    return target


def chi_square_pvalue(counts, exact, runs):
    keys = [k for k in exact if exact[k] * runs >= 5]
    rest = 1 - sum(exact[k] for k in keys)
    observed = [counts.get(k, 0) for k in keys] + [runs - sum(counts.get(k, 0) for k in keys)]
    expected = [exact[k] * runs for k in keys] + [rest * runs]
    if expected[-1] < 1e-9:
        observed, expected = observed[:-1], expected[:-1]
    return chisquare(observed, expected).pvalue


@pytest.mark.parametrize(
    "sampling", [Sampling(1.0), Sampling(0.7, top_k=3), Sampling(1.3, top_p=0.8)], ids=["t1", "t0.7-topk3", "t1.3-topp0.8"]
)
def test_speculative_sampling_matches_target_distribution(sampling, four_tokens, monkeypatch):
    target_dir, drafter_dir = four_tokens
    target = four_token_target(target_dir)
    drafter = load_drafter(str(drafter_dir), target)
    prefix, length, runs = [1, 3, 0], 3, RUNS
    exact = exact_distribution(target, prefix, length, sampling)
    counts = sampled_counts(target, drafter, prefix, length, sampling, runs)
    assert chi_square_pvalue(counts, exact, runs) > 1e-3
    if sampling.top_k or sampling.top_p < 1:
        return
    # The same test must catch a broken rule: it does, decisively.
    monkeypatch.setattr(decode_module, "accept_sampled", broken_rule)
    counts = sampled_counts(target, drafter, prefix, length, sampling, runs)
    assert chi_square_pvalue(counts, exact, runs) < 1e-4


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7)], ids=["t1", "t0.7"])
def test_sampling_with_a_draft_vocabulary_matches_target_distribution(sampling, four_tokens, tmp_path):
    """The drafter never proposes token 1, so its q is 0 there: the target's share of token 1 must come
    back through the residual distribution of rejected rounds."""
    target_dir, drafter_dir = four_tokens
    drafter_dir = Path(shutil.copytree(drafter_dir, tmp_path / "drafter"))
    (drafter_dir / "draft_vocab.json").write_text(json.dumps({"ids": [0, 2, 3]}))
    target = four_token_target(target_dir)
    drafter = load_drafter(str(drafter_dir), target)
    prefix, length, runs = [1, 3, 0], 3, RUNS
    exact = exact_distribution(target, prefix, length, sampling)
    counts = sampled_counts(target, drafter, prefix, length, sampling, runs)
    assert chi_square_pvalue(counts, exact, runs) > 1e-3
    with_one = sum(p for seq, p in exact.items() if 1 in seq) * runs
    assert with_one > runs / 10 and sum(n for seq, n in counts.items() if 1 in seq) > with_one / 2


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7, top_k=3)], ids=["t1", "t0.7-topk3"])
def test_sampling_when_prompt_lookup_and_a_drafter_take_turns_matches_target_distribution(sampling, four_tokens):
    """A lookup round's drafts are certain (q = 1), a drafter round's are sampled from q: the committed
    tokens must follow the target's distribution whichever drafted them."""
    target_dir, drafter_dir = four_tokens
    target = four_token_target(target_dir)
    hybrid = LookupOrDraft(load_drafter(str(drafter_dir), target), PromptLookupDrafter(block_size=4, min_match=2))
    sources = recording_sources(hybrid)
    prefix, length, runs = [1, 3, 0, 1, 3], 3, RUNS_WITH_LOOKUP
    exact = exact_distribution(target, prefix, length, sampling)
    counts = sampled_counts(target, hybrid, prefix, length, sampling, runs)
    assert chi_square_pvalue(counts, exact, runs) > 1e-3
    assert sources.count("lookup") > runs / 2 and sources.count("drafter") > runs / 2


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7, top_k=3)], ids=["t1", "t0.7-topk3"])
def test_prompt_lookup_sampling_under_the_learned_policy_matches_target_distribution(sampling, four_tokens):
    """The learned count depends on earlier rounds' random acceptances, never on this round's: the
    committed tokens still follow the target's distribution."""
    target = four_token_target(four_tokens[0])
    prefix, length, runs = [1, 3, 0, 1, 3], 3, RUNS_WITH_LOOKUP
    exact = exact_distribution(target, prefix, length, sampling)
    scheduler = Scheduler("auto", sps=[100.0, 70.0, 60.0, 52.0, 46.0, 42.0])  # one scheduler learns over all runs
    verified = []
    drafter = PromptLookupDrafter(block_size=5)
    counts = sampled_counts(target, drafter, prefix, length, sampling, runs, scheduler, verified)
    assert chi_square_pvalue(counts, exact, runs) > 1e-3
    assert len(set(verified)) >= 3  # the count did vary


def test_to_probs_applies_top_k_and_top_p():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert (to_probs(logits, 1.0, top_k=2)[2:] == 0).all()
    full = torch.softmax(logits, -1)
    kept = to_probs(logits, 1.0, top_p=0.8)
    # The smallest set whose mass reaches 0.8 is the first two tokens (0.64 + 0.24).
    assert (kept[2:] == 0).all() and torch.allclose(kept[:2], full[:2] / full[:2].sum())


@pytest.fixture(scope="module")
def compiled_pair(four_tokens):
    """The four-token pair of the sampling tests with the target's passes compiled (once per module)."""
    from dspark_chat.engine.compiled import compile_target
    from dspark_chat.engine.loading import cache_dir

    target_dir, drafter_dir = four_tokens
    eager = four_token_target(target_dir)
    drafter = load_drafter(str(drafter_dir), eager)
    return compile_target(eager, 5, drafter.feature_layers, cache_dir()), drafter


@pytest.mark.slow  # compiling the four-token target takes most of a minute
@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7, top_k=3)], ids=["t1", "t0.7-topk3"])
@pytest.mark.parametrize("lookup", [False, True], ids=["drafter", "lookup-or-drafter"])
def test_compiled_speculative_sampling_matches_target_distribution(sampling, lookup, compiled_pair):
    from dspark_chat.engine.compiled import CompiledTarget

    target, drafter = compiled_pair
    assert isinstance(target, CompiledTarget)
    if lookup:
        drafter = LookupOrDraft(drafter, PromptLookupDrafter(block_size=4, min_match=2))
    prefix, length, runs = [1, 3, 0, 1, 3], 3, RUNS_WITH_LOOKUP if lookup else RUNS
    exact = exact_distribution(target, prefix, length, sampling)
    counts = sampled_counts(target, drafter, prefix, length, sampling, runs)
    assert chi_square_pvalue(counts, exact, runs) > 1e-3


# --- Eagle3 (a chain drafter with its own cache) ---------------------------------------------------

@pytest.fixture(scope="module")
def eagle3_profile(eagle3_target):
    return measure_sps(eagle3_target, 8, repeats=2)


@pytest.fixture(scope="module")
def few_prompts(reference):
    """Three of prompts(): a short and a long one, and one that repeats itself (for prompt lookup)."""
    return [p for i, p in enumerate(prompts(reference)) if i in (0, 3, 5)]


@pytest.fixture(scope="module")
def eagle3_baselines(eagle3_target, few_prompts):
    return [generated(eagle3_target, None, prompt) for prompt in few_prompts]


@pytest.mark.parametrize("family,variant,auto", [("qwen3", "eagle3", True), ("speculators", "speculators_llama", False),
                                                 ("speculators", "speculators_qwen3", False)])
def test_greedy_identity_with_an_eagle3_drafter(family, variant, auto, eagle3_target, few_prompts, eagle3_baselines,
                                                eagle3_profile):
    """In int8 as the engine runs it beside a float32 target on a CPU. Forced rounds accept 0..7 drafts
    and exercise every rollback of its cache; a pruned vocabulary (speculators_llama) drafts among its ids.
    One variant also under auto, Eagle3's default scheduler (learned acceptance: it has no confidence head)."""
    drafter = load_drafter(str(EAGLE3 / family / variant), eagle3_target)
    assert drafter.int8
    for mode in ("off", "auto") if auto else ("off",):
        scheduler = Scheduler(mode=mode, sps=eagle3_profile)
        for prompt, baseline in zip(few_prompts, eagle3_baselines):
            if mode == "auto":
                assert generated(eagle3_target, drafter, prompt, scheduler) == baseline
            forcing = Forcing(drafter, len(prompt), baseline + [0] * 8, [3, 7, 0, 5, 1, 6, 2, 4])
            assert generated(eagle3_target, forcing, prompt, scheduler) == baseline
            if drafter.draft_vocab is not None:
                assert {t for block in forcing.own for t in block} <= set(drafter.draft_vocab.tolist())


def test_greedy_identity_when_prompt_lookup_and_an_eagle3_drafter_take_turns(eagle3_target, few_prompts,
                                                                            eagle3_baselines):
    """Lookup rounds leave the drafter several rounds of hidden states to fold in at once."""
    drafter = load_drafter(str(EAGLE3 / "qwen3" / "eagle3"), eagle3_target)
    used = []
    for prompt, baseline in zip(few_prompts, eagle3_baselines):
        forced = LookupOrDraft(Forcing(drafter, len(prompt), baseline + [0] * 8, [3, 0, 2]), PromptLookupDrafter())
        sources = recording_sources(forced)
        assert generated(eagle3_target, forced, prompt) == baseline
        used += sources
    assert used.count("lookup") >= 3 and used.count("drafter") >= 3


@pytest.mark.parametrize("speculators,sampling", [(False, Sampling(1.0)), (True, Sampling(0.7, top_k=3))],
                         ids=["deepspec-t1", "speculators-pruned-t0.7-topk3"])
def test_eagle3_sampling_matches_target_distribution(speculators, sampling, tmp_path, tokenizer, monkeypatch):
    """Each chain draft is drawn from a distribution that depends on the drafts before it; the pruned
    vocabulary never drafts token 1, whose share must come back through rejected rounds."""
    target_dir, _ = make_tiny_pair(tmp_path, tokenizer, vocab_size=4, block_size=4, markov_rank=4, std=0.8)
    drafter_dir = make_tiny_eagle3(tmp_path / "eagle3", target_dir, speculators, [0, 2, 3] if speculators else None)
    target = load_target(str(target_dir), "float32", "cpu")
    target.stop_ids = ()  # with four tokens, the end-of-text id 2 would cut sequences short
    drafter = load_drafter(str(drafter_dir), target)
    # The broken rule's effect here, measured over 300 runs: w² = 0.36 (DeepSpec layout), 0.45 (pruned), above
    # the DSpark tests' 0.24-0.29, so RUNS keeps at least their power.
    prefix, length, runs = [1, 3, 0], 3, RUNS
    exact = exact_distribution(target, prefix, length, sampling)
    counts = sampled_counts(target, drafter, prefix, length, sampling, runs)
    assert chi_square_pvalue(counts, exact, runs) > 1e-3
    if speculators:
        with_one = sum(p for seq, p in exact.items() if 1 in seq) * runs
        assert with_one > runs / 10 and sum(n for seq, n in counts.items() if 1 in seq) > with_one / 2
        return
    monkeypatch.setattr(decode_module, "accept_sampled", broken_rule)
    counts = sampled_counts(target, drafter, prefix, length, sampling, runs)
    assert chi_square_pvalue(counts, exact, runs) < 1e-4
