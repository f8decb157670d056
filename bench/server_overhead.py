"""What the server costs: tok/s of the same prompts in-process and through `dspark-chat serve`
(streaming and not), with the same engine settings, interleaved so that machine noise hits every side.

    python bench/server_overhead.py --target smollm2 --prompt-lookup --prompts /work/shared/bench/humaneval.jsonl --limit 5

tok/s is completion tokens over the wall time from sending the request to the last token, prefill
included, summed over the prompts; the server side is measured by its client. Greedy, so the texts
must also be identical (checked).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import httpx

PROMPTS = ["Write a Python function that reverses a string.", "Explain what a hash map is.", "def fibonacci(n):", "List three prime numbers."]


def read_prompts(path: str | None, limit: int) -> list[str]:
    if not path:
        return PROMPTS[:limit]
    with open(path) as f:
        return [json.loads(line)["turns"][0] for line in f if line.strip()][:limit]


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dspark_chat.engine", "serve", "--target", args.target, "--port", "0", "--scheduler", args.scheduler, "--dtype", args.dtype]
    cmd += ["--drafter", args.drafter] if args.drafter else ["--prompt-lookup"] if args.prompt_lookup else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = "http://127.0.0.1:{port}".format(**json.loads(proc.stdout.readline()))
    deadline = time.monotonic() + 600
    while httpx.get(url + "/health", timeout=10).json()["status"] != "ready":
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the server did not get ready: {httpx.get(url + '/health').json()}")
        time.sleep(0.2)
    return proc, url


def in_process(engine, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    t = time.perf_counter()
    steps = list(engine.generate(engine.chat_ids([{"role": "user", "content": prompt}]), max_new_tokens=max_tokens))
    return "".join(s.text for s in steps), sum(len(s.token_ids) for s in steps), time.perf_counter() - t


def through_server(client: httpx.Client, name: str, prompt: str, max_tokens: int, stream: bool) -> tuple[str, int, float]:
    body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    t = time.perf_counter()
    if not stream:
        reply = client.post("/v1/chat/completions", json=body).json()
        return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"], time.perf_counter() - t
    text, tokens = [], 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                text.append(chunk["choices"][0]["delta"]["content"])
                tokens += len(chunk["dspark"]["token_ids"])
    return "".join(text), tokens, time.perf_counter() - t


def schedule(n: int, swap: bool) -> list[tuple[str, int]]:
    """Sides interleaved prompt by prompt, so that the machine's ups and downs hit all of them, with the
    second server side one prompt behind: the server never gets one prompt twice in a row, which would
    let its prefill reuse the whole cached prompt (the in-process engine never gets that either)."""
    first, second = ("server, whole", "server, streaming") if swap else ("server, streaming", "server, whole")
    out = []
    for i in range(n + 1):
        if i < n:
            out += [("in-process", i), (first, i)] if not swap else [(first, i), ("in-process", i)]
        if i > 0:
            out.append((second, i - 1))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--drafter")
    source.add_argument("--prompt-lookup", action="store_true")
    p.add_argument("--prompts", help="JSON lines with a 'turns' list (default: four short built-in prompts)")
    p.add_argument("--limit", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scheduler", default="off", choices=["off", "threshold", "auto"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", help="write every run here")
    args = p.parse_args()

    from dspark_chat.engine.engine import Engine

    prompts = read_prompts(args.prompts, args.limit)
    engine = Engine.load(args.target, args.drafter, args.prompt_lookup, args.dtype, "cpu", args.scheduler)
    proc, url = start_server(args)
    try:
        client = httpx.Client(base_url=url, timeout=600)
        name = client.get("/v1/models").json()["data"][0]["id"]
        sides = {
            "in-process": lambda q: in_process(engine, q, args.max_tokens),
            "server, streaming": lambda q: through_server(client, name, q, args.max_tokens, True),
            "server, whole": lambda q: through_server(client, name, q, args.max_tokens, False),
        }
        for run in sides.values():  # warm-up: first-call costs on every side
            run("Hello!")
        runs, texts = [], {}
        for rep in range(args.repeats):
            for side, i in schedule(len(prompts), rep % 2 == 1):
                text, tokens, seconds = sides[side](prompts[i])
                runs.append({"side": side, "prompt": i, "repeat": rep, "tokens": tokens, "seconds": seconds})
                texts.setdefault(i, set()).add(text)
    finally:
        proc.kill()
        proc.wait()

    identical = all(len(t) == 1 for t in texts.values())
    rate = {side: sum(r["tokens"] for r in runs if r["side"] == side) / sum(r["seconds"] for r in runs if r["side"] == side) for side in sides}
    print(f"{engine.describe()}; {len(prompts)} prompts x {args.repeats}, {args.max_tokens} tokens max, greedy")
    print(f"machine: {platform.processor() or platform.machine()}, {_cores()} cores, torch threads {_threads()}")
    for side, value in rate.items():
        paired = [r["tokens"] / r["seconds"] / base for r in runs if r["side"] == side
                  for base in [next(b["tokens"] / b["seconds"] for b in runs if b["side"] == "in-process" and (b["repeat"], b["prompt"]) == (r["repeat"], r["prompt"]))]]
        print(f"  {side:<18} {value:8.1f} tok/s  ({100 * value / rate['in-process']:.1f}% of in-process; "
              f"median of per-prompt ratios {100 * statistics.median(paired):.1f}%)")
    print(f"  texts identical on every side: {identical}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": engine.describe(), "rate": rate, "identical": identical, "runs": runs}, f, indent=1)
    return 0 if identical else 1


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
