"""`dspark-chat bench`: decoding modes measured side by side on the same prompts, interleaved so
that drift in machine speed touches every mode alike."""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .catalog import shipped_drafter
from .compiled import CompiledTarget, compile_drafter, compile_target, wants_compile
from .cpu_linear import cpuinfo
from .decode import Drafter
from .divergence import explain_divergence
from .dspark import DSparkDrafter
from .eagle3 import Eagle3Drafter
from .engine import Engine, folder_calibration
from .loading import EMBEDDED, cache_dir, embedded_gguf, load_drafter, load_target, model_dir
from .prompt_lookup import LookupOrDraft, PromptLookupDrafter
from .sampling import Sampling
from .scheduler import sps_profile
from .stats import summarize
from .target import Target

BASELINE = "baseline"
MODE_NAMES = "baseline, drafter[:off|threshold|auto], drafter+lookup[:off|threshold|auto], prompt-lookup[:off|auto], hf, hf-prompt-lookup, hf-assisted, llama.cpp"
# llama.cpp allocates its KV cache for the whole context up front; SmolLM2's 8192 tokens take about 190 MB.
LLAMA_MAX_CONTEXT = 8192
LLAMA_NOT_EXACT = ("excluded: llama.cpp computes with the GGUF's quantised weights and its own kernels (our target with "
                   "them dequantised to floats), so its tokens may differ without a bug")


@dataclass
class Mode:
    """One way of decoding. Engine modes run our loop; `hf*` modes run transformers' generate();
    `llama.cpp` runs the target's GGUF file in llama-cpp-python."""

    name: str
    drafter: Drafter | None = None
    scheduler: str | None = None
    temperatures: list[float] | None = None  # the calibration of its DSpark drafter
    hf_options: dict | None = None  # set for transformers modes
    llama: object | None = None  # a llama_cpp.Llama, for the llama.cpp mode
    # Why its greedy output need not equal the baseline's token for token (None: it must).
    not_exact: str | None = None
    # Compiled modes (`MODE/compiled`): the compiled target, its SPS profile, and the mode whose output
    # this one's must equal (the compiled baseline, which in turn is held to the eager one at near-ties).
    target: Target | None = None
    sps: list[float] | None = None
    reference: str = "baseline"
    eager: str | None = None  # the eager mode it is paired with


@dataclass
class Result:
    mode: str
    prompt: int
    turn: int
    token_ids: list[int]
    decode_tokens_per_s: float
    time_to_first_token_ms: float
    stats: dict = field(default_factory=dict)


