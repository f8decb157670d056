"""Confidence-scheduled verification: the three modes, the SPS profile, calibration."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dspark_chat.engine.scheduler as scheduler_module
from dspark_chat.engine.engine import Engine
from dspark_chat.engine.loading import load_drafter
from dspark_chat.engine.prompt_lookup import PromptLookupDrafter
from dspark_chat.engine.scheduler import (AcceptanceModel, Interrupted, Profile, Scheduler, cached_profile, disturbance,
                                          load_calibration, measure_profile, sps_profile)

from .conftest import REFERENCE

CONFIDENT = [0.95, 0.9, 0.85, 0.8, 0.6, 0.4, 0.2]
GPU_LIKE = [100.0, 99.0, 98.5, 98.0, 97.5, 97.0, 96.5, 96.0]  # verifying 8 tokens costs what 1 does
CPU_LIKE = [100.0, 70.0, 52.0, 42.0, 35.0, 30.0, 26.0, 23.0]  # each extra token costs
# SmolLM2-135M on 2 cores, measured on a quiet machine: verify passes per second for B = 1..12.
SMOLLM2_FP32 = [13.8, 8.5, 6.6, 6.6, 7.7, 7.2, 6.7, 7.0, 6.7, 7.4, 6.3, 7.1]
SMOLLM2_FP32_TRANSPOSED = [17.8, 13.5, 12.3, 18.6, 15.5, 13.8, 12.1, 13.4, 11.8, 10.9, 10.5, 10.5, 9.5, 9.5, 9.1, 10.8, 9.1]
SMOLLM2_BF16 = [29.2, 20.4, 15.2, 12.0, 10.2, 8.9, 7.7, 7.0, 6.4, 5.8, 5.3, 4.9]


def test_off_verifies_everything_and_threshold_stops_at_the_first_doubt():
    assert Scheduler("off").verify_count(7, CONFIDENT) == 7
    assert Scheduler("threshold", threshold=0.7).verify_count(7, CONFIDENT) == 4
    assert Scheduler("threshold", threshold=0.99).verify_count(7, CONFIDENT) == 0
    assert Scheduler("threshold", threshold=0.1).verify_count(7, CONFIDENT) == 7


def test_auto_verifies_more_where_verification_is_cheap():
    gpu = Scheduler("auto", sps=GPU_LIKE).verify_count(7, CONFIDENT)
    cpu = Scheduler("auto", sps=CPU_LIKE).verify_count(7, CONFIDENT)
    assert gpu == 7 and cpu == 3
    # The choice maximises expected tokens per second over the prefixes it admitted.
    def throughput(l, sps):
        return (1 + sum(math.prod(CONFIDENT[:k]) for k in range(1, l + 1))) * sps[l]
    assert throughput(3, CPU_LIKE) > max(throughput(2, CPU_LIKE), throughput(4, CPU_LIKE))


def test_auto_looks_past_a_pass_length_that_costs_more_than_a_longer_one():
    """With SmolLM2's float32 profile a 4-token pass is faster than a 2- or 3-token one: stopping at
    the first position that does not raise the rate would verify nothing on weak drafts, while three
    drafts cost less than none."""
    weak = [0.3] * 7

    def throughput(l, sps):
        return (1 + sum(math.prod(weak[:k]) for k in range(1, l + 1))) * sps[l]

    profile = SMOLLM2_FP32_TRANSPOSED[:8]
    assert throughput(1, profile) < throughput(0, profile) < throughput(3, profile)
    chosen = Scheduler("auto", sps=profile).verify_count(7, weak)
    assert chosen == 3 and throughput(3, profile) == max(throughput(l, profile) for l in range(8))
    # Where a longer pass never pays (each token costs), weak drafts are still not verified.
    assert Scheduler("auto", sps=CPU_LIKE).verify_count(7, weak) == 0


def test_auto_decides_on_position_k_without_looking_past_it():
    """Lossless sampling needs the decision for position k to ignore c_(k+1), which depends on x_k:
    whatever follows the first refused position cannot change the count."""
    g = torch.Generator().manual_seed(0)
    for sps in (CPU_LIKE, GPU_LIKE, SMOLLM2_FP32_TRANSPOSED[:8]):
        scheduler = Scheduler("auto", sps=sps)
        for _ in range(200):
            conf = torch.rand(7, generator=g).tolist()
            chosen = scheduler.verify_count(7, conf)
            tail = torch.rand(7, generator=g).tolist()
            changed = conf[: chosen + 1] + tail[: 6 - chosen]
            assert scheduler.verify_count(7, changed) == chosen


def test_drafters_without_confidences_are_verified_in_full_unless_auto_has_a_profile():
    assert Scheduler("off").verify_count(5, None, match=3) == 5
    assert Scheduler("threshold").verify_count(5, None, match=3) == 5
    assert Scheduler("auto").verify_count(5, None, match=3) == 5  # no SPS profile: nothing to weigh


# --- learned acceptance for drafters without a confidence head (prompt lookup) --------------------

def lookup_counts() -> AcceptanceModel:
    """Acceptance by effective match length roughly as SmolLM2 shows on HumanEval."""
    model = AcceptanceModel()
    model.counts = {("match", 1): [20, 100], ("match", 2): [40, 100], ("match", 3): [64, 100]}
    model.counts |= {("match", m): [90, 100] for m in range(4, 17)}
    return model


def expected_rate(model, match, n, sps):
    """(1 + a_1 + ... + a_n) * SPS(1 + n), written out independently of the scheduler."""
    p = [model.probability(("match", min(match + k - 1, model.cap))) for k in range(1, n + 1)]
    return (1 + sum(math.prod(p[:k]) for k in range(1, n + 1))) * sps[n]


@pytest.mark.parametrize("sps", [SMOLLM2_FP32, SMOLLM2_BF16, CPU_LIKE, GPU_LIKE], ids=["fp32", "bf16", "cpu", "gpu"])
def test_learned_policy_picks_the_count_with_the_best_expected_rate(sps):
    model = lookup_counts()
    for match in range(1, 12):
        for drafted in (1, 4, 7):
            chosen = Scheduler("auto", sps=sps, acceptance=model).verify_count(drafted, None, match)
            rates = [expected_rate(model, match, n, sps) for n in range(drafted + 1)]
            assert chosen == max(range(drafted + 1), key=rates.__getitem__)
    # Concretely: a 1-token match is never worth a pass on SmolLM2; in bfloat16, where every verified token
    # costs, a 2-token match is not either and long matches verify 4; float32 verifies deep, almost for free.
    fp32 = Scheduler("auto", sps=SMOLLM2_FP32, acceptance=lookup_counts())
    bf16 = Scheduler("auto", sps=SMOLLM2_BF16, acceptance=lookup_counts())
    assert [fp32.verify_count(10, None, m) for m in (1, 2, 8)] == [0, 9, 9]
    assert [bf16.verify_count(10, None, m) for m in (1, 2, 3, 8)] == [0, 0, 2, 4]


def test_learned_policy_looks_past_a_dip_in_the_expected_rate():
    """Prompt lookup's first draft is its weakest: verifying one draft can lose while verifying many wins,
    so the count is the full argmax, not the confidence path's stop-at-the-first-drop rule."""
    model = lookup_counts()
    rates = [expected_rate(model, 2, n, SMOLLM2_FP32) for n in range(11)]
    assert rates[1] < rates[0] < max(rates)
    assert Scheduler("auto", sps=SMOLLM2_FP32, acceptance=model).verify_count(10, None, 2) == rates.index(max(rates))


