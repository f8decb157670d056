"""Compiled passes (engine/compiled.py): the same logits as transformers, the same losslessness as the
eager loop, refusals with a reason, and a failed compilation that leaves the target eager."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dspark_chat.engine import compiled as compiled_module
from dspark_chat.engine.compiled import CompiledTarget, compile_target, key_length, refusal
from dspark_chat.engine.decode import decode
from dspark_chat.engine.divergence import explain_divergence
from dspark_chat.engine.loading import cache_dir, load_drafter
from dspark_chat.engine.prompt_lookup import LookupOrDraft, PromptLookupDrafter
from dspark_chat.engine.sampling import Sampling
from dspark_chat.engine.scheduler import Scheduler
from dspark_chat.engine.target import Target

from .conftest import DATA, REFERENCE, SPECULATORS, Forcing, make_tiny_eagle3
from .test_lossless import few_prompts, generated  # noqa: F401 (few_prompts: a fixture)


def tiny_llama(tokenizer) -> Target:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=256, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                         tie_word_embeddings=True)
    return Target(LlamaForCausalLM(config), tokenizer, "tiny-llama")


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_the_static_forward_gives_transformers_logits_and_features(family, tiny_target, tokenizer, reference):
    eager = tiny_target if family == "qwen3" else tiny_llama(tokenizer)
    static = CompiledTarget(eager.model, tokenizer, eager.name, max_width=8, feature_layers=(-1, 0, 2))
    ids = [t for prompt in reference["prompts"] for t in prompt][:40]
    for target in (eager, static):
        target.rewind(0)
        target.forward(ids[:30], last_only=True)
    # A verify pass, a rollback past part of it, and a pass again: the cache is a length change.
    for length, step in ((30, ids[30:36]), (33, ids[33:40])):
        outputs = []
        for target in (eager, static):
            target.rewind(length)
            outputs.append(target.forward(step, (2, -1)))
        torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(outputs[1][1], outputs[0][1], atol=1e-4, rtol=1e-4)
    assert static.cached_ids == eager.cached_ids == ids[:40]


def test_targets_it_does_not_reproduce_are_refused_with_the_reason(tiny_target_dir, tiny_target, capsys):
    with torch.device("meta"):
        gemma = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DATA / "deepspec_reference_gemma4" / "target"))
        sliding = AutoConfig.from_pretrained(tiny_target_dir)
        sliding.layer_types = ["sliding_attention", "full_attention"] * 2
        windowed = AutoModelForCausalLM.from_config(sliding)
    assert "Gemma" in refusal(gemma) and "sliding windows" in refusal(gemma)
    assert "sliding-window or recurrent layers" in refusal(windowed)
    assert refusal(tiny_target.model) is None
    head = tiny_target.model.lm_head
    head._hf_hook = object()  # what accelerate's dispatch leaves on a split model's modules
    try:
        assert "split over devices by accelerate" in refusal(tiny_target.model)
        assert compile_target(tiny_target, 8, (), cache_dir()) is tiny_target
    finally:
        del head._hf_hook
    warning = capsys.readouterr().err.strip()
    assert warning.count("\n") == 0 and warning.startswith("warning:") and "runs eagerly" in warning


def test_a_failed_compilation_leaves_the_target_eager_with_a_one_line_warning(tiny_target, monkeypatch, capsys):
    def fail(self):
        raise RuntimeError("Compiler: cc is not found.\nmore detail")

    monkeypatch.setattr(CompiledTarget, "compile", fail)
    assert compile_target(tiny_target, 8, (0, 2), cache_dir()) is tiny_target
    assert capsys.readouterr().err == f"warning: {tiny_target.name} runs eagerly: compiling failed (RuntimeError: Compiler: cc is not found.)\n"



def test_a_compiled_pass_that_fails_later_falls_back_to_eager_with_a_one_line_warning(tiny_target, tokenizer, capsys):
    """A recompilation that fails mid-request (after compile() warmed up): the pass runs eagerly, and so does every
    later one."""
    static = CompiledTarget(tiny_target.model, tokenizer, "tiny", max_width=8)

    def fail(*args):
        raise RuntimeError("recompiling failed")

    static.compiled, static.warmed = fail, True
    ids = [5, 9, 14, 3, 7]
    tiny_target.rewind(0)
    expected, _ = tiny_target.forward(ids)
    logits, _ = static.forward(ids)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert static.compiled is None
    assert capsys.readouterr().err == "warning: a compiled pass failed (RuntimeError); tiny runs eagerly from now on\n"

def test_the_start_says_first_start_or_cached_with_the_time_it_took(tiny_target, monkeypatch, tmp_path):
    monkeypatch.setattr(CompiledTarget, "compile", lambda self: None)
    said = []
    compile_target(tiny_target, 8, (0, 2), tmp_path, said.append)
    assert said[-1] == f"first start on this machine, about {compiled_module.FIRST_COMPILE_GUESS[0] * 4:.0f} s"
    compile_target(tiny_target, 8, (0, 2), tmp_path, said.append)
    assert said[-1].startswith("cached on this machine, about ")
    # Another model on the same machine: its first start is estimated from this one, per layer.
    timings = next(tmp_path.glob("compile/*/seconds.json"))
    entry = next(iter(json.loads(timings.read_text()).values()))
    compile_target(tiny_target, 8, (0,), tmp_path, said.append)
    assert said[-1] == f"first start on this machine, about {entry['first'] / entry['layers'] * 4:.0f} s"


def test_a_later_start_reads_its_compilation_from_the_caches_on_disk(tiny_target, tmp_path, monkeypatch):
    """What makes compiling a once-per-machine cost: a second compilation of the same model finds inductor's and
    AOTAutograd's results on disk. Freezing the weights into the graph would bypass both caches."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))  # compile_target moves it: put it back after
    for start in ("first", "later"):
        torch._dynamo.reset()  # what a new process starts from: nothing compiled in memory
        counters.clear()
        assert isinstance(compile_target(tiny_target, 8, (0, 2), tmp_path), CompiledTarget)
        caches = {name: count for name, count in {**counters["inductor"], **counters["aot_autograd"]}.items() if "cache" in name}
        assert not any("bypass" in name for name in caches), caches
        if start == "first":
            assert caches.get("fxgraph_cache_miss") and caches.get("autograd_cache_saved"), caches
        else:
            assert caches.get("fxgraph_cache_hit") and caches.get("autograd_cache_hit") and "fxgraph_cache_miss" not in caches, caches


