"""The engine's command line: `dspark-chat generate ...` (the app's dispatcher runs this module for
every engine command, so the TUI never pays for importing torch)."""

from __future__ import annotations

import argparse
import json
import sys

from .scheduler import MODES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark-chat")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer one prompt and print decoding statistics")
    gen.add_argument("prompt", help="the user message (or the raw text with --raw)")
    gen.add_argument("--target", default="smollm2", help="model folder, Hub id, .gguf file, or smollm2 (embedded, the default)")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--drafter", help="DSpark/DFlash drafter folder or Hub id (DeepSpec layout)")
    source.add_argument("--prompt-lookup", action="store_true", help="draft by copying from the context (no model)")
    gen.add_argument("--no-spec", action="store_true", help="plain decoding: the baseline")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--max-draft", type=int, help="draft at most this many tokens a round")
    gen.add_argument("--scheduler", choices=MODES, default="auto", help="how many drafts to verify (default auto)")
    gen.add_argument("--threshold", type=float, default=0.5, help="confidence threshold for --scheduler threshold")
    gen.add_argument("--calibration", help="per-position temperature file (default: calibration.json beside the drafter)")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    gen.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    gen.add_argument("--system", help="a system message")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, every round's event, statistics")
    return parser


def generate(args) -> int:
    from .engine import Engine
    from .sampling import Sampling
    from .stats import format_summary, summarize

    engine = Engine.load(
        args.target, args.drafter, args.prompt_lookup, args.dtype, args.device, args.scheduler, args.threshold, args.calibration
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .loading import LoadError

    try:
        return {"generate": generate}[args.command](args)
    except (LoadError, ValueError) as e:
        print(f"dspark-chat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