def test_learned_policy_counts_each_tried_position_by_its_effective_match():
    scheduler = Scheduler("auto", sps=CPU_LIKE)
    scheduler.observe(None, 2, 5, 2)  # match 2, five verified, two accepted: positions 1-3 were tried
    assert scheduler.acceptance.counts == {("match", 2): [1, 1], ("match", 3): [1, 1], ("match", 4): [0, 1]}
    scheduler.observe(None, None, 3, 3)  # no match length (DFlash): by position
    assert all(scheduler.acceptance.counts[("position", k)] == [1, 1] for k in (1, 2, 3))
    scheduler.observe([0.9, 0.8], None, 2, 1)  # a drafter with confidences teaches nothing here
    Scheduler("off", acceptance=scheduler.acceptance).observe(None, 7, 3, 0)  # nor does another mode
    assert len(scheduler.acceptance.counts) == 6


def test_learned_policy_starts_optimistic_and_keeps_exploring():
    """A pessimistic estimate must not lock into never verifying: every 16th time a key is the first
    position left unverified, it is verified anyway, so when drafts start being accepted it learns."""
    scheduler = Scheduler("auto", sps=SMOLLM2_BF16)
    assert scheduler.verify_count(10, None, 5) > 0  # unknown keys are worth a look
    scheduler.acceptance.counts[("match", 1)] = [0, 64]  # a long run of rejections
    counts = []
    for _ in range(1500):
        n = scheduler.verify_count(10, None, 1)
        counts.append(n)
        scheduler.observe(None, 1, n, n)  # the workload changed: now every draft is accepted
    assert counts[:15] == [0] * 15 and counts[15] == 1  # explored while still pessimistic
    assert min(counts[-100:]) >= 6  # and learned that verifying deep now pays
    assert all(v <= scheduler.acceptance.memory for _, v in scheduler.acceptance.counts.values())


