"""`dspark-chat bench`: decoding modes measured side by side on the same prompts, interleaved so
that drift in machine speed touches every mode alike."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .decode import Drafter
from .divergence import explain_divergence
from .dspark import DSparkDrafter
from .engine import Engine
from .prompt_lookup import PromptLookupDrafter
from .sampling import Sampling
from .stats import summarize

BASELINE = "baseline"


@dataclass
class Mode:
    """One way of decoding. Engine modes run our loop; `hf*` modes run transformers' generate()."""

    name: str
    drafter: Drafter | None = None
    scheduler: str | None = None
    hf_options: dict | None = None  # set for transformers modes


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
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
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


def build_modes(engine: Engine, names: list[str], prompt_lookup_tokens: int) -> list[Mode]:
    modes = []
    for name in names:
        if name == BASELINE:
            modes.append(Mode(name))
        elif name.startswith("drafter"):
            if not isinstance(engine.drafter, DSparkDrafter):
                raise ValueError(f"mode {name} needs --drafter")
            scheduler = name.partition(":")[2] or None
            modes.append(Mode(name, engine.drafter, scheduler))
        elif name == "prompt-lookup":
            modes.append(Mode(name, PromptLookupDrafter(block_size=prompt_lookup_tokens)))
        elif name == "hf":
            modes.append(Mode(name, hf_options={}))
        elif name == "hf-prompt-lookup":
            modes.append(Mode(name, hf_options={"prompt_lookup_num_tokens": prompt_lookup_tokens}))
        else:
            raise ValueError(f"unknown mode {name!r}")
    return modes


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


def run_engine(engine: Engine, mode: Mode, ids: list[int], sampling: Sampling, max_new_tokens: int) -> tuple[list[int], dict]:
    drafter = engine.drafter
    engine.drafter = mode.drafter
    # Every run prefills its whole prompt, as generate() does: a cache left by the mode before would
    # make this one's first token look fast.
    engine.target.rewind(0)
    if mode.drafter is not None:
        mode.drafter.rewind(0)
    try:
        steps = [s.to_dict() for s in engine.generate(ids, sampling, max_new_tokens, mode.drafter is not None, scheduler=mode.scheduler)]
    finally:
        engine.drafter = drafter
    return [t for s in steps for t in s["token_ids"]], summarize(steps)


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
    first = (streamer.first or end) - start
    rate = (len(tokens) - 1) / (end - start - first) if len(tokens) > 1 and end - start > first else 0.0
    return tokens, {"tokens": len(tokens), "decode_tokens_per_s": rate, "time_to_first_token_ms": first * 1000}


def machine() -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpu": cpu, "cores": torch.get_num_threads(), "gpus": gpus, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def bench(engine: Engine, prompts: list[list[str]], modes: list[Mode], sampling: Sampling, max_new_tokens: int,
          warmup: bool = True, progress=None) -> dict:
    if warmup:
        ids = engine.chat_ids([{"role": "user", "content": "Say hello."}])
        for mode in modes:
            (run_hf if mode.hf_options is not None else run_engine)(engine, mode, ids, sampling, 8)
    results: list[Result] = []
    divergences = []
    for p, turns in enumerate(prompts):
        # Rotate the order per prompt so no mode always runs first (warm caches, turbo clocks).
        order = modes[p % len(modes):] + modes[: p % len(modes)]
        histories: dict[str, list[dict]] = {m.name: [] for m in modes}
        for t, turn in enumerate(turns):
            outputs = {}
            for mode in order:
                messages = histories[mode.name] + [{"role": "user", "content": turn}]
                ids = engine.chat_ids(messages)
                run = run_hf if mode.hf_options is not None else run_engine
                tokens, stats = run(engine, mode, ids, sampling, max_new_tokens)
                outputs[mode.name] = (ids, tokens)
                histories[mode.name] = messages + [{"role": "assistant", "content": engine.tokenizer.decode(tokens, skip_special_tokens=True)}]
                results.append(Result(mode.name, p, t, tokens, stats["decode_tokens_per_s"], stats["time_to_first_token_ms"], stats))
            if sampling.greedy and BASELINE in outputs:
                ids, reference = outputs[BASELINE]
                for name, (other_ids, tokens) in outputs.items():
                    # Later turns carry each mode's own earlier answers, so compare only like with like.
                    if name != BASELINE and other_ids == ids:
                        d = explain_divergence(engine.target, ids, reference, tokens)
                        if d is not None:
                            divergences.append({"mode": name, "prompt": p, "turn": t, **d.to_dict()})
            if progress:
                progress(p, t)
    return report(results, modes, divergences, sampling, max_new_tokens)


