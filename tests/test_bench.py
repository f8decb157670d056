"""`dspark-chat bench` on a tiny model: every mode runs, the report holds every field, and the
greedy identity check catches a wrong output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dspark_chat.engine.bench as bench_module
from dspark_chat.engine.bench import bench, build_modes, format_table, read_prompts
from dspark_chat.engine.engine import Engine
from dspark_chat.engine.loading import load_drafter
from dspark_chat.engine.sampling import Sampling

from .conftest import REFERENCE

MODES = ["baseline", "drafter", "drafter:threshold", "prompt-lookup", "hf", "hf-prompt-lookup"]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"turns": ["def fibonacci(n):"]}, {"turns": ["import json", "class Engine:"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_every_mode_runs_and_greedy_outputs_agree(tiny_target, prompts):
    engine = Engine(tiny_target, load_drafter(str(REFERENCE / "dspark"), tiny_target))
    report = bench(engine, read_prompts(prompts, None), build_modes(engine, MODES, 5), Sampling(), 16)
    assert list(report["modes"]) == MODES
    assert report["divergences"] == []
    for name, row in report["modes"].items():
        assert row["tokens"] == 3 * 16  # three prompt turns, each to the budget (the tiny model never stops)
        assert row["decode_tokens_per_s_median"] > 0 and row["near_ties"] == row["mismatches"] == 0
        assert "speedup_vs_baseline" in row and "speedup_vs_hf" in row
    assert report["modes"]["baseline"]["tau"] == 1.0 and report["modes"]["drafter"]["tau"] >= 1.0
    assert {"cpu", "cores", "gpus", "torch", "transformers"} <= set(report["machine"])
    runs = report["runs"]
    assert len(runs) == 3 * len(MODES) and {r["turn"] for r in runs} == {0, 1}
    assert "baseline" in format_table(report) and "machine:" in format_table(report)


def test_a_wrong_output_is_reported_as_a_mismatch(tiny_target, prompts, monkeypatch):
    engine = Engine(tiny_target)
    real = bench_module.run_engine

    def corrupt(engine, mode, ids, sampling, max_new_tokens):
        tokens, stats = real(engine, mode, ids, sampling, max_new_tokens)
        if mode.name == "prompt-lookup":
            tokens = tokens[:3] + [(tokens[3] + 1) % 512] + tokens[4:]
        return tokens, stats

    monkeypatch.setattr(bench_module, "run_engine", corrupt)
    report = bench(engine, read_prompts(prompts, 1), build_modes(engine, ["baseline", "prompt-lookup"], 5), Sampling(), 8)
    [d] = report["divergences"]
    assert d["mode"] == "prompt-lookup" and d["position"] == 3 and not d["near_tie"]
    assert report["modes"]["prompt-lookup"]["mismatches"] == 1


def test_bad_prompt_files_and_modes_are_refused(tiny_target, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"prompt": "no turns"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected a JSON object with a 'turns' list"):
        read_prompts(bad, None)
    with pytest.raises(ValueError, match="mode drafter needs --drafter"):
        build_modes(Engine(tiny_target), ["drafter"], 5)
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        build_modes(Engine(tiny_target), ["fastest"], 5)


def test_command_line_writes_json(tiny_target_dir, prompts, tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "dspark_chat.app.cli", "bench", "--target", str(tiny_target_dir), "--prompts", str(prompts),
           "--limit", "1", "--max-new-tokens", "6", "--modes", "baseline", "prompt-lookup", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "prompt-lookup" in done.stdout and json.loads(out.read_text())["modes"]["baseline"]["tokens"] == 6
