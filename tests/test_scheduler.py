"""Confidence-scheduled verification: the three modes, the SPS profile, calibration."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dspark_chat.engine.engine import Engine
from dspark_chat.engine.loading import load_drafter
from dspark_chat.engine.scheduler import Scheduler, load_calibration, sps_profile

from .conftest import REFERENCE

CONFIDENT = [0.95, 0.9, 0.85, 0.8, 0.6, 0.4, 0.2]
GPU_LIKE = [100.0, 99.0, 98.5, 98.0, 97.5, 97.0, 96.5, 96.0]  # verifying 8 tokens costs what 1 does
CPU_LIKE = [100.0, 70.0, 52.0, 42.0, 35.0, 30.0, 26.0, 23.0]  # each extra token costs


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


def test_auto_decides_on_position_k_without_looking_past_it():
    """Lossless sampling needs the decision for position k to ignore c_(k+1), which depends on x_k:
    whatever follows the first refused position cannot change the count."""
    g = torch.Generator().manual_seed(0)
    for sps in (CPU_LIKE, GPU_LIKE):
        scheduler = Scheduler("auto", sps=sps)
        for _ in range(200):
            conf = torch.rand(7, generator=g).tolist()
            chosen = scheduler.verify_count(7, conf)
            tail = torch.rand(7, generator=g).tolist()
            changed = conf[: chosen + 1] + tail[: 6 - chosen]
            assert scheduler.verify_count(7, changed) == chosen


def test_drafters_without_confidences_are_verified_in_full():
    assert Scheduler("auto", sps=CPU_LIKE).verify_count(5, None) == 5
    assert Scheduler("threshold").verify_count(5, None) == 5


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


def test_sps_profile_is_measured_once_and_cached(tiny_target, tmp_path):
    profile = sps_profile(tiny_target, 8, tmp_path)
    assert len(profile) == 8 and all(v > 0 for v in profile)
    [cached] = (tmp_path / "sps").glob("*.json")
    saved = json.loads(cached.read_text())
    assert saved["sps"] == profile and saved["key"][0] == tiny_target.name
    saved["sps"] = [1.0] * 8
    cached.write_text(json.dumps(saved))
    assert sps_profile(tiny_target, 8, tmp_path) == [1.0] * 8  # read back, not measured again


def test_engine_profiles_for_auto_and_a_request_can_switch_modes(tiny_target, monkeypatch, tmp_path):
    monkeypatch.setattr("dspark_chat.engine.engine.cache_dir", lambda: tmp_path)
    drafter = load_drafter(str(REFERENCE / "dspark"), tiny_target)
    engine = Engine(tiny_target, drafter, Scheduler("auto"))
    assert engine.scheduler_for().sps is not None and len(engine.scheduler.sps) == drafter.block_size + 1
    assert engine.scheduler_for("threshold", 0.9).mode == "threshold"
    assert engine.scheduler.mode == "auto"
    steps = list(engine.generate([5, 6, 7, 8], max_new_tokens=12, scheduler="threshold", threshold=1.0))
    assert all(s.verified == 0 for s in steps)  # nothing is confident enough: plain decoding, same text
