"""The terminal app driven by Pilot against real engine processes: a tiny DSpark pair laid out in a
Hub cache (offline), started from the picker as a user would; and external servers by URL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual import events
from textual.app import App

from dspark_chat.app.engine_client import EngineProcess
from dspark_chat.app.history import History
from dspark_chat.app.tui import (Answer, ChatInput, ChatScreen, CompareScreen, DSparkChat, HistoryScreen, PickerScreen,
                                 SettingsScreen, StatusBar)

from .conftest import REFERENCE, TINY_DSPARK_PAIR_TOML, TINY_TARGET_TOML
from .test_hub import build_cache

WAIT_S = 180  # bound on any wait; the tests assert behaviour, never speed
SIZE = (120, 40)

CATALOG = TINY_TARGET_TOML + TINY_DSPARK_PAIR_TOML + 'description = "a tiny random Qwen3 with a DSpark drafter"\n'


@pytest.fixture
def tiny_hub(tiny_target_dir, tmp_path, monkeypatch) -> Path:
    """The tiny pair in an offline Hub cache and the user's catalog; history under tmp_path."""
    build_cache(tmp_path, {p.name: p.read_bytes() for p in tiny_target_dir.iterdir() if p.is_file()})
    build_cache(tmp_path, {p.name: p.read_bytes() for p in (REFERENCE / "dspark").iterdir()}, repo="acme/tiny-dspark")
    catalog = tmp_path / "config" / "dspark-chat" / "models.toml"
    catalog.parent.mkdir(parents=True)
    catalog.write_text(CATALOG)
    for key in [k for k in os.environ if k.startswith(("HF_", "HUGGINGFACE_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


async def until(pilot, condition, what: str):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; screen: {pilot.app.screen!r}")
        await pilot.pause(0.05)


async def ask(pilot, text: str) -> Answer:
    """Type a prompt, send it, and wait for the whole answer."""
    app = pilot.app
    app.screen.query_one(ChatInput).insert(text)
    await pilot.press("enter")
    await until(pilot, lambda: any(a.role == "assistant" for a in app.screen.query(Answer)), "the answer to start")
    await until(pilot, lambda: not app.screen.generating, "the answer to finish")
    return [a for a in app.screen.query(Answer) if a.role == "assistant"][-1]


async def chat_ready(pilot) -> ChatScreen:
    """The chat screen, once it is mounted: the screen is current a moment before its widgets are."""
    def mounted() -> bool:
        screen = pilot.app.screen
        return isinstance(screen, ChatScreen) and screen.is_mounted and bool(screen.query(ChatInput))
    await until(pilot, mounted, "the chat screen")
    return pilot.app.screen


def greedy_reference(url: str, model: str, messages: list[dict], max_tokens: int, speculative: bool = False) -> dict:
    """The same request straight to the engine, without the app."""
    import httpx

    r = httpx.post(f"{url}/v1/chat/completions", timeout=WAIT_S, json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "speculative": speculative})
    r.raise_for_status()
    return r.json()


def test_pick_a_pair_chat_settings_cancel_and_history(tiny_hub):
    """From the picker (the real `models --json`), filter, start the pair, chat: the streamed answer is
    the engine's greedy answer, the status bar shows live statistics, and everything is saved."""

    async def run():
        history = History()
        app = DSparkChat(history=history)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, PickerScreen) and app.screen.rows is not None, "the catalog")
            names = [r["name"] for r in app.screen.rows]
            assert "tiny-dspark" in names and names[0] in ("tiny-dspark", "smollm2")  # runnable pairs come first
            await pilot.press(*"tiny")
            assert [r["name"] for r in app.screen.shown] == ["tiny-dspark"]
            await pilot.press("enter")
            chat = await chat_ready(pilot)
            assert app.connection.ours and app.connection.model == "tiny-dspark"

            # Settings: a short greedy answer for the first turn.
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, SettingsScreen)
            for field, value in (("temperature", "0"), ("max_tokens", "24")):
                app.screen.query_one(f"#{field}").value = value
            app.screen.query_one("#seed").value = "not a number"
            await pilot.click("#save")
            assert isinstance(app.screen, SettingsScreen)  # refused, with the reason
            assert "seed" in str(app.screen.query_one("#settings-error").render())
            app.screen.query_one("#seed").value = "7"
            await pilot.pause(0.6)  # a second click within 0.5 s is a double click, which buttons ignore
            await pilot.click("#save")
            await until(pilot, lambda: app.screen is chat, "the settings to close")
            assert app.screen is chat and chat.conversation.settings["max_tokens"] == 24 and chat.conversation.settings["seed"] == 7

            answer = await ask(pilot, "hello there")
            expected = greedy_reference(app.connection.client.url, "tiny-dspark", [{"role": "user", "content": "hello there"}], 24)
            assert answer.content == expected["choices"][0]["message"]["content"]
            assert answer.stats["tokens"] == expected["usage"]["completion_tokens"]
            assert answer.stats["rounds"] > 0 and answer.stats["drafted"] > 0  # the drafter took part
            status = str(chat.query_one(StatusBar).render())
            assert "tok/s" in status and "tau" in status and "first token" in status and "accepted by position" in status

            # Cancel: a long answer stopped by escape keeps what arrived and is saved. The tiny model's
            # greedy answer to this prompt runs to the token limit (to others it stops by itself after a
            # few hundred tokens, which a fast machine streams before the escape lands).
            chat.conversation.settings["max_tokens"] = 900
            history_so_far = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": answer.content},
                              {"role": "user", "content": "write a long story"}]
            reference = greedy_reference(app.connection.client.url, "tiny-dspark", history_so_far, 900)
            assert reference["choices"][0]["finish_reason"] == "length"
            chat.query_one(ChatInput).insert("write a long story")
            await pilot.press("enter")
            await until(pilot, lambda: chat.query(Answer)[-1].content, "the first tokens")
            await pilot.press("escape")
            await until(pilot, lambda: not chat.generating, "the cancel")
            stopped = chat.query(Answer)[-1]
            assert stopped.stats["finish_reason"] is None and stopped.stats["tokens"] < 900
            assert "(stopped)" in stopped.query_one("Markdown").source

            saved = history.load(chat.conversation.id)
            assert [m["role"] for m in saved.messages] == ["user", "assistant", "user", "assistant"]
            assert saved.messages[1]["content"] == answer.content and saved.messages[1]["stats"]["tokens"] == answer.stats["tokens"]
            assert saved.settings["seed"] == 7

            # History: a new chat, then the saved one again, then its export.
            first_id = chat.conversation.id
            await pilot.press("ctrl+n")
            await until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.is_mounted and app.screen.conversation.id != first_id, "a new chat")
            await pilot.press("ctrl+l")
            await until(pilot, lambda: isinstance(app.screen, HistoryScreen), "the history")
            assert [c.id for c in app.screen.conversations] == [first_id]
            export_dir = tiny_hub / "documents"
            os.environ["XDG_DOCUMENTS_DIR"] = str(export_dir)  # platformdirs reads it at call time
            await pilot.press("e")
            exported = export_dir / "dspark-chat" / f"{first_id}.md"
            assert exported.read_text() == history.export_markdown(saved)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.is_mounted and app.screen.conversation.id == first_id, "the resumed chat")
            resumed = [a.content for a in app.screen.query(Answer)]
            assert resumed == [m["content"] for m in saved.messages]
            # Delete takes two presses.
            await pilot.press("ctrl+l")
            await until(pilot, lambda: isinstance(app.screen, HistoryScreen), "the history")
            await pilot.press("d")
            assert history.list()[0]
            await pilot.press("d")
            assert history.list()[0] == []

    asyncio.run(run())