def report(results: list[Result], modes: list[Mode], divergences: list[dict], sampling: Sampling, max_new_tokens: int) -> dict:
    rows = {}
    for mode in modes:
        mine = [r for r in results if r.mode == mode.name]
        rates = [r.decode_tokens_per_s for r in mine]
        stats = [r.stats for r in mine]
        rounds = sum(s.get("rounds", 0) for s in stats)
        verified = sum(s.get("verified", 0) for s in stats)
        rows[mode.name] = {
            "decode_tokens_per_s_median": statistics.median(rates),
            "decode_tokens_per_s_min": min(rates),
            "decode_tokens_per_s_max": max(rates),
            "time_to_first_token_ms_median": statistics.median(r.time_to_first_token_ms for r in mine),
            "tokens": sum(len(r.token_ids) for r in mine),
            "tau": sum(s.get("tau", 0) * s.get("rounds", 0) for s in stats) / rounds if rounds else None,
            "acceptance_rate": sum(s.get("accepted", 0) for s in stats) / verified if verified else None,
            "near_ties": sum(1 for d in divergences if d["mode"] == mode.name and d["near_tie"]),
            "mismatches": sum(1 for d in divergences if d["mode"] == mode.name and not d["near_tie"]),
        }
    for name, row in rows.items():
        for reference in (BASELINE, "hf"):
            if reference in rows:
                row[f"speedup_vs_{reference}"] = _ratio(results, name, reference)
    return {"machine": machine(), "sampling": asdict(sampling), "max_new_tokens": max_new_tokens,
            "modes": rows, "divergences": divergences,
            "runs": [asdict(r) for r in results]}


def _ratio(results: list[Result], name: str, reference: str) -> float:
    """Median over (prompt, turn) of this mode's decode tok/s over the reference mode's in the same
    slot: a paired ratio, so a prompt that is fast for everyone does not weigh more."""
    ref = {(r.prompt, r.turn): r.decode_tokens_per_s for r in results if r.mode == reference}
    ratios = [r.decode_tokens_per_s / ref[(r.prompt, r.turn)] for r in results
              if r.mode == name and ref.get((r.prompt, r.turn))]
    return statistics.median(ratios) if ratios else float("nan")


def format_table(report: dict) -> str:
    head = f"{'mode':<22}{'tok/s':>8}{'(min-max)':>16}{'TTFT ms':>9}{'tau':>6}{'accept':>8}{'vs base':>9}{'vs hf':>7}{'ties':>6}{'bugs':>6}"
    lines = [head, "-" * len(head)]
    for name, row in report["modes"].items():
        def num(value, fmt):
            return format(value, fmt) if isinstance(value, (int, float)) and value == value else "-"
        spread = f"({row['decode_tokens_per_s_min']:.1f}-{row['decode_tokens_per_s_max']:.1f})"
        lines.append(
            f"{name:<22}{row['decode_tokens_per_s_median']:>8.1f}{spread:>16}{row['time_to_first_token_ms_median']:>9.0f}"
            f"{num(row['tau'], '.2f'):>6}{num(row['acceptance_rate'], '.0%'):>8}{num(row.get('speedup_vs_baseline'), '.2f'):>9}"
            f"{num(row.get('speedup_vs_hf'), '.2f'):>7}{row['near_ties']:>6}{row['mismatches']:>6}"
        )
    m = report["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} threads, {', '.join(m['gpus']) or 'no GPU'}, torch {m['torch']}, transformers {m['transformers']}")
    return "\n".join(lines)


def main(args) -> int:
    engine = Engine.load(args.target, args.drafter, False, args.dtype, args.device, "auto" if args.drafter else "off")
    names = args.modes or ([BASELINE, "prompt-lookup", "hf", "hf-prompt-lookup"] + (["drafter"] if args.drafter else []))
    modes = build_modes(engine, names, args.prompt_lookup_tokens)
    prompts = read_prompts(Path(args.prompts), args.limit)
    sampling = Sampling(args.temperature, seed=args.seed)
    total = sum(len(t) for t in prompts)
    done = [0]

    def progress(p, t):
        done[0] += 1
        print(f"\r{done[0]}/{total} prompt turns", end="", file=sys.stderr, flush=True)

    result = bench(engine, prompts, modes, sampling, args.max_new_tokens, progress=progress)
    print(file=sys.stderr)
    result["command"] = " ".join(sys.argv)
    result["engine"] = engine.describe()
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