def test_attended_lengths_come_in_few_sizes_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [key_length(n, cpu) for n in (0, 1, 64, 65, 1000)] == [64, 64, 64, 128, 1024]
    sizes = {key_length(n, cuda) for n in range(1, 40961)}
    assert min(sizes) == 256 and max(sizes) >= 40960 and len(sizes) <= 2 * 8 + 2
    assert all(key_length(n, cuda) >= n and key_length(n, cuda) <= max(256, 1.5 * n) for n in range(1, 40961, 97))


@pytest.fixture(scope="module")
def compiled_baselines(compiled_tiny, few_prompts):
    """The compiled target's own greedy text for few_prompts: what every drafter must reproduce."""
    return [generated(compiled_tiny, None, prompt) for prompt in few_prompts]


SLOW = pytest.mark.slow  # the same loop under another drafter or scheduler mode: CI's slow run


@pytest.mark.parametrize("variant,mode", [("dspark", "off"), ("dspark", "threshold"), pytest.param("dspark", "auto", marks=SLOW),
                                          pytest.param("dspark_rnn", "auto", marks=SLOW), ("dflash", "off"),
                                          pytest.param("dflash", "auto", marks=SLOW), ("prompt_lookup", "auto"), ("dspark+lookup", "auto")])
def test_compiled_greedy_speculation_equals_compiled_plain_decoding(variant, mode, compiled_tiny, few_prompts, compiled_baselines):
    target = compiled_tiny
    drafter = None if variant == "prompt_lookup" else load_drafter(str(REFERENCE / variant.removesuffix("+lookup")), target)
    if variant == "prompt_lookup":
        drafter = PromptLookupDrafter()
    elif variant.endswith("+lookup"):
        drafter = LookupOrDraft(drafter, PromptLookupDrafter(block_size=10, min_match=2))
    sps = [100.0, 95.0, 90.0, 80.0, 75.0, 70.0, 66.0, 60.0, 58.0, 55.0, 52.0]
    scheduler = Scheduler(mode=mode, threshold=0.6, sps=sps)
    for prompt, baseline in zip(few_prompts, compiled_baselines):
        assert generated(target, drafter, prompt, scheduler) == baseline
        if variant in ("dspark", "dflash"):
            # Rounds that accept 0..7 drafts: every rollback length of the compiled cache.
            forcing = Forcing(drafter, len(prompt), baseline + [0] * 8, [3, 7, 0, 5, 1, 6, 2, 4])
            assert generated(target, forcing, prompt, scheduler) == baseline


def test_compiled_plain_decoding_parts_from_eager_only_at_near_ties(compiled_tiny, tiny_target, few_prompts):
    for prompt in few_prompts:
        eager, compiled = generated(tiny_target, None, prompt, max_new_tokens=60), generated(compiled_tiny, None, prompt, max_new_tokens=60)
        divergence = explain_divergence(tiny_target, prompt, eager, compiled)
        assert divergence is None or divergence.near_tie, divergence.describe()