def test_decode_learns_from_prompt_lookup_rounds_and_stays_lossless(tiny_target):
    """The decode loop feeds every verified prompt lookup round back, and the count it verifies is the
    scheduler's (decided before the target runs); the output is the plain greedy one."""
    prompt = [7, 8, 9, 10, 11] * 4
    tiny_target.rewind(0)
    plain = [t for s in Engine(tiny_target).generate(prompt, max_new_tokens=30, speculative=False) for t in s.token_ids]
    scheduler = Scheduler("auto", sps=GPU_LIKE)
    engine = Engine(tiny_target, PromptLookupDrafter(), scheduler)
    tiny_target.rewind(0)
    steps = list(engine.generate(prompt, max_new_tokens=30))
    assert [t for s in steps for t in s.token_ids] == plain
    verified = sum(s.verified for s in steps)
    assert verified and sum(v for _, v in scheduler.acceptance.counts.values()) >= sum(
        1 for s in steps[1:] if s.verified)


# --- the SPS profile -----------------------------------------------------------------------------

class TimedTarget:
    """A stand-in target whose passes take the time `cost(tokens, call)` on a fake clock."""

    def __init__(self, cost, monkeypatch, name="fake"):
        self.cost, self.calls, self.now = cost, 0, 0.0
        self.name, self.vocab_size, self.device, self.dtype = name, 100, torch.device("cpu"), torch.float32
        monkeypatch.setattr(scheduler_module, "clock", lambda: self.now)

    def rewind(self, length):
        pass

    def forward(self, ids, feature_layers=(), last_only=False):
        self.calls += 1
        self.now += self.cost(len(ids), self.calls)
        return None, None


def quiet(tokens, call):
    return 0.07 + 0.01 * tokens