def read_prompts(path: Path, limit: int | None) -> list[list[str]]:
    rows = []
    # Split on "\n" only: str.splitlines() also splits on U+2028 and friends, which JSON strings may hold raw.
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            turns = json.loads(line)["turns"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: expected a JSON object with a 'turns' list of strings ({e})") from e
        if not turns or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{path}:{number}: 'turns' must be a non-empty list of strings")
        rows.append(turns)
    return rows[:limit] if limit else rows


def build_modes(engine: Engine, names: list[str], prompt_lookup_tokens: int, assistant: Target | None = None,
                drafters: dict[str, tuple[DSparkDrafter | Eagle3Drafter, list[float] | None]] | None = None) -> list[Mode]:
    """`drafters` maps a label to a model drafter (DSpark, DFlash or Eagle3) and its calibration; by default
    the engine's drafter, unlabelled. With several, a drafter mode runs once per drafter, named MODE@LABEL (MODE@LABEL itself
    names one of them), each drafter verified with its own calibration."""
    if drafters is None:
        drafters = {"": (engine.drafter, engine.scheduler.temperatures)} if isinstance(engine.drafter, (DSparkDrafter, Eagle3Drafter)) else {}
    modes = []
    for name in names:
        if name == BASELINE:
            modes.append(Mode(name))
        elif name.startswith("drafter"):
            base, _, label = name.partition("@")
            kind, _, scheduler = base.partition(":")
            if kind not in ("drafter", "drafter+lookup"):
                raise ValueError(f"unknown mode {name!r} (known: {MODE_NAMES})")
            if not drafters:
                raise ValueError(f"mode {name} needs --drafter")
            if label and label not in drafters:
                raise ValueError(f"mode {name}: no drafter is labelled {label!r}; the labels are: {', '.join(drafters) or 'none (one --drafter)'}")
            for key, (drafter, temperatures) in drafters.items():
                if label and key != label:
                    continue
                if kind == "drafter+lookup":
                    drafter = LookupOrDraft(drafter, PromptLookupDrafter(prompt_lookup_tokens, min_match=LookupOrDraft.MIN_MATCH))
                modes.append(Mode(f"{base}@{key}" if key else base, drafter, scheduler or None, temperatures))
        elif name.startswith("prompt-lookup"):
            scheduler = name.partition(":")[2] or None
            if scheduler not in (None, "off", "auto"):
                raise ValueError(f"mode {name}: prompt lookup takes the scheduler off (verify every draft) or auto (learned)")
            modes.append(Mode(name, PromptLookupDrafter(block_size=prompt_lookup_tokens), scheduler))
        elif name == "hf":
            modes.append(Mode(name, hf_options={}))
        elif name == "hf-prompt-lookup":
            modes.append(Mode(name, hf_options={"prompt_lookup_num_tokens": prompt_lookup_tokens}))
        elif name == "hf-assisted":
            if assistant is None:
                raise ValueError("mode hf-assisted needs --assistant MODEL: a small draft model with the target's tokenizer")
            if assistant.tokenizer.get_vocab() != engine.tokenizer.get_vocab():
                raise ValueError(f"assistant {assistant.name} has another vocabulary than target {engine.target.name}: not a pair")
            modes.append(Mode(name, hf_options={"assistant_model": assistant.model}))
        elif name == "llama.cpp":
            modes.append(Mode(name, llama=load_llama(engine.target), not_exact=LLAMA_NOT_EXACT))
        else:
            raise ValueError(f"unknown mode {name!r} (known: {MODE_NAMES})")
    return modes


COMPILED = "/compiled"


def compiled_modes(modes: list[Mode], target: CompiledTarget, sps: list[float] | None, both: bool) -> list[Mode]:
    """Each engine mode run on the compiled target as MODE/compiled, beside its eager self when `both`
    (transformers and llama.cpp modes run as they are), with its DSpark or Eagle3 drafter compiled where it can be
    (a twin sharing its weights, so that the eager mode keeps the eager drafter). A compiled mode's greedy
    output must equal the compiled baseline's; the compiled baseline may part from the eager one at
    near-ties only."""
    twins: dict[int, DSparkDrafter | Eagle3Drafter] = {}

    def compiled_drafter(drafter):
        if isinstance(drafter, LookupOrDraft):
            return LookupOrDraft(compiled_drafter(drafter.drafter), drafter.lookup)
        if not isinstance(drafter, (DSparkDrafter, Eagle3Drafter)):
            return drafter
        if id(drafter) not in twins:
            twins[id(drafter)] = twin = copy.copy(drafter)  # shares the modules, keeps its own context
            compile_drafter(twin, target.max_length)
        return twins[id(drafter)]

    out = []
    for mode in modes:
        engine_mode = mode.hf_options is None and mode.llama is None
        if both or not engine_mode:
            out.append(mode)
        if engine_mode:
            reference = BASELINE if mode.name == BASELINE else BASELINE + COMPILED
            out.append(replace(mode, name=mode.name + COMPILED, drafter=compiled_drafter(mode.drafter), target=target,
                               sps=sps, reference=reference, eager=mode.name if both else None))
    return out


def load_llama(target: Target):
    """The target's own GGUF file in llama-cpp-python, on as many threads as torch uses."""
    if target.name == EMBEDDED:
        gguf = embedded_gguf()
    elif target.name.endswith(".gguf"):
        gguf = Path(target.name)
    else:
        raise ValueError(f"mode llama.cpp needs a GGUF target (a .gguf file or smollm2); {target.name} is not one")
    try:
        import llama_cpp
    except ImportError as e:
        raise ValueError("mode llama.cpp needs llama-cpp-python: pip install llama-cpp-python "
                         "(it builds llama.cpp from source, a few minutes)") from e
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=min(target.max_length, LLAMA_MAX_CONTEXT),
                           n_threads=torch.get_num_threads(), verbose=False)


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def run_mode(engine: Engine, mode: Mode, ids: list[int], sampling: Sampling, max_new_tokens: int) -> tuple[list[int], dict]:
    if mode.llama is not None:
        return run_llama(engine, mode, ids, sampling, max_new_tokens)
    if mode.hf_options is not None:
        return run_hf(engine, mode, ids, sampling, max_new_tokens)
    return run_engine(engine, mode, ids, sampling, max_new_tokens)