def test_compare_greedy_is_identical_and_reports_the_speedup(tiny_hub):
    async def run():
        app = DSparkChat(pair="tiny-dspark", history=History())
        async with app.run_test(size=SIZE) as pilot:
            chat = await chat_ready(pilot)
            chat.conversation.settings["max_tokens"] = 40
            chat.query_one(ChatInput).insert("compare this")
            await pilot.press("ctrl+r")
            assert isinstance(app.screen, CompareScreen)
            screen = app.screen
            await until(pilot, lambda: "speedup" in str(screen.query_one("#verdict").render()), "both answers")
            verdict = str(screen.query_one("#verdict").render())
            assert "Identical" in verdict, verdict
            on, off = screen.results["on"], screen.results["off"]
            assert on.token_ids() == off.token_ids() and len(on.token_ids()) == 40
            assert on.summary()["verified"] > 0 and off.summary()["verified"] == 0  # speculation really on, then off
            assert off.summary()["comparison"] == {"identical": True, "divergence": None}  # the engine's own verdict
            await pilot.press("escape")
            assert app.screen is chat and chat.conversation.messages == []  # compare leaves the chat alone

    asyncio.run(run())


def test_engine_crash_is_reported_and_restart_keeps_the_conversation(tiny_hub):
    async def run():
        app = DSparkChat(pair="tiny-dspark", history=History())
        async with app.run_test(size=SIZE) as pilot:
            chat = await chat_ready(pilot)
            chat.conversation.settings["max_tokens"] = 8
            first = await ask(pilot, "before the crash")
            os.kill(app.connection.process.proc.pid, signal.SIGKILL)
            await until(pilot, lambda: app.engine_down, "the crash to be noticed")
            assert "engine stopped" in str(chat.query_one(StatusBar).render()) and "F5" in str(chat.query_one(StatusBar).render())
            chat.query_one(ChatInput).insert("while it is down")
            await pilot.press("enter")
            await pilot.pause()
            assert len(chat.conversation.messages) == 2  # refused, and nothing lost:
            assert chat.query_one(ChatInput).text == "while it is down"  # the prompt is back in the input
            chat.query_one(ChatInput).clear()
            await pilot.press("f5")
            await until(pilot, lambda: app.screen is chat and not app.engine_down, "the restart")
            assert app.connection.process.returncode is None
            again = await ask(pilot, "before the crash")
            assert [a.content for a in chat.query(Answer) if a.role == "assistant"][0] == first.content
            assert again.content  # the restarted engine answers
            assert len(chat.conversation.messages) == 4

    asyncio.run(run())