def test_sps_profile_is_measured_once_and_cached(monkeypatch, tmp_path):
    target = TimedTarget(quiet, monkeypatch)
    profile = sps_profile(target, 8, tmp_path)
    assert profile.sps == pytest.approx([1 / quiet(b, 0) for b in range(1, 9)]) and not profile.noisy
    [cached] = (tmp_path / "sps").glob("*.json")
    saved = json.loads(cached.read_text())
    assert saved["sps"] == profile.sps and saved["key"][0] == target.name and saved["noisy"] is False
    saved["sps"] = [1.0] * 8
    cached.write_text(json.dumps(saved))
    calls = target.calls
    assert sps_profile(target, 8, tmp_path) == Profile([1.0] * 8)  # read back, not measured again
    assert target.calls == calls
    target.attention = "eager"  # another attention implementation: its passes take other times
    assert sps_profile(target, 8, tmp_path).sps == pytest.approx(profile.sps)
    assert target.calls > calls and len(list((tmp_path / "sps").glob("*.json"))) == 2
    del target.attention
    del saved["noisy"]
    saved["sps"] = [5.0, 1.5, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # cached by an older version on a busy machine
    cached.write_text(json.dumps(saved))
    assert sps_profile(target, 8, tmp_path).sps == pytest.approx(profile.sps)  # measured again
    assert json.loads(cached.read_text())["sps"] == pytest.approx(profile.sps)


def test_sps_profile_takes_each_passs_fastest_time_and_is_kept_per_processor(monkeypatch, tmp_path):
    # Two of every three passes are slowed by other work, by less than the disturbance check notices:
    # a median would take the slowed time, the fastest pass is the quiet one.
    target = TimedTarget(lambda b, call: quiet(b, call) * (1 if call % 3 == 0 else 1.15), monkeypatch)
    assert sps_profile(target, 8, tmp_path).sps == pytest.approx([1 / quiet(b, 0) for b in range(1, 9)])
    calls = target.calls
    monkeypatch.setattr(scheduler_module, "cpu_identity", lambda: "another processor")
    sps_profile(target, 8, tmp_path)
    assert target.calls > calls and len(list((tmp_path / "sps").glob("*.json"))) == 2


def test_a_disturbed_measurement_is_retaken_and_cached_once_it_is_sound(monkeypatch, tmp_path, capsys):
    # The first measurement (64-token context, then 6 sweeps over B = 1..8) shares the machine: every
    # third pass takes three times as long.
    first = 1 + 6 * 8
    target = TimedTarget(lambda b, call: quiet(b, call) * (3 if call <= first and call % 3 == 0 else 1), monkeypatch)
    profile = sps_profile(target, 8, tmp_path)
    assert profile == Profile(pytest.approx([1 / quiet(b, 0) for b in range(1, 9)]), noisy=False)
    assert target.calls == 2 * first and len(list((tmp_path / "sps").glob("*.json"))) == 1
    assert capsys.readouterr().err == ""


def every_third_pass_slowed(slowed=3.0, quiet=quiet):
    return lambda b, call: quiet(b, call) * (slowed if call % 3 == 0 else 1)


@pytest.mark.parametrize("kind", ["spread", "shape"])
def test_a_measurement_that_stays_disturbed_is_cached_as_noisy_and_not_waited_for_again(kind, monkeypatch, tmp_path, capsys):
    if kind == "spread":  # contention all along: every third pass is slow
        cost = every_third_pass_slowed()
    else:  # steady but implausible: a pass over 2 tokens takes three times as long as one over 5
        cost = lambda b, call: quiet(b, call) + (0.3 if b == 2 else 0)  # noqa: E731
    target = TimedTarget(cost, monkeypatch)
    profile = sps_profile(target, 8, tmp_path)
    assert profile.noisy and len(profile.sps) == 8 and all(v > 0 for v in profile.sps)
    assert target.calls == 3 * (1 + 6 * 8)  # three attempts
    err = capsys.readouterr().err
    assert "looks disturbed" in err and "marked noisy" in err
    if kind == "spread":
        # the fastest of each B is the quiet time in every attempt: the profile is still right
        assert profile.sps == pytest.approx([1 / quiet(b, 0) for b in range(1, 9)])
    # Cached as noisy: the next start takes it at once, without measuring.
    [cached] = (tmp_path / "sps").glob("*.json")
    assert json.loads(cached.read_text())["noisy"] is True
    calls = target.calls
    assert sps_profile(target, 8, tmp_path) == profile and target.calls == calls


def test_a_noisy_profile_keeps_each_passs_fastest_rate_until_a_measurement_settles(monkeypatch, tmp_path):
    target = TimedTarget(every_third_pass_slowed(quiet=lambda b, call: quiet(b, call) * (1.5 if b == 3 else 1)), monkeypatch)
    first = measure_profile(target, 8, tmp_path)
    assert first.noisy and first.sps[2] == pytest.approx(1 / (1.5 * quiet(3, 0)))
    # Measured again, still disturbed, with B=3 quiet this time and B=5 slowed: each B keeps its fastest rate yet.
    target.cost = every_third_pass_slowed(quiet=lambda b, call: quiet(b, call) * (1.5 if b == 5 else 1))
    second = measure_profile(target, 8, tmp_path)
    assert second.noisy and second.sps == pytest.approx([1 / quiet(b, 0) for b in range(1, 9)])
    assert cached_profile(target, 8, tmp_path) == second
    # A measurement that settles replaces it, whatever the noisy one held.
    target.cost = lambda b, call: quiet(b, call) * 1.1
    third = measure_profile(target, 8, tmp_path)
    assert not third.noisy and third.sps == pytest.approx([1 / (1.1 * quiet(b, 0)) for b in range(1, 9)])
    assert cached_profile(target, 8, tmp_path) == third


def test_a_measurement_stops_when_interrupted_and_caches_nothing(monkeypatch, tmp_path):
    target = TimedTarget(quiet, monkeypatch)
    rewound = []
    target.rewind = rewound.append
    asked = []
    with pytest.raises(Interrupted):
        measure_profile(target, 8, tmp_path, interrupted=lambda: asked.append(1) or len(asked) > 5)
    assert target.calls == 1 + 5  # the context, then one pass per "no"
    assert rewound[-1] == 0  # the target's cache is left empty, as after a whole measurement
    assert not (tmp_path / "sps").exists()


def test_disturbance_accepts_real_quiet_profiles_and_flags_busy_ones():
    def times(sps, jitter=0.02):
        return [[1 / v, 1 / v * (1 + jitter), 1 / v * (1 - jitter / 2)] for v in sps]
    assert disturbance(times(SMOLLM2_FP32)) is None  # its steps up (B=5 is 17% faster than B=4) are real
    assert disturbance(times(SMOLLM2_BF16)) is None
    assert disturbance(times(SMOLLM2_FP32_TRANSPOSED)) is None  # B=4 51% faster than B=3: real too
    busy = [5.82, 2.56, 0.96, 1.40, 2.45, 2.70, 0.39, 1.94]  # SmolLM2 float32 as once cached on a busy machine
    assert "faster than a smaller B" in disturbance(times(busy))
    assert "differ by" in disturbance(times(SMOLLM2_BF16, jitter=0.5))


def test_calibration_temperatures_change_the_confidences(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"temperatures": [2.0, 0.5]}))
    temps = load_calibration(path)
    logits = torch.tensor([2.0, 2.0, 2.0])
    got = Scheduler("threshold", temperatures=temps).confidences(logits)
    # positions past the file's last one reuse its last temperature
    assert got == pytest.approx([1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-4.0)), 1 / (1 + math.exp(-4.0))])
    for bad in ('{"temperatures": []}', '{"temperatures": [1.0, -2]}', "[1, 2]", "not json"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="calibration.json"):
            load_calibration(path)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown scheduler mode 'fast'"):
        Scheduler("fast")