def run_engine(engine: Engine, mode: Mode, ids: list[int], sampling: Sampling, max_new_tokens: int) -> tuple[list[int], dict]:
    kept = engine.drafter, engine.scheduler.temperatures
    engine.drafter, engine.scheduler.temperatures = mode.drafter, mode.temperatures
    # A compiled mode swaps in its target and that target's SPS profile, and only for its run: the engine's own
    # profile, measured by its first drafter run where it had none, stays the eager modes'.
    eager = engine.target, engine.scheduler.sps
    if mode.target is not None:
        engine.target, engine.scheduler.sps = mode.target, mode.sps
    # Every run prefills its whole prompt, as generate() does: a cache left by the mode before would
    # make this one's first token look fast.
    engine.target.rewind(0)
    if mode.drafter is not None:
        mode.drafter.rewind(0)
    try:
        steps = [s.to_dict() for s in engine.generate(ids, sampling, max_new_tokens, mode.drafter is not None, scheduler=mode.scheduler)]
    finally:
        engine.drafter, engine.scheduler.temperatures = kept
        if mode.target is not None:
            engine.target, engine.scheduler.sps = eager
    return [t for s in steps for t in s["token_ids"]], summarize(steps) | position_counts(steps)


def position_counts(steps: list[dict]) -> dict:
    """Per draft position k: rounds that verified k with 1..k-1 accepted, and rounds that accepted k.
    stats.py gives their ratio per run; counts add up over runs."""
    rounds = [s for s in steps if not s.get("prefill")]
    depth = max((s["verified"] for s in rounds), default=0)
    return {"position_reached": [sum(1 for s in rounds if s["verified"] >= k and s["accepted"] >= k - 1) for k in range(1, depth + 1)],
            "position_accepted": [sum(1 for s in rounds if s["accepted"] >= k) for k in range(1, depth + 1)]}


def _timing(tokens: list[int], start: float, first: float | None, end: float) -> dict:
    """Time to first token and decode tok/s (tokens after the first over the time since the first),
    as stats.py measures our loop."""
    first = (first or end) - start
    rate = (len(tokens) - 1) / (end - start - first) if len(tokens) > 1 and end - start > first else 0.0
    return {"tokens": len(tokens), "decode_tokens_per_s": rate, "time_to_first_token_ms": first * 1000}


@torch.inference_mode()
def run_hf(engine: Engine, mode: Mode, ids: list[int], sampling: Sampling, max_new_tokens: int) -> tuple[list[int], dict]:
    model, target = engine.target.model, engine.target
    options = dict(mode.hf_options or {})
    if sampling.greedy:
        options["do_sample"] = False
    else:
        options |= {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or None}
    streamer = _FirstToken()
    start = time.perf_counter()
    out = model.generate(
        torch.tensor([ids], device=target.device), max_new_tokens=max_new_tokens, eos_token_id=list(target.stop_ids),
        pad_token_id=target.stop_ids[0] if target.stop_ids else None, streamer=streamer, **options,
    )
    end = time.perf_counter()
    tokens = out[0, len(ids):].tolist()
    return tokens, _timing(tokens, start, streamer.first, end)


