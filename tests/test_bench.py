"""`dspark-chat bench` on a tiny model: every mode runs, the report holds every field, the greedy
identity check catches a wrong output, and the plot, the SPS profile and the progress lines work."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

import dspark_chat.engine.bench as bench_module
from dspark_chat.engine import cli
from dspark_chat.engine.bench import Progress, bench, build_modes, format_table, load_llama, read_prompts
from dspark_chat.engine.dspark import DSparkDrafter
from dspark_chat.engine.engine import Engine, folder_calibration
from dspark_chat.engine.loading import cache_dir, load_drafter, load_target
from dspark_chat.engine.prompt_lookup import LookupOrDraft
from dspark_chat.engine.sampling import Sampling
from dspark_chat.engine.scheduler import Scheduler, sps_profile

from .conftest import REFERENCE, make_tiny_pair

MODES = ["baseline", "drafter", "drafter:threshold", "drafter+lookup", "prompt-lookup", "prompt-lookup:off", "hf", "hf-prompt-lookup", "hf-assisted"]
ROW_FIELDS = {
    "decode_tokens_per_s_median", "decode_tokens_per_s_min", "decode_tokens_per_s_max", "time_to_first_token_ms_median",
    "tokens", "tau", "acceptance_rate", "draft_share", "acceptance_by_position", "identity_checked", "identity_note", "near_ties",
    "mismatches", "speedup_vs_baseline", "speedup_vs_baseline_range", "speedup_vs_hf", "speedup_vs_hf_range",
    "speedup_vs_eager", "speedup_vs_eager_range",
}
REPORT_FIELDS = {"machine", "target", "sampling", "max_new_tokens", "modes", "outputs_identical", "divergences", "runs", "repeats"}


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"turns": ["def fibonacci(n):"]}, {"turns": ["import json", "class Engine:"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def assistant(tmp_path_factory, tokenizer):
    """A smaller random Qwen3 with the tiny target's tokenizer: a draft model for assisted generation."""
    folder, _ = make_tiny_pair(tmp_path_factory.mktemp("assistant"), tokenizer)
    return load_target(str(folder), dtype="float32", device="cpu")


def test_every_mode_runs_and_greedy_outputs_agree(tiny_target, assistant, prompts):
    engine = Engine(tiny_target, load_drafter(str(REFERENCE / "dspark"), tiny_target))
    report = bench(engine, read_prompts(prompts, None), build_modes(engine, MODES, 5, assistant), Sampling(), 16)
    assert set(report) == REPORT_FIELDS and list(report["modes"]) == MODES
    assert report["divergences"] == [] and report["outputs_identical"] is True
    json.dumps(report, allow_nan=False)  # plain JSON: no NaN for a missing ratio
    for name, row in report["modes"].items():
        assert set(row) == ROW_FIELDS, name
        assert row["tokens"] == 3 * 16  # three prompt turns, each to the budget (the tiny model never stops)
        assert row["decode_tokens_per_s_median"] > 0
        assert row["speedup_vs_baseline"] > 0 and row["speedup_vs_hf"] > 0
        if name == "baseline":
            assert not row["identity_checked"] and row["near_ties"] is None
        else:
            assert row["identity_checked"] and row["near_ties"] == row["mismatches"] == 0
    rows = report["modes"]
    assert rows["baseline"]["tau"] == 1.0 and rows["drafter"]["tau"] >= 1.0
    assert rows["baseline"]["acceptance_by_position"] == []  # verifies no drafts
    for name in ("drafter", "drafter+lookup", "prompt-lookup"):
        curve = rows[name]["acceptance_by_position"]
        assert curve and all(a is None or 0 <= a <= 1 for a in curve)
    for name in ("drafter", "drafter+lookup", "prompt-lookup"):
        assert 0 < rows[name]["draft_share"] < 1
    for name in ("baseline", "hf", "hf-prompt-lookup", "hf-assisted"):  # drafts nothing, or does not report its rounds
        assert rows[name]["draft_share"] is None
    for name in ("hf", "hf-prompt-lookup", "hf-assisted"):  # generate() does not report its rounds
        assert rows[name]["tau"] is None and rows[name]["acceptance_by_position"] is None
    assert {"cpu", "cores", "gpus", "torch", "transformers"} <= set(report["machine"])
    runs = report["runs"]
    assert len(runs) == 3 * len(MODES) and {r["turn"] for r in runs} == {0, 1}
    assert "baseline" in format_table(report) and "machine:" in format_table(report)


