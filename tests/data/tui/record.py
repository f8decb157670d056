"""Records the engine runs that tests/test_tui_snapshots.py replays: `nice -n 19 .venv/bin/python tests/data/tui/record.py`.

Starts the real engine for the catalog's default pair as the app does (EngineProcess: `serve --model smollm2`,
the embedded SmolLM2 drafting by prompt lookup), then asks it what the app would ask, through the app's own
EngineClient, with the bodies ChatScreen.request_body builds for the default settings with 48 tokens at most
(greedy, so the texts are reproducible; the timings are whatever this run took, frozen in the files):

- compare.json: CompareScreen's two requests for PROMPT, speculation on, then off with compare_with = the
  tokens of the first (the app's seed 0 included), every streamed Chunk kept as a dict;
- conversation.json: a saved conversation (History's file format, fixed id and times) of two turns, each
  assistant message holding its round events and the stats TurnStats.summary() gives for them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from dspark_chat.app.engine_client import EngineClient, EngineProcess, TurnStats
from dspark_chat.app.tui import DEFAULT_SETTINGS

HERE = Path(__file__).resolve().parent
PROMPT = "Write a Python function that reverses a string."
FOLLOW_UP = "Now make it a one-liner."
MAX_TOKENS = 48  # short answers keep the snapshots within one 100 x 32 screen
PAIR = "smollm2"


def body(settings: dict, speculative: bool, compare_with: list[int] | None = None) -> dict:
    """ChatScreen.request_body for our engine, inlined so recording needs no running app."""
    out = {"temperature": settings["temperature"], "top_p": settings["top_p"], "max_tokens": settings["max_tokens"]}
    if settings.get("seed") is not None:
        out["seed"] = settings["seed"]
    out["speculative"] = speculative
    options = {"scheduler": settings["scheduler"]}
    if compare_with is not None:
        options["compare_with"] = compare_with
    out["dspark"] = options
    return out


async def run(client: EngineClient, model: str, messages: list[dict], request: dict) -> tuple[list[dict], TurnStats]:
    chunks, stats = [], TurnStats()
    async for chunk in client.chat(model, messages, request):
        stats.add(chunk)
        chunks.append(dataclasses.asdict(chunk))
    return chunks, stats


async def main() -> int:
    # The catalog's default pair, started as the app starts it: `serve --model smollm2` (SmolLM2 + prompt lookup).
    process = EngineProcess(PAIR, log_path=HERE / "record-engine.log")
    try:
        url = await process.start()
        client = EngineClient(url)
        seen = set()
        health = await client.wait_ready(lambda h: h["status"] in seen or seen.add(h["status"]) or print("engine:", h["status"], file=sys.stderr))
        print("engine:", json.dumps(health.get("engine")), file=sys.stderr)
        model = await client.model_id()
        settings = dict(DEFAULT_SETTINGS) | {"max_tokens": MAX_TOKENS}

        # CompareScreen: one seed for both runs (0 when the conversation has none).
        compare_settings = settings | {"seed": 0}
        messages = [{"role": "user", "content": PROMPT}]
        on_chunks, on_stats = await run(client, model, messages, body(compare_settings, True))
        off_body = body(compare_settings, False, on_stats.token_ids())
        off_chunks, _ = await run(client, model, messages, off_body)
        compare = {"model": model, "settings": settings, "messages": messages,
                   "runs": {"on": {"body": body(compare_settings, True), "chunks": on_chunks},
                            "off": {"body": off_body, "chunks": off_chunks}}}
        (HERE / "compare.json").write_text(json.dumps(compare, indent=1, ensure_ascii=False) + "\n")

        # A conversation of two turns, saved as ChatScreen saves it.
        conv_messages = []
        for prompt in (PROMPT, FOLLOW_UP):
            conv_messages.append({"role": "user", "content": prompt})
            history = [{"role": m["role"], "content": m["content"]} for m in conv_messages]
            chunks, stats = await run(client, model, history, body(settings, True))
            conv_messages.append({"role": "assistant", "content": "".join(c["text"] for c in chunks),
                                  "stats": stats.summary(), "events": stats.events})
        conversation = {"version": 1, "id": "20250102-030405-0a1b2c3d", "title": PROMPT, "model": model,
                        "settings": settings, "messages": conv_messages,
                        "created": 1735787045.0, "updated": 1735787112.0}  # 2025-01-02 03:04:05 / 03:05:12 UTC
        (HERE / "conversation.json").write_text(json.dumps(conversation, indent=1, ensure_ascii=False) + "\n")
        await client.close()
    finally:
        await process.stop()
    process.log_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