def run_llama(engine: Engine, mode: Mode, ids: list[int], sampling: Sampling, max_new_tokens: int) -> tuple[list[int], dict]:
    """Our prompt ids fed to llama.cpp as they are (the GGUF's vocabulary is our tokenizer's), streamed
    token by token and stopped where our loop stops: a stop id (kept, as our loop keeps it) or the budget."""
    llm = mode.llama
    if len(ids) + max_new_tokens > llm.n_ctx():
        raise ValueError(f"llama.cpp: {len(ids)} prompt tokens + {max_new_tokens} new do not fit its {llm.n_ctx()}-token context")
    llm.reset()  # forget the last run's cache: every run prefills its whole prompt
    if sampling.greedy:
        options = {"temp": 0.0, "top_k": 1}
    else:
        options = {"temp": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
        if sampling.seed is not None:
            llm.set_seed(sampling.seed)
    tokens, first = [], None
    start = time.perf_counter()
    # min_p and repeat_penalty off: llama.cpp's defaults would change the distribution the others sample.
    for token in llm.generate(ids, min_p=0.0, repeat_penalty=1.0, **options):
        first = first or time.perf_counter()
        tokens.append(int(token))
        if token in engine.target.stop_ids or len(tokens) >= max_new_tokens:
            break
    end = time.perf_counter()
    return tokens, _timing(tokens, start, first, end)


def machine() -> dict:
    import transformers

    fields = cpuinfo()
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:  # a VM's name can be generic: the generation and vector width tell hosts apart
        flags = fields.get("flags", "").split()
        vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
        cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')}{', ' + vector if vector else ''})"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cores": torch.get_num_threads(), "gpus": gpus, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def describe_machine(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} threads, {', '.join(m['gpus']) or 'no GPU'}"


class Progress:
    """Prompt i/N, the mode running, time elapsed and an ETA on stderr. On a terminal one line is
    redrawn in place; in a log or a pipe each prompt gets one plain line (no carriage returns)."""

    def __init__(self, prompts: int, runs: int, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.prompts, self.runs = prompts, runs
        self.started, self.prompt, self.start = 0, None, None

    def __call__(self, prompt: int, mode: str) -> None:
        """Called as each run starts; prompt counts from 0."""
        if self.start is None:  # from the first run on: the warm-up would distort the ETA
            self.start = time.perf_counter()
        if self.tty:
            filled = 20 * self.started // self.runs
            bar = "#" * filled + "-" * (20 - filled)
            self.stream.write(f"\r[{bar}] prompt {prompt + 1}/{self.prompts}  {mode:<18} {self._times()}\033[K")
        elif prompt != self.prompt:
            self.stream.write(f"prompt {prompt + 1}/{self.prompts}  {self._times()}\n")
        self.stream.flush()
        self.prompt = prompt
        self.started += 1

    def finish(self) -> None:
        if self.start is None:
            return
        line = f"done: {self.runs} runs in {_clock(time.perf_counter() - self.start)}"
        self.stream.write(f"\r{line}\033[K\n" if self.tty else f"{line}\n")
        self.stream.flush()

    def _times(self) -> str:
        elapsed = time.perf_counter() - self.start
        eta = _clock(elapsed / self.started * (self.runs - self.started)) if self.started else "?"
        return f"elapsed {_clock(elapsed)}  ETA {eta}"


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


def bench(engine: Engine, prompts: list[list[str]], modes: list[Mode], sampling: Sampling, max_new_tokens: int,
          warmup: bool = True, progress=None, repeats: int = 1) -> dict:
    """progress(prompt, mode name) is called as each run starts. With repeats > 1 each mode runs each turn
    that many times and keeps its fastest run among those whose output equals the first run's: other
    work on the machine only ever adds time, so the fastest is the least disturbed, and a run whose
    output differs (unseeded sampling) is never picked, so a lucky draw cannot make a mode look faster.
    The repeats take turns (every mode once, then every mode again): a busy spell of a minute then slows
    one run of several modes rather than every run of one."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if warmup:
        ids = engine.chat_ids([{"role": "user", "content": "Say hello."}])
        for mode in modes:
            run_mode(engine, mode, ids, sampling, 8)
    results: list[Result] = []
    divergences = []
    checked = [m.name for m in modes if _identity_note(m, modes, sampling) is None]
    for p, turns in enumerate(prompts):
        # Rotate the order per prompt so no mode always runs first (warm caches, turbo clocks).
        order = modes[p % len(modes):] + modes[: p % len(modes)]
        histories: dict[str, list[dict]] = {m.name: [] for m in modes}
        for t, turn in enumerate(turns):
            asked = {m.name: histories[m.name] + [{"role": "user", "content": turn}] for m in order}
            prompt_ids = {name: engine.chat_ids(messages) for name, messages in asked.items()}
            outputs, fastest = {}, {}
            for repeat in range(repeats):
                for mode in order:
                    if progress:
                        progress(p, mode.name)
                    tokens, stats = run_mode(engine, mode, prompt_ids[mode.name], sampling, max_new_tokens)
                    if not repeat:
                        outputs[mode.name], fastest[mode.name] = tokens, stats
                    elif tokens == outputs[mode.name] and stats["decode_tokens_per_s"] > fastest[mode.name]["decode_tokens_per_s"]:
                        fastest[mode.name] = stats
            for mode in order:
                tokens, stats = outputs[mode.name], fastest[mode.name]
                answer = engine.tokenizer.decode(tokens, skip_special_tokens=True)
                histories[mode.name] = asked[mode.name] + [{"role": "assistant", "content": answer}]
                results.append(Result(mode.name, p, t, tokens, stats["decode_tokens_per_s"], stats["time_to_first_token_ms"], stats))
            for mode in modes:
                if mode.name not in checked:
                    continue
                # Later turns carry each mode's own earlier answers, so compare only like with like.
                ids = prompt_ids[mode.reference]
                if prompt_ids[mode.name] == ids:
                    d = explain_divergence(engine.target, ids, outputs[mode.reference], outputs[mode.name])
                    if d is not None:
                        divergences.append({"mode": mode.name, "prompt": p, "turn": t, **d.to_dict()})
    return report(results, modes, divergences, sampling, max_new_tokens, engine.target.name) | {"repeats": repeats}


def _identity_note(mode: Mode, modes: list[Mode], sampling: Sampling) -> str | None:
    """Why this mode's outputs are not compared with the baseline's token for token; None if they are."""
    if mode.name == BASELINE:
        return "the reference"
    if not sampling.greedy:
        return "not checked: sampled outputs differ by chance"
    if not any(m.name == mode.reference for m in modes):
        return f"not checked: no {mode.reference} mode to compare with"
    return mode.not_exact


def report(results: list[Result], modes: list[Mode], divergences: list[dict], sampling: Sampling, max_new_tokens: int,
           target: str) -> dict:
    rows = {}
    for mode in modes:
        mine = [r for r in results if r.mode == mode.name]
        rates = [r.decode_tokens_per_s for r in mine]
        stats = [r.stats for r in mine]
        rounds = sum(s.get("rounds", 0) for s in stats)
        verified = sum(s.get("verified", 0) for s in stats)
        drafting, round_ms = sum(s.get("draft_ms", 0) for s in stats), sum(s.get("draft_ms", 0) + s.get("verify_ms", 0) for s in stats)
        note = _identity_note(mode, modes, sampling)
        rows[mode.name] = {
            "decode_tokens_per_s_median": statistics.median(rates),
            "decode_tokens_per_s_min": min(rates),
            "decode_tokens_per_s_max": max(rates),
            "time_to_first_token_ms_median": statistics.median(r.time_to_first_token_ms for r in mine),
            "tokens": sum(len(r.token_ids) for r in mine),
            # Only our loop reports its rounds: transformers and llama.cpp modes get None here.
            "tau": sum(s.get("tau", 0) * s.get("rounds", 0) for s in stats) / rounds if rounds else None,
            "acceptance_rate": sum(s.get("accepted", 0) for s in stats) / verified if verified else None,
            # Of the decode rounds' time; None where nothing was drafted (the baseline, other libraries).
            "draft_share": drafting / round_ms if round_ms and any(s.get("drafted") for s in stats) else None,
            "acceptance_by_position": _acceptance_by_position(stats),
            "identity_checked": note is None,
            "identity_note": note,
            "near_ties": sum(1 for d in divergences if d["mode"] == mode.name and d["near_tie"]) if note is None else None,
            "mismatches": sum(1 for d in divergences if d["mode"] == mode.name and not d["near_tie"]) if note is None else None,
        }
    for mode in modes:
        row = rows[mode.name]
        for reference in (BASELINE, "hf"):
            ratios = _ratios(results, mode.name, reference)
            row[f"speedup_vs_{reference}"] = statistics.median(ratios) if ratios else None
            row[f"speedup_vs_{reference}_range"] = [min(ratios), max(ratios)] if ratios else None
        # A compiled mode over the same mode run eagerly, prompt by prompt (bench --compile both).
        ratios = _ratios(results, mode.name, mode.eager) if mode.eager else []
        row["speedup_vs_eager"] = statistics.median(ratios) if ratios else None
        row["speedup_vs_eager_range"] = [min(ratios), max(ratios)] if ratios else None
    checked = any(row["identity_checked"] for row in rows.values())
    return {"machine": machine(), "target": target, "sampling": asdict(sampling), "max_new_tokens": max_new_tokens,
            "modes": rows, "outputs_identical": not divergences if checked else None, "divergences": divergences,
            "runs": [asdict(r) for r in results]}


def _acceptance_by_position(stats: list[dict]) -> list[float | None] | None:
    """Conditional acceptance at draft position k over all runs (None for modes that report no rounds)."""
    if not stats or any("position_reached" not in s for s in stats):
        return None
    depth = max(len(s["position_reached"]) for s in stats)
    curve = []
    for k in range(depth):
        reached = sum(s["position_reached"][k] for s in stats if k < len(s["position_reached"]))
        accepted = sum(s["position_accepted"][k] for s in stats if k < len(s["position_accepted"]))
        curve.append(accepted / reached if reached else None)
    return curve


def _ratios(results: list[Result], name: str, reference: str) -> list[float]:
    """Per (prompt, turn): this mode's decode tok/s over the reference mode's in the same slot. Paired
    ratios, so a prompt that is fast for everyone does not weigh more."""
    ref = {(r.prompt, r.turn): r.decode_tokens_per_s for r in results if r.mode == reference}
    return [r.decode_tokens_per_s / ref[(r.prompt, r.turn)] for r in results if r.mode == name and ref.get((r.prompt, r.turn))]


def format_table(report: dict) -> str:
    width = max(22, 2 + max(map(len, report["modes"])))  # labelled drafter modes run long
    paired = any(row.get("speedup_vs_eager") is not None for row in report["modes"].values())
    head = (f"{'mode':<{width}}{'tok/s':>8}{'(min-max)':>16}{'TTFT ms':>9}{'tau':>6}{'accept':>8}{'draft':>7}{'vs base':>9}"
            f"{'vs hf':>7}{'vs eager' if paired else '':>9}{'ties':>6}{'bugs':>6}")
    lines = [head, "-" * len(head)]

    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) and value == value else "-"

    for name, row in report["modes"].items():
        spread = f"({row['decode_tokens_per_s_min']:.1f}-{row['decode_tokens_per_s_max']:.1f})"
        lines.append(
            f"{name:<{width}}{row['decode_tokens_per_s_median']:>8.1f}{spread:>16}{row['time_to_first_token_ms_median']:>9.0f}"
            f"{num(row['tau'], '.2f'):>6}{num(row['acceptance_rate'], '.0%'):>8}"
            f"{num(row['draft_share'], '.0%'):>7}{num(row['speedup_vs_baseline'], '.2f'):>9}"
            f"{num(row['speedup_vs_hf'], '.2f'):>7}{num(row.get('speedup_vs_eager'), '.2f') if paired else '':>9}"
            f"{num(row['near_ties'], 'd'):>6}{num(row['mismatches'], 'd'):>6}"
        )
    for name, row in report["modes"].items():
        if name != BASELINE and not row["identity_checked"]:
            lines.append(f"{name}: ties/bugs {row['identity_note']}")
    if any(name.endswith(COMPILED) for name in report["modes"]):
        lines.append(f"MODE{COMPILED}: ties/bugs against {BASELINE}{COMPILED}, and {BASELINE}{COMPILED}'s against {BASELINE}")
    if report.get("repeats", 1) > 1:
        lines.append(f"tok/s: each mode's fastest of {report['repeats']} runs per prompt turn")
    m = report["machine"]
    lines.append(f"machine: {describe_machine(m)}, torch {m['torch']}, transformers {m['transformers']}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Left: decode speedup per mode over the baseline (median of paired ratios, min-max as the error
    bar). Right: conditional acceptance per draft position for the modes that draft, as in Figure 2 of
    the DSpark paper. Written to a temporary file and renamed, so a reader never sees half a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    speed, accept = fig.subplots(1, 2)
    rows = {name: row for name, row in report["modes"].items() if name != BASELINE and row["speedup_vs_baseline"] is not None}
    if rows:
        medians = [row["speedup_vs_baseline"] for row in rows.values()]
        below = [m - row["speedup_vs_baseline_range"][0] for m, row in zip(medians, rows.values())]
        above = [row["speedup_vs_baseline_range"][1] - m for m, row in zip(medians, rows.values())]
        speed.bar(range(len(rows)), medians, yerr=[below, above], capsize=4, color="tab:blue")
        speed.set_xticks(range(len(rows)), list(rows), rotation=30, ha="right")
        speed.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    else:
        speed.text(0.5, 0.5, "no baseline run to compare with", ha="center", va="center", transform=speed.transAxes)
    speed.set_title("decode speedup vs baseline (bar: median, line: min-max)")
    speed.set_ylabel("x baseline tok/s")
    curves = {name: row["acceptance_by_position"] for name, row in report["modes"].items() if row["acceptance_by_position"]}
    for name, curve in curves.items():
        points = [(k, a) for k, a in enumerate(curve, 1) if a is not None]
        accept.plot([k for k, _ in points], [a for _, a in points], marker="o", label=name)
    if curves:
        accept.legend()
    else:
        accept.text(0.5, 0.5, "no mode drafted", ha="center", va="center", transform=accept.transAxes)
    accept.set_ylim(0, 1.05)
    accept.xaxis.set_major_locator(MaxNLocator(integer=True))
    accept.set_title("acceptance at draft position k, given 1..k-1 accepted")
    accept.set_xlabel("draft position k")
    accept.set_ylabel("conditional acceptance")
    fig.suptitle(f"{report['target']} on {describe_machine(report['machine'])}")
    _write_atomically(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def format_profile(target: Target, sps: list[float]) -> str:
    """The SPS(B) table: verify passes per second for B tokens, the tokens per second that would give
    if every draft were accepted, and what a B-token pass costs next to a one-token pass."""
    lines = [f"SPS profile of {target.name} ({target.dtype}, {target.device}), as the auto scheduler reads it",
             f"{'B':>3}{'verify passes/s':>17}{'tok/s if all accepted':>23}{'cost vs B=1':>13}"]
    for b, rate in enumerate(sps, 1):
        lines.append(f"{b:>3}{rate:>17.1f}{b * rate:>23.1f}{sps[0] / rate:>12.2f}x")
    lines.append(
        f"A pass over {len(sps)} tokens costs {sps[0] / sps[-1]:.2f}x a one-token pass, so verifying l drafts pays only while the "
        f"expected tokens 1 + a_1 + ... + a_l grow faster than that cost: the flatter the last column, the more drafts "
        f"the auto scheduler verifies per round."
    )
    return "\n".join(lines)


def profile(args) -> int:
    target = load_target(args.target, args.dtype, args.device)
    # Through the same cache the auto scheduler uses: this is the profile it decides with.
    profile = sps_profile(target, args.block + 1, cache_dir())
    print(format_profile(target, profile.sps))
    if profile.noisy:
        print("Noisy: no measurement settled while other work slowed the passes; each B's fastest rate so far "
              "(servers measure a noisy profile again between requests).")
    return 0


# The mode that runs a catalog pair as `generate` and the app run it, by the pair's kind (prompt lookup is among the peers).
PAIR_MODES = {"dspark": "drafter", "dflash": "drafter", "dspark+lookup": "drafter+lookup"}


def what_to_run(args) -> tuple[list[str], str | None, dict | None]:
    """The drafters to load, the mode that runs the pair as the app runs it, and the target's placement:
    a catalog pair's (--model: its drafter, its kind's mode, its fit plan); --drafter's, in the `drafter` mode;
    else the drafter shipped for the target, with prompt lookup, as the app gives the embedded model."""
    if args.model:
        from .catalog import load_catalog
        from .hardware import plan_pair

        pair = load_catalog().pair(args.model)
        args.target, drafter, _ = pair.specs()
        placement = plan_pair(pair, dtype=None if args.dtype == "auto" else args.dtype).load_kwargs
        return args.drafter or ([drafter] if drafter else []), PAIR_MODES.get(pair.kind), placement
    if args.drafter:
        return args.drafter, "drafter", None
    shipped = shipped_drafter(args.target)
    return ([shipped], "drafter+lookup", None) if shipped else ([], None, None)


def drafter_labels(paths: list[str]) -> list[str]:
    """How mode names tell several drafters apart: their folder names, or the paths as given where two
    folders share a name."""
    names = [Path(p.rstrip("/")).name for p in paths]
    labels = names if len(set(names)) == len(names) else paths
    if len(set(labels)) < len(labels):
        raise ValueError(f"--drafter names the same drafter twice: {' '.join(paths)}")
    return labels


def main(args) -> int:
    paths, pair_mode, placement = what_to_run(args)
    if args.profile:
        return profile(args)
    if not args.prompts:
        raise ValueError("bench needs --prompts FILE (or --profile)")
    if args.plot:
        try:  # now, rather than after the whole benchmark has run
            import matplotlib  # noqa: F401
        except ImportError as e:
            raise ValueError("--plot needs matplotlib: pip install 'dspark-chat[bench]'") from e
    prompts = read_prompts(Path(args.prompts), args.limit)
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    labels = drafter_labels(paths)
    engine = Engine.load(args.target, paths[0] if paths else None, False, args.dtype, args.device, "auto",
                         default_drafter=False, placement=placement, float_drafter=args.float_drafter)
    drafters = None
    if len(paths) > 1:
        drafters = {labels[0]: (engine.drafter, engine.scheduler.temperatures)}
        for label, path in zip(labels[1:], paths[1:]):
            folder = model_dir(path)
            drafters[label] = (load_drafter(str(folder), engine.target, int8=not args.float_drafter), folder_calibration(folder))
    assistant = load_target(args.assistant, args.dtype, args.device) if args.assistant else None
    names = args.modes or ([BASELINE] + ([pair_mode] if pair_mode else []) + ["prompt-lookup", "hf", "hf-prompt-lookup"]
                           + (["hf-assisted"] if args.assistant else []))
    modes = build_modes(engine, names, args.prompt_lookup_tokens, assistant, drafters)
    needed = max((m.drafter.block_size + 1 for m in modes if m.drafter is not None), default=0)
    if len(engine.scheduler.sps or []) < needed:
        # The auto scheduler weighs each drafter's drafts against the verify cost of every length it drafts.
        engine.scheduler.sps = sps_profile(engine.target, needed, cache_dir()).sps
    if args.compile == "both" or wants_compile(args.compile, engine.target.device):
        layers = tuple(sorted({i for m in modes if m.drafter is not None for i in m.drafter.feature_layers}))
        compiled = compile_target(engine.target, max(needed, 1), layers, cache_dir(),
                                  lambda line: print(f"compiling ({line})", file=sys.stderr))
        if compiled is not engine.target:
            sps = sps_profile(compiled, needed, cache_dir()).sps if needed else None
            modes = compiled_modes(modes, compiled, sps, both=args.compile == "both")
    sampling = Sampling(args.temperature, seed=args.seed)
    progress = Progress(len(prompts), sum(len(t) for t in prompts) * len(modes) * args.repeats)
    result = bench(engine, prompts, modes, sampling, args.max_new_tokens, progress=progress, repeats=args.repeats)
    progress.finish()
    result["command"] = " ".join(sys.argv)
    result["engine"] = engine.describe()
    result["drafters"] = dict(zip(labels, paths)) if len(paths) > 1 else None
    result["pair"] = args.model
    result["assistant"] = args.assistant
    print(format_table(result))
    if args.json:
        _write_atomically(Path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    if args.plot:
        plot(result, Path(args.plot))
    return 0