def test_compile_both_runs_each_engine_mode_eager_and_compiled_side_by_side(tiny_target, compiled_tiny, prompts):
    from dspark_chat.engine.bench import compiled_modes

    engine = Engine(tiny_target, load_drafter(str(REFERENCE / "dspark"), tiny_target))
    modes = compiled_modes(build_modes(engine, ["baseline", "drafter+lookup", "hf"], 5), compiled_tiny, None, both=True)
    names = ["baseline", "baseline/compiled", "drafter+lookup", "drafter+lookup/compiled", "hf"]
    assert [m.name for m in modes] == names
    report = bench(engine, read_prompts(prompts, None), modes, Sampling(), 8)
    rows = report["modes"]
    assert report["outputs_identical"] is True and report["divergences"] == []
    for name in ("baseline/compiled", "drafter+lookup/compiled"):
        assert rows[name]["identity_checked"] and rows[name]["near_ties"] == rows[name]["mismatches"] == 0
        assert rows[name]["speedup_vs_eager"] > 0 and rows[name]["tokens"] == rows[name.removesuffix("/compiled")]["tokens"]
    assert rows["drafter+lookup"]["speedup_vs_eager"] is None and rows["hf"]["speedup_vs_eager"] is None
    table = format_table(report)
    assert "vs eager" in table and "MODE/compiled: ties/bugs against baseline/compiled, and baseline/compiled's against baseline" in table
    assert engine.target is tiny_target  # each compiled run swaps the target in and back


def test_repeats_keep_the_fastest_run_with_the_first_runs_output(tiny_target, prompts, monkeypatch):
    """Real runs, with their tok/s replaced by a script: per slot, the first run (6 tok/s), a faster one
    with another output (as unseeded sampling gives: never picked), a faster one with the same output.
    The repeats take turns: every mode once, then every mode again."""
    real_run = bench_module.run_mode
    rates = [6.0, 9.0, 7.0]
    calls = []

    def scripted(engine, mode, ids, sampling, max_new_tokens):
        tokens, stats = real_run(engine, mode, ids, sampling, max_new_tokens)
        rate = rates[sum(1 for name, seen in calls if name == mode.name and seen == ids)]
        calls.append((mode.name, ids))
        return (tokens + [0] if rate == 9.0 else tokens), stats | {"decode_tokens_per_s": rate}

    monkeypatch.setattr(bench_module, "run_mode", scripted)
    engine = Engine(tiny_target, None)
    modes = build_modes(engine, ["baseline", "prompt-lookup"], 5)
    report = bench(engine, read_prompts(prompts, None), modes, Sampling(), 8, warmup=False, repeats=3)
    assert len(calls) == 18 and report["repeats"] == 3
    assert [name for name, _ in calls[:6]] == ["baseline", "prompt-lookup"] * 3
    assert [r["decode_tokens_per_s"] for r in report["runs"]] == [7.0] * 6
    assert report["outputs_identical"] is True  # the first run's output is what is compared
    assert "fastest of 3 runs" in format_table(report)
    with pytest.raises(ValueError, match="at least 1"):
        bench(engine, read_prompts(prompts, None), modes, Sampling(), 8, warmup=False, repeats=0)


SPS = [10.0, 9.5, 9.0, 8.5, 8.0, 7.5, 7.0, 6.5, 6.0, 5.5, 5.0]  # a fixed verify-speed profile: no measuring


def _verified(engine, modes, prompts):
    """Per drafter mode: how many drafts its rounds verified, over every prompt turn."""
    report = bench(engine, read_prompts(prompts, None), modes, Sampling(), 12, warmup=False)
    assert report["outputs_identical"] is True
    counts = {}
    for run in report["runs"]:
        if run["mode"] != "baseline":
            counts[run["mode"]] = counts.get(run["mode"], 0) + run["stats"]["verified"]
    return counts