def test_external_engine_url_with_our_engine(tiny_hub, tiny_target_dir):
    """--engine-url to a dspark engine someone started: full statistics, no process to manage."""
    proc = subprocess.Popen([sys.executable, "-m", "dspark_chat.engine", "serve", "--target", str(tiny_target_dir), "--port", "0",
                             "--prompt-lookup", "--dtype", "float32", "--device", "cpu", "--api-key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = json.loads(proc.stdout.readline())["url"]

        async def run():
            app = DSparkChat(engine_url=url, api_key="k", history=History())
            async with app.run_test(size=SIZE) as pilot:
                chat = await chat_ready(pilot)
                assert app.connection.ours and app.connection.process is None
                chat.conversation.settings["max_tokens"] = 16
                answer = await ask(pilot, "hi")
                assert answer.stats["source"] == "dspark" and answer.stats["tokens"] == 16
            wrong = DSparkChat(engine_url=url, api_key="wrong", history=History())
            async with wrong.run_test(size=SIZE) as pilot:
                await until(pilot, lambda: "--api-key" in str(pilot.app.screen.query_one("#error").render()), "the refusal")

        asyncio.run(run())
    finally:
        proc.kill()
        proc.wait()


OPENAI_STUB = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FLAVOUR = sys.argv[1]
WORDS = ["Hello", " from", " another", " server", "."]

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args): pass
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "other-model", "object": "model"}]}).encode()
        if self.path != "/v1/models":
            body = b"OK"  # vLLM's /health is empty text, not our JSON
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        for i, word in enumerate(WORDS):
            chunk = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": "stop" if i == len(WORDS) - 1 else None}]}
            if i == len(WORDS) - 1 and FLAVOUR == "llama.cpp":
                chunk["timings"] = {"predicted_n": 5, "predicted_per_second": 42.5, "draft_n": 8, "draft_n_accepted": 6}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        usage = {"completion_tokens": 5, "prompt_tokens": 3, "total_tokens": 8}
        if FLAVOUR == "vllm":
            usage["speculative_decoding"] = {"num_drafts": 2, "num_draft_tokens": 6, "num_accepted_tokens": 3}
        self.wfile.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n")

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
'''


@pytest.mark.parametrize("flavour,expect", [
    ("plain", "acceptance not reported by this server"),
    ("vllm", "acceptance 50%"),
    ("llama.cpp", "acceptance 75%"),
])
def test_other_openai_servers_show_what_they_report(flavour, expect, tmp_path, monkeypatch):
    """Servers we cannot run here (vLLM, llama.cpp's server) stood in for by a stub speaking their
    stream format: the answer and tok/s always, acceptance only where the server reports it."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    proc = subprocess.Popen([sys.executable, "-c", OPENAI_STUB, flavour], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())

        async def run():
            app = DSparkChat(engine_url=f"http://127.0.0.1:{port}", history=History())
            async with app.run_test(size=SIZE) as pilot:
                chat = await chat_ready(pilot)
                assert not app.connection.ours and app.connection.model == "other-model"
                answer = await ask(pilot, "hi")
                assert answer.content == "Hello from another server."
                line = str(answer.query_one(".turn-stats").render())
                assert "5 tokens" in line and "tok/s" in line and expect in line, line
                await pilot.press("ctrl+r")
                assert app.screen is chat  # compare needs our engine, and says so

        asyncio.run(run())
    finally:
        proc.kill()
        proc.wait()


def test_engine_that_fails_to_start_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    process = EngineProcess("no-such-pair", log_path=tmp_path / "engine.log")

    async def run():
        from dspark_chat.app.engine_client import EngineError

        with pytest.raises(EngineError) as failed:
            await process.start()
        return str(failed.value)

    message = asyncio.run(run())
    assert "no-such-pair" in message and "exit code 2" in message and str(tmp_path / "engine.log") in message


def test_app_never_imports_torch():
    code = "import sys; import dspark_chat.app.tui, dspark_chat.app.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_enter_and_ctrl_j_act_where_they_come_among_keys_sent_at_once():
    """Keys queued together, as a terminal delivers a burst (text typed fast, or pasted, then Enter): Enter sends
    exactly the text before it, ctrl+j adds its line where it comes, and the keys after Enter start the next prompt."""
    sent = []

    class OneInput(App):
        def compose(self):
            yield ChatInput()

        def on_chat_input_submitted(self, message: ChatInput.Submitted) -> None:
            sent.append(message.text)

    async def run():
        app = OneInput()
        async with app.run_test() as pilot:
            for key in [*"first", "ctrl+j", *"line", "enter", *"next", "ctrl+j", "enter", *"ok"]:
                app.post_message(events.Key(key, key if len(key) == 1 else None))
            app.post_message(events.Paste("pasted\ntext"))
            app.post_message(events.Key("enter", "\r"))
            await pilot.pause()
            assert sent == ["first\nline", "next", "ok" + "pasted\ntext"]
            assert app.query_one(ChatInput).text == ""

    asyncio.run(run())
