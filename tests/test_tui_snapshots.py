"""Snapshots of every screen of the terminal app (pytest-textual-snapshot), at a fixed 100 x 32 terminal.

Each test drives the real app to one screen and compares an SVG screenshot with tests/__snapshots__/. Nothing in
them depends on the clock or the machine: the catalog rows are frozen (tests/data/tui/catalog.json), the engine
start-up is scripted through fakes of EngineProcess and EngineClient.health, the conversation and the compare run
are recordings of the real engine (tests/data/tui/record.py made them; their stats come from the recorded events'
elapsed times), saved times are shown in UTC, and notifications and cursor blinking are settled before the shot.

Update after an intended change of the UI: `.venv/bin/python -m pytest tests/test_tui_snapshots.py --snapshot-update`,
then look at the SVGs (the failure report, snapshot_report.html, shows old and new side by side).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from textual.widgets import Static, TextArea

from dspark_chat.app import tui
from dspark_chat.app.engine_client import Chunk, EngineClient
from dspark_chat.app.history import Conversation, History
from dspark_chat.app.tui import DEFAULT_SETTINGS, ChatScreen, CompareScreen, Connection, DSparkChat, StartScreen

DATA = Path(__file__).parent / "data" / "tui"
SIZE = (100, 32)
ROWS = json.loads((DATA / "catalog.json").read_text(encoding="utf-8"))
CONVERSATION = json.loads((DATA / "conversation.json").read_text(encoding="utf-8"))
COMPARE = json.loads((DATA / "compare.json").read_text(encoding="utf-8"))
MODEL = COMPARE["model"]
WAIT_S = 30  # bound on waiting for a worker inside the app; the screens settle in well under a second

DOWNLOADING = {"status": "downloading", "message": "Qwen/Qwen3-4B: model-00002-of-00003.safetensors",
               "progress": {"done": 4_012_345_678, "total": 10_847_080_000, "file": "model-00002-of-00003.safetensors",
                            "file_done": 1_204_000_000, "file_size": 3_957_900_000}}
LOADING = {"status": "loading", "message": "loading the drafter (int8 on an x86 CPU)", "phases": [
    {"name": "starting: Python, torch, transformers and the server", "seconds": 3.14, "done": True},
    {"name": "converting the GGUF file to safetensors (once per file)", "seconds": 27.9, "done": True},
    {"name": "loading the target", "seconds": 1.23, "done": True},
    {"name": "measuring this CPU's matrix products (once per model and machine)", "seconds": 34.6, "done": True},
    {"name": "loading the drafter (int8 on an x86 CPU)", "seconds": 0.4, "done": False}]}
DOWNLOAD_FAILED = {"status": "error", "message": (
    "downloading model-00002-of-00003.safetensors from Qwen/Qwen3-4B failed (the connection was reset): "
    "run `dspark-chat pull Qwen/Qwen3-4B` again, it resumes where it stopped")}


# ---------------------------------------------------------------- helpers


async def until(pilot, condition, what: str) -> None:
    """Let the app run until condition() holds (bounded: a hang fails with what it was waiting for)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S} s waiting for {what}")
        await pilot.pause(0.05)


async def settle(pilot) -> None:
    """What makes a shot deterministic: no toasts (they expire on a timer) and a steady cursor (it blinks on one)."""
    await pilot.pause()
    pilot.app.clear_notifications()
    for widget in pilot.app.screen.query("Input, TextArea"):
        widget.cursor_blink = False
    await pilot.pause()


def text(pilot, selector: str) -> str:
    return str(pilot.app.screen.query_one(selector, Static).content)


def saved_history(root: Path) -> History:
    """A History holding the recorded conversation and a second, older one, with the `updated` times of the files
    as written (History.save would stamp the current time)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / "conversation.json", root / f"{CONVERSATION['id']}.json")
    older = {"version": 1, "id": "20241231-225901-9f8e7d6c", "title": "What is speculative decoding?", "model": MODEL,
             "settings": dict(DEFAULT_SETTINGS), "created": 1735685941.0, "updated": 1735686000.0,  # 2024-12-31 23:00 UTC
             "messages": [{"role": "user", "content": "What is speculative decoding?"},
                          {"role": "assistant", "content": "A small model drafts tokens; the large one checks them in one pass."}]}
    (root / f"{older['id']}.json").write_text(json.dumps(older), encoding="utf-8")
    return History(root)


def offline_connection(client: EngineClient | None = None) -> Connection:
    """Our engine, as far as the chat screen knows; nothing is sent unless a test sends a prompt."""
    return Connection(client or EngineClient("http://127.0.0.1:9"), MODEL, ours=True)


def chat_ready(app) -> bool:
    """The chat screen is mounted: its on_mount focused the prompt box."""
    return isinstance(app.screen, ChatScreen) and isinstance(app.focused, tui.ChatInput)


async def open_recorded_conversation(pilot) -> None:
    app = pilot.app
    app.connection = offline_connection()
    app.open_conversation(app.history.load(CONVERSATION["id"]))
    await until(pilot, lambda: chat_ready(app), "the chat screen")


@pytest.fixture
def utc(monkeypatch):
    """The history list shows local time: pin it to UTC for the test, and restore the zone after."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# ---------------------------------------------------------------- picking a pair