def test_several_drafters_run_side_by_side_each_with_its_own_calibration(tiny_target, prompts):
    """The same weights twice, the second with sharpened confidences: in one run each drafter mode verifies
    exactly as many drafts as a run with that drafter and calibration alone does, and the two differ."""
    sharp = [0.1] * 8
    alone = {}
    for temperatures in (None, sharp):
        engine = Engine(tiny_target, load_drafter(str(REFERENCE / "dspark"), tiny_target), Scheduler("auto", sps=SPS, temperatures=temperatures))
        alone[bool(temperatures)] = _verified(engine, build_modes(engine, ["baseline", "drafter", "drafter+lookup"], 5), prompts)
    assert alone[False]["drafter"] != alone[True]["drafter"]  # the calibration matters to this drafter's rounds

    engine = Engine(tiny_target, scheduler=Scheduler("auto", sps=SPS))
    drafters = {"plain": (load_drafter(str(REFERENCE / "dspark"), tiny_target), None),
                "sharp": (load_drafter(str(REFERENCE / "dspark"), tiny_target), sharp)}
    modes = build_modes(engine, ["baseline", "drafter", "drafter+lookup@sharp"], 5, drafters=drafters)
    assert [m.name for m in modes] == ["baseline", "drafter@plain", "drafter@sharp", "drafter+lookup@sharp"]
    together = _verified(engine, modes, prompts)
    assert together == {"drafter@plain": alone[False]["drafter"], "drafter@sharp": alone[True]["drafter"],
                        "drafter+lookup@sharp": alone[True]["drafter+lookup"]}
    assert engine.drafter is None and engine.scheduler.temperatures is None  # put back after every run
    with pytest.raises(ValueError, match="mode drafter@other: no drafter is labelled 'other'; the labels are: plain, sharp"):
        build_modes(engine, ["drafter@other"], 5, drafters=drafters)


def test_drafter_labels_are_folder_names_unless_two_share_one():
    assert bench_module.drafter_labels(["models/smollm2-dspark", "/runs/grown/"]) == ["smollm2-dspark", "grown"]
    assert bench_module.drafter_labels(["a/out", "b/out"]) == ["a/out", "b/out"]
    with pytest.raises(ValueError, match="--drafter names the same drafter twice: a/out a/out"):
        bench_module.drafter_labels(["a/out", "a/out"])


def test_acceptance_by_position_adds_counts_over_runs():
    # Run 1: one round verified 2 and accepted 1. Run 2: one round verified 2 and accepted 2.
    steps1 = [{"prefill": True}, {"verified": 2, "accepted": 1}]
    steps2 = [{"prefill": True}, {"verified": 2, "accepted": 2}, {"verified": 1, "accepted": 0}]
    stats = [bench_module.position_counts(steps1), bench_module.position_counts(steps2)]
    # Position 1: reached 3 times, accepted 2; position 2: reached twice (1 accepted before), accepted once.
    assert bench_module._acceptance_by_position(stats) == [2 / 3, 1 / 2]


@pytest.mark.parametrize("runner, corrupted", [("run_engine", "prompt-lookup"), ("run_hf", "hf-assisted")])
def test_a_wrong_output_is_reported_as_a_mismatch(tiny_target, assistant, prompts, monkeypatch, runner, corrupted):
    engine = Engine(tiny_target)
    real = getattr(bench_module, runner)

    def corrupt(engine, mode, ids, sampling, max_new_tokens):
        tokens, stats = real(engine, mode, ids, sampling, max_new_tokens)
        if mode.name == corrupted:
            tokens = tokens[:3] + [(tokens[3] + 1) % 512] + tokens[4:]
        return tokens, stats

    monkeypatch.setattr(bench_module, runner, corrupt)
    modes = build_modes(engine, ["baseline", corrupted], 5, assistant)
    report = bench(engine, read_prompts(prompts, 1), modes, Sampling(), 8)
    [d] = report["divergences"]
    assert d["mode"] == corrupted and d["position"] == 3 and not d["near_tie"]
    assert report["modes"][corrupted]["mismatches"] == 1 and report["outputs_identical"] is False


