"""How long an engine start takes: from spawning `dspark-chat serve` to the listening line and to "ready"
on /health, with the start-up phases the engine reports, and the process's CPU time (less sensitive to other
work on the machine than wall time). Several commands are measured in turns, so that a busy spell slows a
run of each rather than every run of one.

    python bench/startup.py --runs 3 ".venv/bin/dspark-chat serve --model smollm2"

Each command is started with `--port 0` appended and stopped once ready. Runs after the first are second
starts: what the first start measures and converts once per machine (the GGUF copy, the CPU products) is
cached by then, in the user cache dir (set XDG_CACHE_HOME to measure in another).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import time

import httpx
import psutil

WAIT_S = 1800  # a first start on a busy machine measures for many minutes


def start(command: str) -> dict:
    began = time.monotonic()
    proc = subprocess.Popen([*shlex.split(command), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = json.loads(proc.stdout.readline())["url"]
        listening = time.monotonic() - began
        while True:
            health = httpx.get(url + "/health", timeout=60).json()
            if health["status"] in ("ready", "error") or time.monotonic() - began > WAIT_S:
                break
            time.sleep(0.2)
        ready = time.monotonic() - began
        cpu = sum(p.cpu_times().user + p.cpu_times().system for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)])
    finally:
        proc.terminate()
        proc.wait(60)
    if health["status"] != "ready":
        raise SystemExit(f"{command}: not ready after {ready:.0f} s: {health.get('message')}")
    return {"listening_s": listening, "ready_s": ready, "cpu_s": cpu, "phases": health.get("phases"),
            "verify_profile": health.get("verify_profile")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commands", nargs="+", help="a command that starts the engine (--port 0 is appended)")
    parser.add_argument("--runs", type=int, default=3, help="starts per command, in turns")
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {command: [] for command in args.commands}
    for i in range(args.runs):
        for command in args.commands:
            run = start(command)
            runs[command].append(run)
            print(f"run {i + 1} {command}: listening {run['listening_s']:.1f} s, ready {run['ready_s']:.1f} s, "
                  f"CPU {run['cpu_s']:.1f} s", flush=True)
    for command, mine in runs.items():
        print(f"\n{command}")
        for key in ("listening_s", "ready_s", "cpu_s"):
            values = [r[key] for r in mine]
            print(f"  {key[:-2]:<10} median {statistics.median(values):6.1f} s  (runs: {', '.join(f'{v:.1f}' for v in values)})")
        for phase in mine[-1]["phases"] or []:
            print(f"  {phase['seconds']:8.2f} s  {phase['name']}")
        if mine[-1]["verify_profile"]:
            print(f"  verify profile when ready: {mine[-1]['verify_profile']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