def test_picker(snap_compare, tmp_path):
    """The picker on five frozen catalog rows: the embedded pair first and highlighted, a partial download, two
    pairs that do not fit (plan in red), Qwen3-4B's two drafters under one target name, and the highlighted
    pair's explanation below the table. The frozen rows list Qwen3-4B's DFlash pair last; the picker shows it
    with the target's other drafter."""
    app = DSparkChat(catalog_rows=ROWS, history=History(tmp_path))

    async def run_before(pilot):
        await settle(pilot)
        assert [r["name"] for r in pilot.app.screen.shown] == [
            "smollm2", "qwen3-4b-dspark", "qwen3-4b-dflash", "qwen3-8b-dflash", "qwen3-14b-dspark"]

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_picker_filtered(snap_compare, tmp_path):
    """Typing "dspark" in the filter keeps the two DSpark pairs (matched on name, kind or description) and
    explains the first of them."""
    app = DSparkChat(catalog_rows=ROWS, history=History(tmp_path))

    async def run_before(pilot):
        await pilot.press(*"dspark")
        await settle(pilot)
        assert [r["name"] for r in pilot.app.screen.shown] == ["qwen3-4b-dspark", "qwen3-14b-dspark"]

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


# ---------------------------------------------------------------- starting the engine


class FakeProcess:
    """Stands in for EngineProcess: "starts" at once and never exits."""

    def __init__(self, pair, engine_args=()):
        self.pair, self.returncode, self.stopped = pair, None, False

    async def start(self) -> str:
        return "http://127.0.0.1:9"

    async def stop(self) -> None:
        self.stopped = True

    def failure(self) -> str:
        return "not used"


def scripted_client(states: list[dict]):
    """An EngineClient whose /health answers are `states`, one per poll; after the last it waits forever, so
    the screen keeps showing that state (and the download rate, which needs two samples, never appears)."""

    class ScriptedClient(EngineClient):
        async def health(self):
            if states:
                return states.pop(0)
            await asyncio.Event().wait()

    return ScriptedClient


def test_start_downloading(snap_compare, tmp_path, monkeypatch):
    """Enter on the second row starts qwen3-4b-dspark; the engine reports a download: what it fetches, the
    progress bar (37%) and the bytes done of the total, with no rate since only one sample arrived."""
    monkeypatch.setattr(tui, "EngineProcess", FakeProcess)
    monkeypatch.setattr(tui, "EngineClient", scripted_client([DOWNLOADING]))
    app = DSparkChat(catalog_rows=ROWS, history=History(tmp_path))

    async def run_before(pilot):
        await pilot.press("down", "enter")
        await until(pilot, lambda: isinstance(app.screen, StartScreen) and text(pilot, "#state").startswith("downloading"),
                    "the download state")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_start_loading_phases(snap_compare, tmp_path, monkeypatch):
    """Enter on the embedded pair (the first row); the engine is loading: each start-up phase so far with its time,
    the one running last (its time still counting, marked with an ellipsis)."""
    monkeypatch.setattr(tui, "EngineProcess", FakeProcess)
    monkeypatch.setattr(tui, "EngineClient", scripted_client([LOADING]))
    app = DSparkChat(catalog_rows=ROWS, history=History(tmp_path))

    async def run_before(pilot):
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, StartScreen) and "0.4 s" in text(pilot, "#phases"), "the phases")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_start_error(snap_compare, tmp_path, monkeypatch):
    """The download then fails: the screen says the engine could not start, shows the engine's message and how
    to go on (r retries, escape goes back). The bar is hidden by the error state, but the last bytes line stays."""
    monkeypatch.setattr(tui, "EngineProcess", FakeProcess)
    monkeypatch.setattr(tui, "EngineClient", scripted_client([DOWNLOADING, DOWNLOAD_FAILED]))
    app = DSparkChat(catalog_rows=ROWS, history=History(tmp_path))

    async def run_before(pilot):
        await pilot.press("down", "enter")
        await until(pilot, lambda: isinstance(app.screen, StartScreen) and app.screen.failed, "the failed start")
        assert app.screen.process.stopped
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


