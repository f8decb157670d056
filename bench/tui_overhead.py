"""Does the app slow the engine? Decode tok/s of the same prompts through the terminal app (headless,
driven like a user: a new conversation, type, Enter) and through the headless `dspark-chat generate`,
interleaved so that machine noise hits both sides.

    python bench/tui_overhead.py --model smollm2 --prompts ../shared/bench/humaneval.jsonl --limit 5

For the app two numbers: the engine's own decode tok/s for the app's requests (what the status bar
shows) and the rate at which tokens reached the app (arrival times of the streamed chunks). Greedy,
so the texts must also be identical (checked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dspark_chat.app.history import History
from dspark_chat.app.tui import Answer, ChatInput, ChatScreen, DSparkChat


def headless(model: str, prompt: str, max_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "dspark_chat.engine", "generate", "--model", model, "--json", "--max-new-tokens",
                          str(max_tokens), prompt], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


async def until(pilot, condition, limit_s: float = 900) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("the app did not finish in time")
        await asyncio.sleep(0.25)  # not pilot.pause(): it waits on every widget, which would bill the app for the bench


async def run(args, prompts: list[str]) -> list[dict]:
    rows = []
    app = DSparkChat(pair=args.model, history=History(Path(tempfile.mkdtemp())))
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, ChatScreen))
        for repeat in range(args.repeats):
            for prompt in prompts:
                base = headless(args.model, prompt, args.max_new_tokens)
                await pilot.press("ctrl+n")
                await until(pilot, lambda: isinstance(app.screen, ChatScreen) and not app.screen.conversation.messages)
                chat = app.screen
                chat.conversation.settings["max_tokens"] = args.max_new_tokens
                chat.query_one(ChatInput).insert(prompt)
                wall, cpu = time.monotonic(), time.process_time()
                await pilot.press("enter")
                await until(pilot, lambda: any(a.role == "assistant" for a in chat.query(Answer)) and not chat.generating)
                app_cpu = (time.process_time() - cpu) / (time.monotonic() - wall)
                answer = [a for a in chat.query(Answer) if a.role == "assistant"][-1]
                rows.append({"prompt": prompt[:40], "repeat": repeat, "headless": base["stats"]["decode_tokens_per_s"],
                             "app_engine": answer.stats["decode_tokens_per_s"], "app_received": answer.stats["received_tokens_per_s"],
                             "app_cpu": app_cpu, "identical": answer.content == base["text"].strip() or answer.content == base["text"]})
                r = rows[-1]
                print(f"{r['prompt']!r:44} headless {r['headless']:6.1f}  app (engine) {r['app_engine']:6.1f}  "
                      f"app (received) {r['app_received']:6.1f}  app CPU {r['app_cpu']:.0%}  identical {r['identical']}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a catalog pair")
    parser.add_argument("--prompts", help="JSON lines with 'turns' (the first turn is used); default: two built-in prompts")
    parser.add_argument("--limit", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [json.loads(line)["turns"][0] for line in f.read().split("\n") if line.strip()][: args.limit]
    else:
        prompts = ["Write a Python function that reverses a string.", "Explain what a hash map is."][: args.limit]
    rows = asyncio.run(run(args, prompts))
    headless_rate = statistics.median(r["headless"] for r in rows)
    for key, label in (("app_engine", "app, engine's rate"), ("app_received", "app, tokens received")):
        ratios = [r[key] / r["headless"] for r in rows]
        print(f"{label:24} median {statistics.median(r[key] for r in rows):6.1f} tok/s  "
              f"vs headless {headless_rate:6.1f}: median ratio {statistics.median(ratios):.1%} (min {min(ratios):.1%}, max {max(ratios):.1%})")
    print(f"identical texts: {sum(r['identical'] for r in rows)}/{len(rows)}; machine: {platform.machine()}, {platform.processor() or 'cpu'}")


if __name__ == "__main__":
    main()