def test_compiled_cache_after_many_rounds_equals_a_fresh_prefill(compiled_tiny, reference):
    drafter = load_drafter(str(REFERENCE / "dspark"), compiled_tiny)
    prompt = reference["prompts"][1]
    greedy = generated(compiled_tiny, None, prompt, max_new_tokens=60)
    compiled_tiny.rewind(0)
    forcing = Forcing(drafter, len(prompt), greedy + [0] * 8, [3, 7, 0, 5, 1, 6, 2, 4])
    ids = prompt + [t for s in decode(compiled_tiny, forcing, prompt, Sampling(), 60) for t in s.token_ids]
    assert compiled_tiny.cached_ids == ids[:-1]
    cached, _ = compiled_tiny.forward(ids[-1:])
    fresh = compiled_tiny.model(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(cached[-1], fresh, atol=1e-4, rtol=1e-4)


def test_one_graph_serves_every_width_position_and_attended_length(compiled_tiny):
    """After the warm-up, passes of every width at every position (past a first attended length of 64) run the
    graph compiled then: compiling again would raise here, and the target would have switched to eager."""
    import torch._dynamo

    ids = [(i * 37) % 500 + 4 for i in range(160)]
    compiled_tiny.rewind(0)
    compiled_tiny.forward(ids[:5], last_only=True)
    at = 5
    with torch._dynamo.config.patch(error_on_recompile=True):
        for width in [1, 2, 3, 5, 8, 11, 1, 4, 7] * 4:
            compiled_tiny.forward(ids[at : at + width])
            compiled_tiny.rewind(at + width // 2)  # a verify pass that kept half its drafts
            at += width // 2
    assert at > 64 and compiled_tiny.compiled is not None


@pytest.mark.parametrize("variant", ["dspark", pytest.param("dflash", marks=SLOW)])
def test_a_compiled_float_drafter_drafts_losslessly_without_compiling_again(variant, compiled_tiny, few_prompts, compiled_baselines):
    import torch._dynamo

    from dspark_chat.engine.compiled import compile_drafter

    drafter = load_drafter(str(REFERENCE / variant), compiled_tiny, int8=False)
    compile_drafter(drafter, compiled_tiny.max_length)
    assert drafter.compiled is not None
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt, baseline in zip(few_prompts, compiled_baselines):
            assert generated(compiled_tiny, drafter, prompt, Scheduler(mode="off")) == baseline
            forcing = Forcing(drafter, len(prompt), baseline + [0] * 8, [3, 7, 0, 5, 1, 6, 2, 4])
            assert generated(compiled_tiny, forcing, prompt) == baseline
    int8 = load_drafter(str(REFERENCE / variant), compiled_tiny)
    compile_drafter(int8, compiled_tiny.max_length)  # refused, with a note: it stays eager
    assert int8.compiled is None


def test_an_eagle3_chain_compiles_and_drafts_as_it_does_eagerly(compiled_tiny, tiny_target, tiny_target_dir, few_prompts,
                                                               compiled_baselines, tmp_path, capsys):
    """The chain's steps write into the caches' reserved buffers and attend to them up to a bucketed length, masked:
    drafts equal the eager chain's at contexts on both sides of a bucket's end, with one graph; forced rounds on the
    compiled target accept 0..7 drafts, rolling back both caches, and the output stays the compiled target's own.
    An int8 chain stays eager, with a note."""
    import torch._dynamo

    from dspark_chat.engine.compiled import compile_drafter

    folder = str(make_tiny_eagle3(tmp_path / "eagle3", tiny_target_dir, chain=7))
    eager, compiled = (load_drafter(folder, tiny_target, int8=False) for _ in range(2))
    compile_drafter(LookupOrDraft(compiled), compiled_tiny.max_length)
    assert compiled.compiled is not None
    torch.manual_seed(0)
    ids = torch.randint(4, 500, (200,))
    tiny_target.rewind(0)
    _, features = tiny_target.forward(ids.tolist(), eager.feature_layers)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for length in (2, 9, 57, 58, 130, 200):
            drafts = []
            for drafter in (eager, compiled):
                drafter.rewind(0)
                drafter.observe(features[: length - 1])
                drafts.append(drafter.propose(ids[:length], drafter.block_size, Sampling()).tokens.tolist())
            assert drafts[0] == drafts[1], length
        for prompt, baseline in zip(few_prompts, compiled_baselines):
            forcing = Forcing(compiled, len(prompt), baseline + [0] * 8, [3, 7, 0, 5, 1, 6, 2, 4])
            assert generated(compiled_tiny, forcing, prompt) == baseline
    int8 = load_drafter(folder, compiled_tiny)
    capsys.readouterr()
    compile_drafter(int8, compiled_tiny.max_length)
    assert int8.compiled is None and capsys.readouterr().err.startswith("note: the drafter is not compiled: its int8 products")


@pytest.mark.parametrize("variant", ["dspark_bonus_rnn", "dflash_anchor_window", "dspark_bonus_window"])
def test_speculators_layouts_draft_compiled_as_they_do_eagerly(variant, tiny_target, few_prompts):
    """A 1+N block (the anchor's slot drafts nothing; with an RNN Markov head, whose state the anchor's slot starts)
    and sliding-window layers, causal or not: the compiled block reads the context to a bucketed length and masks
    the window there, where the eager block cuts the context to it. Contexts shorter and longer than the window, on
    both sides of a bucket's end, draft the same tokens, with one graph."""
    import torch._dynamo

    from dspark_chat.engine.compiled import compile_drafter

    eager = load_drafter(str(SPECULATORS / variant), tiny_target, int8=False)
    compiled = load_drafter(str(SPECULATORS / variant), tiny_target, int8=False)
    assert eager.first_slot or any(layer.self_attn.window is not None for layer in eager.layers)
    compile_drafter(compiled, 256)
    assert compiled.compiled is not None
    torch.manual_seed(0)
    ids = torch.randint(4, 500, (200,))
    _, features = tiny_target.forward(ids.tolist(), eager.feature_layers)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for length in (3, 9, 40, 64, 65, 130, 200):
            proposals = []
            for drafter in (eager, compiled):
                drafter.rewind(0)
                drafter.observe(features[: length - 1])
                proposals.append(drafter.propose(ids[:length], drafter.block_size, Sampling()))
            assert proposals[0].tokens.tolist() == proposals[1].tokens.tolist(), length
            if proposals[0].confidence_logits is not None:
                torch.testing.assert_close(proposals[1].confidence_logits, proposals[0].confidence_logits, rtol=1e-4, atol=1e-4)
        for prompt in few_prompts[:2]:
            assert generated(tiny_target, compiled, prompt, Scheduler(mode="off")) == generated(tiny_target, None, prompt)


SMOLLM2_PROMPTS = [
    "Rename the function to add_numbers and keep everything else the same:\ndef sum_two(a, b):\n    return a + b\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?",
]
SMOLLM2_SPS = [47.8, 45.2, 43.7, 44.2, 41.8, 40.8, 35.6, 37.2, 35.2, 34.5, 33.8]  # the 2-core CPU's profile, B = 1..11


@pytest.fixture(scope="module")
def compiled_smollm2(smollm2):
    from dspark_chat.engine.catalog import shipped_drafter

    drafter = load_drafter(shipped_drafter("smollm2"), smollm2, int8=False)
    target = compile_target(smollm2, 11, drafter.feature_layers, cache_dir())
    assert isinstance(target, CompiledTarget)
    from dspark_chat.engine.compiled import compile_drafter

    compile_drafter(drafter, target.max_length)
    assert drafter.compiled is not None
    return target, drafter


@pytest.mark.slow
def test_compiled_smollm2_speculation_equals_its_own_plain_decoding(compiled_smollm2, smollm2):
    """The real model in float32: every drafter kind under every scheduler mode gives the compiled target's own
    greedy text, and that text parts from the eager target's only at near-ties."""
    from dspark_chat.engine.engine import Engine

    target, drafter = compiled_smollm2
    kinds = {"drafter": drafter, "prompt lookup": PromptLookupDrafter(), "drafter + lookup": LookupOrDraft(drafter)}
    for text in SMOLLM2_PROMPTS:
        prompt = Engine(target).chat_ids([{"role": "user", "content": text}])
        plain = generated(target, None, prompt, max_new_tokens=64)
        eager = generated(smollm2, None, prompt, max_new_tokens=64)
        divergence = explain_divergence(smollm2, prompt, eager, plain)
        assert divergence is None or divergence.near_tie, divergence.describe()
        for name, kind in kinds.items():
            for mode in ("off", "threshold", "auto"):
                scheduler = Scheduler(mode=mode, sps=SMOLLM2_SPS)
                assert generated(target, kind, prompt, scheduler, max_new_tokens=64) == plain, (name, mode)


@pytest.mark.slow  # compiles a target and a drafter in a fresh process: about a minute
def test_the_gpu_check_runs_end_to_end_at_small_shapes_on_the_cpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "bench" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--small", "--device", "cpu", "--tokens", "12", "--repeats", "1"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["eager", "compiled"])
    rows = {line[:34].strip(): line[34:].split() for line in lines[header + 1 :] if line.strip()}
    expected = ([f"pass B={b} (ms)" for b in range(1, 9)] + ["drafter block (ms)", "plain decode (tok/s)"]
                + [f"{k} drafts accepted (tok/s)" for k in range(8)])
    for label in expected:
        assert len(rows[label]) == 2 and all(float(v) > 0 for v in rows[label]), label