def test_engine_profiles_for_auto_and_a_request_can_switch_modes(tiny_target, monkeypatch, tmp_path):
    monkeypatch.setattr("dspark_chat.engine.engine.cache_dir", lambda: tmp_path)
    drafter = load_drafter(str(REFERENCE / "dspark"), tiny_target)
    engine = Engine(tiny_target, drafter, Scheduler("auto"))
    assert engine.scheduler_for().sps is not None and len(engine.scheduler.sps) == drafter.block_size + 1
    assert engine.scheduler_for("threshold", 0.9).mode == "threshold"
    assert engine.scheduler.mode == "auto"
    steps = list(engine.generate([5, 6, 7, 8], max_new_tokens=12, scheduler="threshold", threshold=1.0))
    assert all(s.verified == 0 for s in steps)  # nothing is confident enough: plain decoding, same text


def test_engine_profiles_for_auto_with_prompt_lookup_too(tiny_target, monkeypatch, tmp_path):
    monkeypatch.setattr("dspark_chat.engine.engine.cache_dir", lambda: tmp_path)
    engine = Engine(tiny_target, PromptLookupDrafter(), Scheduler("auto"))
    assert len(engine.scheduler_for().sps) == 11  # B = 1..block + 1
    assert Engine(tiny_target, None, Scheduler("auto")).scheduler_for().sps is None  # no drafter: no profile


def test_auto_without_a_profile_verifies_every_draft():
    assert Scheduler("auto").verify_count(7, CONFIDENT) == 7
    assert Scheduler("auto").verify_count(10, None, match=1) == 10  # prompt lookup too


def test_a_server_engine_never_waits_for_the_profile_and_measures_it_when_asked(tiny_target, monkeypatch, tmp_path):
    """wait_for_profile=False (the server): the cached profile or none, never a measurement while loading or
    answering; every draft is verified until measure_profile (the worker, between requests) has run, once."""
    monkeypatch.setattr("dspark_chat.engine.engine.cache_dir", lambda: tmp_path)
    measured = []
    monkeypatch.setattr("dspark_chat.engine.engine.measure_profile",
                        lambda *args, **kwargs: measured.append(kwargs.get("interrupted")) or Profile([9.0] * 11, noisy=True))
    engine = Engine(tiny_target, PromptLookupDrafter(), Scheduler("auto"), wait_for_profile=False)
    prompt = [7, 8, 9, 10, 11] * 4
    tiny_target.rewind(0)
    steps = list(engine.generate(prompt, max_new_tokens=20))
    assert measured == [] and engine.profile is None and engine.profile_wanted
    assert all(s.verified == len(s.draft_ids) for s in steps) and sum(s.verified for s in steps) > 0
    ask = lambda: False  # noqa: E731
    engine.measure_profile(interrupted=ask)
    assert measured == [ask] and engine.scheduler.sps == [9.0] * 11 and engine.scheduler_for().sps == [9.0] * 11
    assert not engine.profile_wanted  # noisy, but measured once in this process: the next one measures again
    waiting = Engine(tiny_target, PromptLookupDrafter(), Scheduler("auto"))
    assert waiting.scheduler_for().sps == [9.0] * 11 and len(measured) == 2  # the default waits, once


def test_a_server_engine_takes_the_cached_profile_and_wants_a_noisy_one_measured_again(tiny_target, monkeypatch, tmp_path):
    monkeypatch.setattr("dspark_chat.engine.engine.cache_dir", lambda: tmp_path)
    path, key = scheduler_module._profile_path(tiny_target, 11, tmp_path)
    for noisy in (True, False):
        scheduler_module._save(path, key, Profile([9.0] * 11, noisy))
        engine = Engine(tiny_target, PromptLookupDrafter(), Scheduler("auto"), wait_for_profile=False)
        assert engine.scheduler_for().sps == [9.0] * 11 and engine.profile_wanted is noisy