def test_sampled_outputs_are_not_compared(tiny_target, prompts):
    engine = Engine(tiny_target)
    report = bench(engine, read_prompts(prompts, 1), build_modes(engine, ["baseline", "hf"], 5), Sampling(0.8, seed=1), 4, warmup=False)
    assert report["outputs_identical"] is None and report["modes"]["hf"]["mismatches"] is None
    assert "hf: ties/bugs not checked: sampled outputs differ by chance" in format_table(report)


def test_bad_prompt_files_and_modes_are_refused(tiny_target, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"prompt": "no turns"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected a JSON object with a 'turns' list"):
        read_prompts(bad, None)
    with pytest.raises(ValueError, match="mode drafter needs --drafter"):
        build_modes(Engine(tiny_target), ["drafter"], 5)
    with pytest.raises(ValueError, match="unknown mode 'drafter-lookup'"):
        build_modes(Engine(tiny_target, load_drafter(str(REFERENCE / "dspark"), tiny_target)), ["drafter-lookup"], 5)
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        build_modes(Engine(tiny_target), ["fastest"], 5)
    with pytest.raises(ValueError, match="mode hf-assisted needs --assistant MODEL"):
        build_modes(Engine(tiny_target), ["hf-assisted"], 5)
    with pytest.raises(ValueError, match="mode prompt-lookup:threshold: prompt lookup takes the scheduler off"):
        build_modes(Engine(tiny_target), ["prompt-lookup:threshold"], 5)
    with pytest.raises(ValueError, match="mode llama.cpp needs a GGUF target"):
        build_modes(Engine(tiny_target), ["llama.cpp"], 5)


def test_an_assistant_with_another_vocabulary_is_refused(tiny_target, tmp_path):
    from .conftest import build_tokenizer

    folder, _ = make_tiny_pair(tmp_path, build_tokenizer(vocab_size=400))
    other = load_target(str(folder), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="has another vocabulary than target"):
        build_modes(Engine(tiny_target), ["hf-assisted"], 5, other)


def test_llama_cpp_missing_is_refused_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    gguf_target = SimpleNamespace(name=str(tmp_path / "model.gguf"), max_length=256)
    with pytest.raises(ValueError, match="pip install llama-cpp-python"):
        load_llama(gguf_target)


def test_prompt_lines_keep_unicode_line_separators(tmp_path):
    path = tmp_path / "prompts.jsonl"
    turns = ["first\u2028line", "para\u2029graph\x85next\x0cpage"]
    path.write_text(json.dumps({"turns": turns}, ensure_ascii=False) + "\n" + json.dumps({"turns": ["two"]}) + "\n", encoding="utf-8")
    assert read_prompts(path, None) == [turns, ["two"]]


def test_progress_without_a_terminal_prints_one_line_per_prompt():
    out = io.StringIO()  # not a TTY
    progress = Progress(prompts=2, runs=4, stream=out)
    for prompt, mode in [(0, "baseline"), (0, "hf"), (1, "hf"), (1, "baseline")]:
        progress(prompt, mode)
    progress.finish()
    lines = out.getvalue().split("\n")
    assert "\r" not in out.getvalue() and lines[-1] == ""
    assert re.fullmatch(r"prompt 1/2  elapsed 0:\d\d  ETA \?", lines[0])
    assert re.fullmatch(r"prompt 2/2  elapsed 0:\d\d  ETA 0:\d\d", lines[1])
    assert re.fullmatch(r"done: 4 runs in 0:\d\d", lines[2]) and len(lines) == 4


def test_progress_on_a_terminal_redraws_one_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    progress = Progress(prompts=2, runs=4, stream=out)
    progress(0, "baseline")
    progress(0, "prompt-lookup")
    assert "\n" not in out.getvalue() and out.getvalue().count("\r") == 2
    assert "prompt 1/2  prompt-lookup" in out.getvalue().split("\r")[-1]
    progress.finish()
    assert out.getvalue().endswith("\n")


def test_profile_prints_the_sps_table_the_scheduler_reads(tiny_target_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # platformdirs' cache dir on Linux
    assert cli.main(["bench", "--profile", "--target", str(tiny_target_dir), "--dtype", "float32", "--device", "cpu", "--block", "3"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert lines[0].startswith(f"SPS profile of {tiny_target_dir}")
    assert lines[1].split() == ["B", "verify", "passes/s", "tok/s", "if", "all", "accepted", "cost", "vs", "B=1"]
    rows = [line.split() for line in lines[2:6]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"] and rows[0][3] == "1.00x"
    for b, sps, tokens, _ in rows:
        assert float(tokens) == pytest.approx(int(b) * float(sps), abs=0.1 * int(b))
    assert lines[6].startswith("A pass over 4 tokens costs")
    # The numbers are the cached profile the auto scheduler decides with; a noisy one says so.
    target = load_target(str(tiny_target_dir), dtype="float32", device="cpu")
    profile = sps_profile(target, 4, cache_dir())
    assert [f"{s:.1f}" for s in profile.sps] == [r[1] for r in rows]
    assert lines[7:] == (["Noisy: no measurement settled while other work slowed the passes; each B's fastest rate so far "
                          "(servers measure a noisy profile again between requests)."] if profile.noisy else [])


def test_bench_without_prompts_is_refused(capsys):
    assert cli.main(["bench", "--target", "smollm2"]) == 2
    assert "bench needs --prompts FILE (or --profile)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # refused before any model loads
        cli.main(["bench", "--prompts", "p.jsonl", "--repeats", "0"])
    assert "--repeats: must be at least 1, got 0" in capsys.readouterr().err


def modes_built(monkeypatch) -> list:
    """The modes each bench run builds, recorded."""
    built, real = [], bench_module.build_modes
    monkeypatch.setattr(bench_module, "build_modes", lambda *args, **kwargs: built.append(real(*args, **kwargs)) or built[-1])
    return built


def test_with_no_options_bench_runs_the_shipped_drafter_with_prompt_lookup_as_the_app_does(tiny_target_dir, prompts, tmp_path,
                                                                                            monkeypatch):
    """A target with a shipped drafter (the embedded model; here the tiny one, given the reference drafter) is
    measured as generate and the app run it: drafter + lookup, beside the baseline and the peers."""
    monkeypatch.setattr(bench_module, "shipped_drafter", lambda target: str(REFERENCE / "dspark") if target == str(tiny_target_dir) else None)
    built = modes_built(monkeypatch)
    out = tmp_path / "report.json"
    assert cli.main(["bench", "--target", str(tiny_target_dir), "--prompts", str(prompts), "--limit", "1", "--max-new-tokens", "6",
                     "--dtype", "float32", "--device", "cpu", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["modes"]) == ["baseline", "drafter+lookup", "prompt-lookup", "hf", "hf-prompt-lookup"]
    assert report["outputs_identical"] is True and report["modes"]["drafter+lookup"]["tau"] is not None
    [modes] = built
    app_like = modes[1].drafter
    assert isinstance(app_like, LookupOrDraft) and app_like.lookup.block_size == 10 and app_like.lookup.min_match == LookupOrDraft.MIN_MATCH
    assert isinstance(app_like.drafter, DSparkDrafter) and app_like.drafter.int8  # the shipped drafter, as the app loads it


@pytest.mark.slow
def test_with_no_options_bench_measures_the_embedded_pair_as_the_app_runs_it(smollm2, prompts, tmp_path, monkeypatch):
    """`dspark-chat bench --prompts FILE` alone: SmolLM2 with its shipped drafter and prompt lookup, against the
    baseline and the peers. (The session's SmolLM2 stands in for loading it again.)"""
    import dspark_chat.engine.engine as engine_module
    from dspark_chat.engine.catalog import SHIPPED_DRAFTERS

    monkeypatch.setattr(engine_module, "load_target", lambda spec, *args, **kwargs: smollm2 if spec == "smollm2" else None)
    built = modes_built(monkeypatch)
    out = tmp_path / "report.json"
    assert cli.main(["bench", "--prompts", str(prompts), "--limit", "1", "--max-new-tokens", "8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["modes"]) == ["baseline", "drafter+lookup", "prompt-lookup", "hf", "hf-prompt-lookup"]
    assert report["target"] == "smollm2" and report["outputs_identical"] is True
    drafter = built[0][1].drafter.drafter
    assert isinstance(drafter, DSparkDrafter) and drafter.int8 and drafter.embed_tokens is smollm2.model.get_input_embeddings()
    assert report["engine"].startswith("smollm2") and "drafter block 7 in int8" in report["engine"]
    assert built[0][1].temperatures == folder_calibration(SHIPPED_DRAFTERS["smollm2"])  # its calibration too


KIND_PAIRS = """
[pairs.tiny-dspark-lookup]
target = "tiny"
kind = "dspark+lookup"
block_size = 7
drafter = "acme/tiny-dspark"
drafter_layers = 2
drafter_params = 150_000
drafter_dtype = "float32"
drafter_download_bytes = 600_000
license = "MIT"

[pairs.tiny-lookup]
target = "tiny"
kind = "prompt-lookup"
block_size = 10
license = "MIT"
"""


def test_a_catalog_pair_runs_in_the_mode_of_its_kind(tiny_target_dir, prompts, tmp_path, monkeypatch):
    """--model takes a catalog pair's target (placed by its fit plan) and its drafter, and runs the drafter the way
    the pair's kind says, beside the baseline and the peers: dspark as `drafter`, dspark+lookup as `drafter+lookup`,
    a prompt-lookup pair with prompt lookup alone (one of the peers)."""
    from huggingface_hub import constants

    from .test_hub import build_cache
    from .test_tui import CATALOG

    build_cache(tmp_path, {p.name: p.read_bytes() for p in tiny_target_dir.iterdir() if p.is_file()})
    build_cache(tmp_path, {p.name: p.read_bytes() for p in (REFERENCE / "dspark").iterdir()}, repo="acme/tiny-dspark")
    (tmp_path / "config" / "dspark-chat").mkdir(parents=True)
    (tmp_path / "config" / "dspark-chat" / "models.toml").write_text(CATALOG + KIND_PAIRS)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    built = modes_built(monkeypatch)
    peers = ["prompt-lookup", "hf", "hf-prompt-lookup"]
    for pair, modes in (("tiny-dspark", ["baseline", "drafter", *peers]), ("tiny-dspark-lookup", ["baseline", "drafter+lookup", *peers]),
                        ("tiny-lookup", ["baseline", *peers])):
        out = tmp_path / f"{pair}.json"
        assert cli.main(["bench", "--model", pair, "--prompts", str(prompts), "--limit", "1", "--max-new-tokens", "6", "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert list(report["modes"]) == modes and report["pair"] == pair and report["outputs_identical"] is True
        assert report["target"] == "acme/tiny"
        drafters = [m.drafter for m in built[-1] if m.name.startswith("drafter")]
        assert all(isinstance(d.drafter if isinstance(d, LookupOrDraft) else d, DSparkDrafter) for d in drafters)
    with pytest.raises(SystemExit):  # a pair names its own target
        cli.main(["bench", "--model", "tiny-dspark", "--target", str(tiny_target_dir), "--prompts", str(prompts)])


def test_command_line_writes_json_and_plot(tiny_target_dir, prompts, tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    out, png = tmp_path / "report.json", tmp_path / "plot.png"
    cmd = [sys.executable, "-m", "dspark_chat.app.cli", "bench", "--target", str(tiny_target_dir), "--prompts", str(prompts),
           "--max-new-tokens", "6", "--modes", "baseline", "prompt-lookup", "--json", str(out), "--plot", str(png)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "prompt-lookup" in done.stdout
    report = json.loads(out.read_text())
    assert report["modes"]["baseline"]["tokens"] == 3 * 6 and report["outputs_identical"] is True
    assert {"command", "engine", "assistant"} <= set(report)
    # Not a terminal: one plain line per prompt, then the summary line.
    progress = [line for line in done.stderr.split("\n") if line.startswith(("prompt ", "done: "))]
    assert [line.split("  ")[0] for line in progress[:2]] == ["prompt 1/2", "prompt 2/2"]
    assert progress[2].startswith("done: 6 runs in ") and len(progress) == 3
    assert "\r" not in done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib_image.imread(str(png)).shape == (480, 1200, 4)  # 12 x 4.8 inches at 100 dpi
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_command_line_compares_two_drafters_in_one_run(tiny_target_dir, prompts, tmp_path):
    calibrated = tmp_path / "calibrated"
    shutil.copytree(REFERENCE / "dspark", calibrated)
    (calibrated / "calibration.json").write_text(json.dumps({"temperatures": [0.5] * 8}))
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "dspark_chat.app.cli", "bench", "--target", str(tiny_target_dir), "--prompts", str(prompts),
           "--limit", "1", "--max-new-tokens", "6", "--drafter", str(REFERENCE / "dspark"), str(calibrated),
           "--modes", "baseline", "drafter", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.split("\n") if line.startswith(("mode ", "baseline ", "drafter@"))]
    assert len(rows) == 4 and len({len(line) for line in rows}) == 1  # the long mode names keep the columns aligned
    report = json.loads(out.read_text())
    assert list(report["modes"]) == ["baseline", "drafter@dspark", "drafter@calibrated"]
    assert report["drafters"] == {"dspark": str(REFERENCE / "dspark"), "calibrated": str(calibrated)}
    assert report["outputs_identical"] is True


@pytest.fixture
def llama_cpp():
    """Listed before smollm2 in a test's arguments, so a machine without llama-cpp-python skips the load."""
    return pytest.importorskip("llama_cpp")


@pytest.mark.slow
def test_llama_cpp_runs_the_embedded_gguf_and_stays_out_of_the_identity_check(llama_cpp, smollm2, monkeypatch):
    engine = Engine(smollm2)
    real = bench_module.run_llama
    seen = {}

    def wrong(engine, mode, ids, sampling, max_new_tokens):
        tokens, stats = real(engine, mode, ids, sampling, max_new_tokens)
        seen[tuple(ids)] = list(tokens)
        return [(t + 1) % smollm2.vocab_size for t in tokens], stats  # would be a mismatch if it were compared

    monkeypatch.setattr(bench_module, "run_llama", wrong)
    report = bench(engine, [["What is 2 + 2?"]], build_modes(engine, ["baseline", "llama.cpp"], 5), Sampling(), 6)
    answer = seen[tuple(engine.chat_ids([{"role": "user", "content": "What is 2 + 2?"}]))]
    assert 1 <= len(answer) <= 6 and engine.tokenizer.decode(answer, skip_special_tokens=True).strip()
    row = report["modes"]["llama.cpp"]
    assert row["tokens"] == len(answer) and row["decode_tokens_per_s_median"] > 0 and row["time_to_first_token_ms_median"] > 0
    assert set(row) == ROW_FIELDS and row["tau"] is None
    assert not row["identity_checked"] and row["near_ties"] is None and row["mismatches"] is None
    assert report["divergences"] == [] and report["outputs_identical"] is None
    table = format_table(report)
    assert re.search(r"^llama\.cpp .* - +-$", table, re.M)
    assert "llama.cpp: ties/bugs excluded: llama.cpp computes with the GGUF's quantised weights" in table


def test_the_machine_is_named_by_generation_and_vector_width(monkeypatch):
    # A VM's processor name can be generic: the report tells an AVX2 host from an AVX-512 one of the same name.
    for flags, width in (("fpu avx2 avx512f avx512_bf16", ", AVX-512"), ("fpu avx2", ", AVX2"), ("fpu sse2", "")):
        fields = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": flags}
        monkeypatch.setattr(bench_module, "cpuinfo", lambda: fields)
        assert bench_module.machine()["cpu"] == f"AMD EPYC (family 26 model 2{width})"
    monkeypatch.setattr(bench_module, "cpuinfo", lambda: {})  # no /proc/cpuinfo (macOS)
    assert bench_module.machine()["cpu"]