# ---------------------------------------------------------------- chatting


def test_chat_resumed(snap_compare, tmp_path):
    """A resumed two-turn conversation recorded from the engine, as formatted Markdown (code block highlighted),
    shown from its start; the first answer with its stats line (tokens, tok/s, tau, acceptance, first token,
    draft/verify split); the status bar says ready and the prompt box waits for input."""
    app = DSparkChat(catalog_rows=ROWS, history=saved_history(tmp_path / "history"))

    async def run_before(pilot):
        await open_recorded_conversation(pilot)
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_chat_origins(snap_compare, tmp_path):
    """ctrl+o once, scrolled to the end: the answers as token origins, accepted drafts in bold green, target tokens
    plain; in the second answer prompt lookup copied most of the code from the first."""
    app = DSparkChat(catalog_rows=ROWS, history=saved_history(tmp_path / "history"))

    async def run_before(pilot):
        await open_recorded_conversation(pilot)
        await pilot.press("ctrl+o")
        assert pilot.app.screen.view == "origins"
        pilot.app.screen.query_one("#messages").scroll_end(animate=False)
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_chat_origins_rejected(snap_compare, tmp_path):
    """ctrl+o twice, scrolled to the end: token origins with each round's rejected drafts struck through (dim)
    before the target's token that replaced them."""
    app = DSparkChat(catalog_rows=ROWS, history=saved_history(tmp_path / "history"))

    async def run_before(pilot):
        await open_recorded_conversation(pilot)
        await pilot.press("ctrl+o", "ctrl+o")
        assert pilot.app.screen.view == "origins+rejected"
        pilot.app.screen.query_one("#messages").scroll_end(animate=False)
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_settings_modal(snap_compare, tmp_path):
    """ctrl+s over the chat: the settings dialog with the conversation's values (temperature 0, top-p 1,
    48 max tokens, blank block size and seed, scheduler auto, speculation on)."""
    app = DSparkChat(catalog_rows=ROWS, history=saved_history(tmp_path / "history"))

    async def run_before(pilot):
        await open_recorded_conversation(pilot)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(pilot.app.screen, tui.SettingsScreen), "the settings dialog")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_history_modal(snap_compare, tmp_path, utc):
    """ctrl+l over the chat: the two saved conversations, newest first, with title, model, message count and
    the time of the last change in local time (UTC here)."""
    app = DSparkChat(catalog_rows=ROWS, history=saved_history(tmp_path / "history"))

    async def run_before(pilot):
        await open_recorded_conversation(pilot)
        await pilot.press("ctrl+l")
        await until(pilot, lambda: isinstance(pilot.app.screen, tui.HistoryScreen), "the history dialog")
        assert [c.id for c in pilot.app.screen.conversations] == [CONVERSATION["id"], "20241231-225901-9f8e7d6c"]
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


# ---------------------------------------------------------------- compare


class ReplayClient:
    """Answers as the engine did when compare.json was recorded: speculation on or off by the request body.
    Keeps every request, so the test can check the app asked what was recorded."""

    url = "http://127.0.0.1:9"

    def __init__(self):
        self.requests: list[tuple[str, list[dict], dict]] = []

    async def chat(self, model: str, messages: list[dict], body: dict):
        self.requests.append((model, messages, body))
        for chunk in COMPARE["runs"]["on" if body["speculative"] else "off"]["chunks"]:
            await asyncio.sleep(0)  # a stream: let the screen render between chunks
            yield Chunk(**chunk)

    async def close(self) -> None:
        pass


def test_compare_finished(snap_compare, tmp_path):
    """ctrl+r on a typed prompt: the recorded answers with speculation on (left) and off (right), each with its
    stats, and the verdict: speedup, tau, acceptance, and whether the tokens are identical."""
    client = ReplayClient()
    app = DSparkChat(catalog_rows=ROWS, history=History(tmp_path / "history"))

    async def run_before(pilot):
        app.connection = offline_connection(client)
        app.open_conversation(Conversation.new(MODEL, COMPARE["settings"]))
        await until(pilot, lambda: chat_ready(app), "the chat screen")
        app.screen.query_one("#prompt", TextArea).text = COMPARE["messages"][-1]["content"]
        await pilot.press("ctrl+r")
        await until(pilot, lambda: isinstance(app.screen, CompareScreen) and "speedup" in text(pilot, "#verdict"),
                    "the verdict")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
    # The app asked what the recording answered: the same messages and bodies (seed 0, on, then off with the
    # first run's tokens to compare with).
    recorded = [(MODEL, COMPARE["messages"], COMPARE["runs"][side]["body"]) for side in ("on", "off")]
    assert client.requests == recorded
