"""The dspark-chat terminal app: pick a pair, chat with live acceptance, compare speculation on and off.

It talks to the engine process over HTTP only (app/engine_client.py) and never imports torch, so it
starts at once and stays responsive while the engine loads, downloads or decodes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from rich.text import Text
from textual import events, on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import (Button, DataTable, Footer, Header, Input, Label, Markdown, OptionList, ProgressBar, Select,
                             Static, Switch, TextArea)
from textual.widgets.option_list import Option

from .engine_client import EngineClient, EngineError, EngineProcess, TurnStats, acceptance_chart, format_stats
from .history import Conversation, History, HistoryError

DEFAULT_SETTINGS = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 512, "block_size": None, "scheduler": "auto",
                    "speculative": True, "seed": None}
READY = ("yes", "built in")  # `downloaded` values of a pair that needs no download
FORMAT_NAMES = {"deepspec": "DeepSpec's layout", "speculators": "speculators format"}
REDRAW_S = 0.25  # streamed text and live statistics are redrawn at most this often: a layout pass costs ~30 ms


class PacedStream:
    """Streams text into a Markdown widget at most every REDRAW_S: re-rendering Markdown every round
    would take CPU from the engine, which shares the cores. write() says whether it redrew."""

    def __init__(self, markdown: Markdown):
        self.stream = Markdown.get_stream(markdown)
        self.pending: list[str] = []
        self.last = 0.0

    async def write(self, text: str) -> bool:
        self.pending.append(text)
        now = time.monotonic()
        if now - self.last < REDRAW_S:
            return False
        self.last = now
        await self.stream.write("".join(self.pending))
        self.pending.clear()
        return True

    async def stop(self) -> None:
        if self.pending:
            await self.stream.write("".join(self.pending))
        await self.stream.stop()


async def load_catalog_rows() -> list[dict]:
    """The catalog with download state and this machine's plan, from the engine's `models --json`
    (the plan needs torch to see the GPUs, so it runs in a child process)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "dspark_chat.engine", "models", "--json",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode:
        raise EngineError(err.decode(errors="replace").strip() or f"`dspark-chat models` failed ({proc.returncode})")
    rows = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    # What runs now comes first: downloaded (or built in) pairs that fit, then the rest that fit.
    return sorted(rows, key=lambda r: (not r["fits"], r["downloaded"] not in READY))


def grouped_by_target(rows: list[dict]) -> list[dict]:
    """The rows with each target's pairs together, the targets in the order their first pair comes."""
    first: dict[str, int] = {}
    for r in rows:
        first.setdefault(r["target"], len(first))
    return sorted(rows, key=lambda r: first[r["target"]])


@dataclass
class Connection:
    """Where answers come from: our engine process (with its round events) or any OpenAI-compatible server."""

    client: EngineClient
    model: str
    ours: bool  # our engine: per-round events, speculative on/off, divergence verdicts
    process: EngineProcess | None = None
    pair: str | None = None  # the catalog pair we started, for a restart


# ---------------------------------------------------------------- picking a pair


class PickerScreen(Screen):
    BINDINGS = [Binding("down", "move(1)", show=False, priority=True), Binding("up", "move(-1)", show=False, priority=True),
                Binding("enter", "choose", "Start", priority=True)]

    def __init__(self, rows: list[dict] | None = None):
        super().__init__()
        self.rows, self.shown = rows, []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Pick a target + drafter pair (each target's drafters together). Type to filter; Enter starts it.", id="intro")
        yield Input(placeholder="filter: name, kind, model…", id="filter")
        yield DataTable(cursor_type="row", zebra_stripes=True, id="pairs")
        yield Static("", id="explanation")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("target", "pair", "kind", "download", "downloaded", "plan for this machine")
        if self.rows is None:
            self.query_one("#explanation", Static).update("Reading the catalog and this machine's memory…")
            self.load_rows()
        else:
            self.show_rows()

    @work(exclusive=True)
    async def load_rows(self) -> None:
        try:
            self.rows = await load_catalog_rows()
        except EngineError as e:
            self.query_one("#explanation", Static).update(Text.assemble(("Cannot read the catalog:", "bold"), f" {e}"))
            return
        self.show_rows()

    @on(Input.Changed, "#filter")
    def show_rows(self) -> None:
        if self.rows is None:
            return
        words = self.query_one("#filter", Input).value.lower().split()
        table = self.query_one(DataTable)
        table.clear()
        self.shown = grouped_by_target([r for r in self.rows if all(
            w in " ".join(map(str, (r["name"], r["kind"], r["target"], r["description"]))).lower() for w in words)])
        for i, r in enumerate(self.shown):
            size = "-" if not r["download_bytes"] else ("~" if r["estimated"] else "") + f"{r['download_bytes'] / 1e9:.1f} GB"
            plan = Text(r["plan"], style="" if r["fits"] else "red")
            target = r["target"] if i == 0 or self.shown[i - 1]["target"] != r["target"] else ""  # named once per group
            table.add_row(target, r["name"], r["kind"], size, r["downloaded"], plan)
        self.explain()

    @on(DataTable.RowHighlighted)
    def explain(self) -> None:
        row = self.highlighted()
        if row is None:
            self.query_one("#explanation", Static).update(Text("No pair matches the filter."))
            return
        pairs = [r["name"] for r in self.rows if r["target"] == row["target"]]
        drafter = f"drafter {row['drafter']}, {FORMAT_NAMES[row['drafter_format']]}; " if row["drafter"] else ""
        others = f"{len(pairs)} pairs for {row['target']}: {', '.join(pairs)}" if len(pairs) > 1 else f"the only pair for {row['target']}"
        self.query_one("#explanation", Static).update(Text.assemble(
            (row["name"], "bold"), f": {row['description']}\n{drafter}{others}\n{row['explanation']}"))

    def highlighted(self) -> dict | None:
        table = self.query_one(DataTable)
        return self.shown[table.cursor_row] if self.shown and 0 <= table.cursor_row < len(self.shown) else None

    def action_move(self, by: int) -> None:
        table = self.query_one(DataTable)
        if self.shown:
            table.move_cursor(row=max(0, min(len(self.shown) - 1, table.cursor_row + by)))

    @on(DataTable.RowSelected)
    def action_choose(self) -> None:
        row = self.highlighted()
        if row is None:
            return
        if not row["fits"]:
            self.notify(f"{row['name']} does not fit this machine: {row['explanation'].splitlines()[-1].strip()}", markup=False,
                        title="Cannot start", severity="error", timeout=8)
            return
        self.app.start_pair(row["name"])


# ---------------------------------------------------------------- starting the engine


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class StartScreen(Screen):
    """Starts our engine for a pair (or connects to a running server) and follows it until it is ready.
    Dismisses with a Connection, or with None when the user goes back."""

    BINDINGS = [Binding("escape", "back", "Back"), Binding("r", "retry", "Retry")]

    def __init__(self, pair: str | None = None, url: str | None = None, api_key: str | None = None):
        super().__init__()
        self.pair, self.url, self.api_key = pair, url, api_key
        self.process: EngineProcess | None = None
        self.last_sample: tuple[float, int] | None = None
        self.failed = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="start"):
            yield Static(f"Starting {self.pair}" if self.pair else f"Connecting to {self.url}", id="title")
            yield Static("starting the engine process…", id="state")
            yield Static("", id="phases")
            yield ProgressBar(total=None, show_eta=False, id="download")
            yield Static("", id="bytes")
            yield Static("", id="error")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#download").display = self.query_one("#phases").display = False
        self.start()

    @work(exclusive=True)
    async def start(self) -> None:
        self.failed, self.last_sample = False, None
        self.query_one("#error", Static).update("")
        client = None
        try:
            if self.pair:
                self.process = EngineProcess(self.pair, self.app.engine_args)
                url = await self.process.start()
            else:
                url = self.url
            client = EngineClient(url, self.api_key)
            health = await client.wait_ready(self.show_state, self.process)
            model = await client.model_id()
        except EngineError as e:
            if client is not None:
                await client.close()
            if self.process is not None:
                await self.process.stop()
            self.failed = True
            self.query_one("#state", Static).update("[b red]The engine could not start.[/]")
            self.query_one("#error", Static).update(Text(f"{e}\n\nPress r to retry, escape to go back."))
            return
        self.dismiss(Connection(client, model, ours=bool(health), process=self.process, pair=self.pair))

    def show_state(self, health: dict) -> None:
        status, message, progress = health["status"], health.get("message"), health.get("progress")
        words = {"downloading": "downloading", "loading": "loading the model", "ready": "ready"}.get(status, status)
        self.query_one("#state", Static).update(Text(f"{words}" + (f": {message}" if message else "")))
        # Our engine's start-up so far, each part with its time (the running one last, still counting).
        phases = health.get("phases") or []
        widget = self.query_one("#phases", Static)
        widget.display = bool(phases)
        widget.update(Text("\n".join(f"{p['seconds']:6.1f} s  {p['name']}" + ("" if p["done"] else " …") for p in phases)))
        bar = self.query_one("#download", ProgressBar)
        bar.display = bool(progress)
        if not progress:
            self.last_sample = None
            self.query_one("#bytes", Static).update("")
        else:
            now = time.monotonic()
            bar.update(total=progress.get("total") or None, progress=progress.get("done", 0))
            rate = ""
            if self.last_sample and now > self.last_sample[0]:
                rate = f" · {human_bytes((progress['done'] - self.last_sample[1]) / (now - self.last_sample[0]))}/s"
            self.last_sample = (now, progress.get("done", 0))
            self.query_one("#bytes", Static).update(
                f"{human_bytes(progress.get('done', 0))} of {human_bytes(progress.get('total') or 0)}{rate} · {progress.get('file', '')}")

    async def action_back(self) -> None:
        self.workers.cancel_all()
        if self.process is not None:
            await self.process.stop()
        self.dismiss(None)

    def action_retry(self) -> None:
        if self.failed:
            self.start()


# ---------------------------------------------------------------- chatting


class ChatInput(TextArea):
    """Enter sends; ctrl+j adds a line (terminals send the same key for enter and shift+enter).

    Both keys are handled here, in the order keys reach the input, not by bindings: the App runs a priority
    binding as the key arrives, before the characters queued ahead of it have reached the input, and a plain
    one after the key has passed the input, when keys typed after it may be in. So a prompt typed or pasted
    and sent in one burst arrives whole. The input empties as it sends: keys after Enter start the next prompt."""

    BINDINGS = [Binding("enter", "submit", "Send"), Binding("ctrl+j", "newline", "New line")]  # for the footer

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        action = {"enter": self.action_submit, "ctrl+j": self.action_newline}.get(event.key)
        if action is not None:
            event.stop()
            event.prevent_default()  # TextArea's own handler would insert a line for enter
            action()

    def action_submit(self) -> None:
        text = self.text.strip()
        if text:
            self.clear()
            self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")

    def give_back(self, text: str) -> None:
        """A prompt that could not be sent goes back in front of whatever was typed since."""
        self.insert(text + ("\n" if self.text else ""), (0, 0))


class Answer(Vertical):
    """One message. An assistant answer streams as Markdown, keeps its round events and statistics,
    and can show each token's origin instead (accepted drafts, target tokens, rejected drafts)."""

    can_focus = True
    VIEWS = ("markdown", "origins", "origins+rejected")

    def __init__(self, role: str, content: str = "", stats: dict | None = None, events: list[dict] | None = None):
        super().__init__(classes=f"message {role}")
        self.role, self.content, self.stats, self.events = role, content, stats, events or []
        self.view = "markdown"

    def compose(self) -> ComposeResult:
        yield Label({"user": "You", "assistant": "Assistant", "system": "System"}.get(self.role, self.role), classes="role")
        yield Markdown(self.content, classes="body")
        yield Static(self.origin_text(), classes="origins")
        yield Static(self.stats_line(), classes="turn-stats")

    def on_mount(self) -> None:
        self.show(self.view)

    def stats_line(self) -> str:
        return format_stats(self.stats) if self.stats else ""

    def origin_text(self, rejected: bool = False) -> Text:
        text, shown = Text(), 0
        for event in self.events:
            for piece, origin in zip(event.get("pieces") or [], event["origins"]):
                if shown >= len(self.content):
                    break  # pieces past a stop string are not part of the answer
                if rejected and origin == "target" and event.get("rejected_text"):
                    text.append(event["rejected_text"], style="dim strike")
                text.append(piece, style="bold green" if origin == "draft" else "")
                shown += len(piece)
        return text

    def show(self, view: str) -> None:
        self.view = view
        origins = view != "markdown" and self.role == "assistant" and any(e.get("pieces") for e in self.events)
        self.query_one(Markdown).display = not origins
        widget = self.query_one(".origins", Static)
        widget.display = origins
        if origins:
            widget.update(self.origin_text(rejected=view == "origins+rejected"))
        self.query_one(".turn-stats", Static).update(self.stats_line())

    def to_message(self) -> dict:
        message = {"role": self.role, "content": self.content}
        if self.stats:
            message["stats"] = self.stats
        if self.events:
            message["events"] = self.events
        return message


class StatusBar(Static):
    def show_stats(self, stats: dict | None, note: str = "") -> None:
        line = Text(note)
        if stats:
            line = Text(format_stats(stats))
            chart = stats.get("acceptance_by_position")
            if chart:
                line.append("  accepted by position ")
                line.append(acceptance_chart(chart), style="bold green")
        self.update(line)


class ChatScreen(Screen):
    AUTO_FOCUS = "ChatInput"
    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+r", "compare", "Compare on/off"),
        Binding("ctrl+o", "origins", "Origins"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+l", "history", "History"),
        Binding("ctrl+n", "new", "New chat"),
        Binding("ctrl+g", "copy", "Copy answer"),
        Binding("f5", "restart", "Restart engine", show=False),
    ]

    def __init__(self, conversation: Conversation):
        super().__init__()
        self.conversation = conversation
        self.view = "markdown"
        self.generating = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(*[Answer(m["role"], m["content"], m.get("stats"), m.get("events")) for m in self.conversation.messages],
                             id="messages")
        yield StatusBar("", id="status")
        yield ChatInput(id="prompt", placeholder="Ask something. Enter sends, ctrl+j adds a line.")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1.0, self.check_engine)
        self.call_after_refresh(self.query_one("#messages", VerticalScroll).scroll_end, animate=False)
        self.show_connection()

    def show_connection(self) -> None:
        c = self.app.connection
        self.sub_title = f"{c.model}" + ("" if c.ours else " (external server: acceptance only where it reports it)")
        self.query_one(StatusBar).show_stats(None, "ready" if c.ours else f"connected to {c.client.url}")

    def check_engine(self) -> None:
        process = self.app.connection.process if self.app.connection else None
        if process is not None and process.returncode is not None and not self.app.engine_down:
            self.app.engine_down = True
            self.query_one(StatusBar).show_stats(None, f"{process.failure()}. Press F5 to restart it; the conversation is kept.")
            self.notify("The engine process stopped. Press F5 to restart it.", title="Engine stopped", severity="error", timeout=10)

    def messages(self) -> list[dict]:
        return [{"role": m["role"], "content": m["content"]} for m in self.conversation.messages]

    @on(ChatInput.Submitted)
    async def send(self, message: ChatInput.Submitted) -> None:
        if self.generating or self.app.engine_down:
            self.query_one(ChatInput).give_back(message.text)
            if self.generating:
                self.notify("Still answering: press escape to stop it first.", severity="warning")
            else:
                self.notify("The engine is not running: press F5 to restart it.", severity="error")
            return
        self.conversation.messages.append({"role": "user", "content": message.text})
        self.save()  # the question survives a crash while it is being answered
        scroll = self.query_one("#messages", VerticalScroll)
        await scroll.mount(Answer("user", message.text))
        answer = Answer("assistant")
        await scroll.mount(answer)
        answer.show(self.view)
        scroll.scroll_end(animate=False)
        self.answer(answer)

    def request_body(self, settings: dict, speculative: bool | None = None, compare_with: list[int] | None = None) -> dict:
        body = {"temperature": settings["temperature"], "top_p": settings["top_p"], "max_tokens": settings["max_tokens"]}
        if settings.get("seed") is not None:
            body["seed"] = settings["seed"]
        if self.app.connection.ours:
            body["speculative"] = settings["speculative"] if speculative is None else speculative
            options = {"scheduler": settings["scheduler"]}
            if settings.get("block_size") is not None:
                options["block_size"] = settings["block_size"]
            if compare_with is not None:
                options["compare_with"] = compare_with
            body["dspark"] = options
        return body

    @work(exclusive=True, group="answer")
    async def answer(self, answer: Answer) -> None:
        self.generating = True
        stats = TurnStats()
        stream = PacedStream(answer.query_one(Markdown))
        status = self.query_one(StatusBar)
        scroll = self.query_one("#messages", VerticalScroll)
        c = self.app.connection
        ending = ""
        try:
            async for chunk in c.client.chat(c.model, self.messages(), self.request_body(self.conversation.settings)):
                stats.add(chunk)
                if chunk.event is not None:
                    answer.events.append(chunk.event)
                answer.content += chunk.text
                if await stream.write(chunk.text):
                    if scroll.max_scroll_y - scroll.scroll_y < 3:
                        scroll.scroll_end(animate=False)
                    answer.stats = stats.summary()
                    status.show_stats(answer.stats)
        except asyncio.CancelledError:
            ending = "\n\n*(stopped)*"
            raise
        except EngineError as e:
            ending = f"\n\n*(error: {e})*"
            self.notify(str(e), title="The answer failed", severity="error", timeout=10, markup=False)
        finally:
            await stream.stop()
            self.generating = False
            if ending:
                answer.query_one(Markdown).update(answer.content + ending)
            answer.stats = stats.summary() if stats.events or stats.chunks else None
            status.show_stats(answer.stats)
            answer.show(answer.view)
            if answer.content:
                self.conversation.messages.append(answer.to_message())
                self.save()

    def action_cancel(self) -> None:
        if self.generating:
            self.workers.cancel_group(self, "answer")

    def save(self) -> None:
        try:
            self.app.history.save(self.conversation)
        except (OSError, HistoryError) as e:
            self.notify(f"Could not save the conversation: {e}", severity="error", timeout=10, markup=False)

    def action_origins(self) -> None:
        views = Answer.VIEWS
        self.view = views[(views.index(self.view) + 1) % len(views)]
        for answer in self.query(Answer):
            answer.show(self.view)
        labels = {"markdown": "formatted text", "origins": "token origins: green = accepted drafts",
                  "origins+rejected": "token origins with rejected drafts struck through"}
        if not self.app.connection.ours:
            self.notify("This server does not report token origins.", severity="warning")
        else:
            self.notify(f"Showing {labels[self.view]}.")

    def action_copy(self) -> None:
        focused = self.focused if isinstance(self.focused, Answer) else None
        answers = [a for a in self.query(Answer) if a.role == "assistant" and a.content]
        target = focused or (answers[-1] if answers else None)
        if target is None:
            self.notify("Nothing to copy yet.", severity="warning")
            return
        self.app.copy_to_clipboard(target.content)
        self.notify(f"Copied {len(target.content)} characters.")

    def action_settings(self) -> None:
        def apply(settings: dict | None) -> None:
            if settings is not None:
                self.conversation.settings = settings
                self.save()
                self.notify("Settings saved for this conversation.")

        self.app.push_screen(SettingsScreen(self.conversation.settings), apply)

    def action_history(self) -> None:
        self.app.push_screen(HistoryScreen(), self.app.open_conversation)

    def action_new(self) -> None:
        if self.generating:
            self.action_cancel()
        self.app.open_conversation(Conversation.new(self.app.connection.model, dict(self.conversation.settings)))

    def action_compare(self) -> None:
        prompt = self.query_one(ChatInput).text.strip()
        if not prompt:
            last = next((m["content"] for m in reversed(self.conversation.messages) if m["role"] == "user"), None)
            if last is None:
                self.notify("Type a prompt first: compare runs it with speculation on and off.", severity="warning")
                return
            prompt, history = last, self.messages()[: max(i for i, m in enumerate(self.conversation.messages) if m["role"] == "user")]
        else:
            history = self.messages()
        if not self.app.connection.ours:
            self.notify("Compare needs dspark-chat's engine (it switches speculation off per request).", severity="error")
            return
        self.app.push_screen(CompareScreen(history + [{"role": "user", "content": prompt}], self.conversation.settings))

    def action_restart(self) -> None:
        self.app.restart_engine()


# ---------------------------------------------------------------- compare


class Pane(Vertical):
    def __init__(self, title: str, id: str):
        super().__init__(id=id, classes="pane")
        self.title = title

    def compose(self) -> ComposeResult:
        yield Label(self.title, classes="pane-title")
        with VerticalScroll():
            yield Markdown("", classes="body")
        yield Static("waiting…", classes="turn-stats")


class CompareScreen(Screen):
    """The same messages, settings and seed, speculation on (left) then off (right), one after the
    other on the same engine so neither slows the other."""

    BINDINGS = [Binding("escape", "close", "Back to chat")]

    def __init__(self, messages: list[dict], settings: dict):
        super().__init__()
        self.messages = messages
        # One seed for both runs: under sampling the two answers are then the same draw of the target's distribution.
        self.settings = dict(settings) | {"seed": settings.get("seed") if settings.get("seed") is not None else 0}
        self.results: dict[str, TurnStats] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(Text(f"Prompt: {self.messages[-1]['content']}"), id="compare-prompt")
        with Horizontal(id="panes"):
            yield Pane("speculation on", id="on")
            yield Pane("speculation off", id="off")
        yield Static("running speculation on first, then off…", id="verdict")
        yield Footer()

    def on_mount(self) -> None:
        self.run_both()

    @work(exclusive=True)
    async def run_both(self) -> None:
        chat: ChatScreen = next(s for s in self.app.screen_stack if isinstance(s, ChatScreen))
        try:
            on_stats = await self.run_one("on", chat.request_body(self.settings, speculative=True))
            compare_with = on_stats.token_ids() if self.settings["temperature"] == 0 else None
            off_stats = await self.run_one("off", chat.request_body(self.settings, speculative=False, compare_with=compare_with))
        except EngineError as e:
            self.query_one("#verdict", Static).update(Text(f"The comparison failed: {e}", style="red"))
            return
        self.query_one("#verdict", Static).update(verdict(on_stats, off_stats, self.settings["temperature"]))

    async def run_one(self, side: str, body: dict) -> TurnStats:
        pane = self.query_one(f"#{side}", Pane)
        stream = PacedStream(pane.query_one(Markdown))
        stats = TurnStats()
        c = self.app.connection
        try:
            async for chunk in c.client.chat(c.model, self.messages, body):
                stats.add(chunk)
                if await stream.write(chunk.text):
                    pane.query_one(".turn-stats", Static).update(format_stats(stats.summary()))
        finally:
            await stream.stop()
            if stats.events or stats.chunks:
                pane.query_one(".turn-stats", Static).update(format_stats(stats.summary()))
        self.results[side] = stats
        return stats

    def action_close(self) -> None:
        self.workers.cancel_all()
        self.dismiss()


def verdict(on: TurnStats, off: TurnStats, temperature: float) -> Text:
    a, b = on.summary(), off.summary()
    speed = a["decode_tokens_per_s"] / b["decode_tokens_per_s"] if b["decode_tokens_per_s"] else 0.0
    text = Text()
    text.append(f"speedup {speed:.2f}x", style="bold green" if speed > 1 else "bold yellow")
    text.append(f" ({a['decode_tokens_per_s']:.1f} vs {b['decode_tokens_per_s']:.1f} tok/s), tau {a.get('tau', 0):.2f}, "
                f"acceptance {100 * a.get('acceptance_rate', 0):.0f}%. ")
    if temperature:
        text.append(f"Sampled at temperature {temperature} with one seed: the texts may differ, the distribution is the same.")
        return text
    comparison = (b.get("comparison") or {})
    if on.token_ids() == off.token_ids():
        text.append("Identical: the same tokens with and without speculation.", style="bold")
    elif comparison.get("divergence"):
        d = comparison["divergence"]
        style = "yellow" if d["near_tie"] else "bold red"
        text.append(f"Different: {d['verdict']}.", style=style)
    else:
        text.append("Different.", style="bold red")
    return text


# ---------------------------------------------------------------- settings and history


class SettingsScreen(ModalScreen):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, settings: dict):
        super().__init__()
        self.settings = dict(DEFAULT_SETTINGS) | settings

    def compose(self) -> ComposeResult:
        s = self.settings
        with VerticalScroll(id="dialog"):
            yield Label("Settings for this conversation", classes="dialog-title")
            for key, label, value in (("temperature", "temperature (0 = greedy)", s["temperature"]), ("top_p", "top-p", s["top_p"]),
                                      ("max_tokens", "max tokens", s["max_tokens"]),
                                      ("block_size", "block size (blank: drafter's)", s["block_size"]),
                                      ("seed", "seed (blank: random)", s["seed"])):
                with Horizontal(classes="setting"):
                    yield Label(label)
                    yield Input("" if value is None else str(value), id=key)
            with Horizontal(classes="setting"):
                yield Label("scheduler")
                yield Select([(m, m) for m in ("auto", "threshold", "off")], value=s["scheduler"], allow_blank=False, id="scheduler")
            with Horizontal(classes="setting"):
                yield Label("speculative decoding")
                yield Switch(value=s["speculative"], id="speculative")
            yield Static("", id="settings-error")
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def read(self) -> dict:
        def number(key, kind, low, high, optional=False):
            raw = self.query_one(f"#{key}", Input).value.strip()
            if optional and not raw:
                return None
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{key.replace('_', ' ')}: {raw!r} is not a{'n integer' if kind is int else ' number'}") from None
            if not low <= value <= high:
                raise ValueError(f"{key.replace('_', ' ')} must be between {low} and {high}")
            return value

        return {"temperature": number("temperature", float, 0, 2), "top_p": number("top_p", float, 0.01, 1),
                "max_tokens": number("max_tokens", int, 1, 1 << 20), "block_size": number("block_size", int, 0, 1024, True),
                "seed": number("seed", int, 0, 2**63 - 1, True), "scheduler": self.query_one(Select).value,
                "speculative": self.query_one(Switch).value}

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def save(self) -> None:
        try:
            self.dismiss(self.read())
        except ValueError as e:
            error = self.query_one("#settings-error", Static)
            error.update(Text(str(e)))
            error.display = True

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class HistoryScreen(ModalScreen):
    """Saved conversations: Enter resumes, d deletes (after y), e exports as Markdown."""

    BINDINGS = [Binding("escape", "close", "Close"), Binding("d", "delete", "Delete"), Binding("e", "export", "Export .md")]

    def __init__(self):
        super().__init__()
        self.conversations: list[Conversation] = []
        self.pending_delete: str | None = None

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Saved conversations", classes="dialog-title")
            yield OptionList(id="conversations")
            yield Static("", id="history-note")

    def on_mount(self) -> None:
        self.refresh_list()

    def refresh_list(self) -> None:
        try:
            self.conversations, problems = self.app.history.list()
        except HistoryError as e:
            self.conversations, problems = [], [str(e)]
        options = self.query_one(OptionList)
        options.clear_options()
        for conv in self.conversations:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(conv.updated))
            options.add_option(Option(f"{conv.title}  ·  {conv.model}  ·  {len(conv.messages)} messages  ·  {when}", id=conv.id))
        if self.conversations:
            options.highlighted = 0
        options.focus()
        note = "Enter opens, d deletes, e exports as Markdown." if self.conversations else "No saved conversations yet."
        if problems:
            note += "\nUnreadable files (left untouched): " + "; ".join(problems)
        self.query_one("#history-note", Static).update(Text(note))

    def selected(self) -> Conversation | None:
        index = self.query_one(OptionList).highlighted
        return self.conversations[index] if index is not None and index < len(self.conversations) else None

    @on(OptionList.OptionSelected)
    def open(self) -> None:
        conv = self.selected()
        if conv is not None:
            self.dismiss(conv)

    def action_delete(self) -> None:
        conv = self.selected()
        if conv is None:
            return
        if self.pending_delete != conv.id:
            self.pending_delete = conv.id
            self.query_one("#history-note", Static).update(Text(f"Press d again to delete “{conv.title}”.", style="bold red"))
            return
        self.pending_delete = None
        try:
            self.app.history.delete(conv.id)
        except HistoryError as e:
            self.notify(str(e), severity="error", markup=False)
        self.refresh_list()

    def action_export(self) -> None:
        conv = self.selected()
        if conv is not None:
            self.app.export(conv)

    def action_close(self) -> None:
        self.dismiss(None)


# ---------------------------------------------------------------- the app


class DSparkChat(App):
    TITLE = "dspark-chat"
    CSS = """
    #intro, #explanation { padding: 0 1; }
    #explanation { height: auto; max-height: 12; color: $text-muted; }
    #pairs { height: 1fr; }
    #start { padding: 1 2; }
    #start > Static { margin-bottom: 1; }
    #error { color: $error; }
    #messages { height: 1fr; padding: 0 1; }
    .message { height: auto; margin-bottom: 1; }
    .message:focus { background: $boost; }
    .message.user .role { color: $accent; text-style: bold; }
    .message.assistant .role { color: $success; text-style: bold; }
    .message .body { margin: 0; padding: 0; }
    .turn-stats { color: $text-muted; height: auto; }
    #status { height: auto; min-height: 1; padding: 0 1; background: $panel; }
    #prompt { height: 5; }
    #panes { height: 1fr; }
    .pane { width: 1fr; border: round $primary; height: 1fr; }
    .pane-title { text-style: bold; }
    #compare-prompt, #verdict { height: auto; padding: 0 1; }
    #verdict { background: $panel; min-height: 2; }
    #dialog { width: 70; height: auto; max-height: 90%; border: thick $primary; background: $surface; padding: 0 1; }
    #settings-error { display: none; color: $error; }
    SettingsScreen, HistoryScreen { align: center middle; }
    .dialog-title { text-style: bold; }
    .setting { height: 3; }
    .setting Label { width: 30; padding: 1 1 0 0; }
    .setting Input, .setting Select { width: 1fr; }
    .buttons { height: auto; }
    #conversations { height: auto; max-height: 20; }
    """

    def __init__(self, pair: str | None = None, engine_url: str | None = None, api_key: str | None = None,
                 history: History | None = None, engine_args: tuple[str, ...] = (), catalog_rows: list[dict] | None = None):
        super().__init__()
        self.pair, self.engine_url, self.api_key = pair, engine_url, api_key
        self.history = history or History()
        self.engine_args, self.catalog_rows = engine_args, catalog_rows
        self.connection: Connection | None = None
        self.engine_down = False

    def on_mount(self) -> None:
        if self.engine_url:
            self.push_screen(StartScreen(url=self.engine_url, api_key=self.api_key), self.connected)
        elif self.pair:
            self.start_pair(self.pair)
        else:
            self.push_screen(PickerScreen(self.catalog_rows))

    def start_pair(self, pair: str) -> None:
        self.push_screen(StartScreen(pair), self.connected)

    async def connected(self, connection: Connection | None) -> None:
        if connection is None:  # back from a failed or abandoned start
            if not isinstance(self.screen, (PickerScreen, ChatScreen)):
                self.push_screen(PickerScreen(self.catalog_rows))
            return
        old = self.connection
        self.connection, self.engine_down = connection, False
        if old is not None and old.client is not connection.client:
            await old.client.close()
        chat = next((s for s in self.screen_stack if isinstance(s, ChatScreen)), None)
        if chat is not None:  # a restart: back to the same conversation
            chat.show_connection()
            return
        chat = ChatScreen(Conversation.new(connection.model, dict(DEFAULT_SETTINGS)))
        await (self.switch_screen(chat) if isinstance(self.screen, PickerScreen) else self.push_screen(chat))

    def open_conversation(self, conv: Conversation | None) -> None:
        if conv is not None:
            self.switch_screen(ChatScreen(conv))

    def restart_engine(self) -> None:
        c = self.connection
        if c is None or c.process is None:
            self.notify("This app did not start the engine, so it cannot restart it.", severity="warning")
            return
        if c.process.returncode is None:
            self.notify("The engine is running.")
            return
        self.push_screen(StartScreen(c.pair), self.connected)

    def export(self, conv: Conversation) -> None:
        folder = Path(platformdirs.user_documents_dir()) / "dspark-chat"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            path = self.history.export_markdown(conv, folder / f"{conv.id}.md", overwrite=True)
        except (OSError, HistoryError) as e:
            self.notify(f"Export failed: {e}", severity="error", markup=False)
            return
        self.notify(f"Exported to {path}", title="Exported", timeout=8, markup=False)

    def get_system_commands(self, screen: Screen):
        yield from super().get_system_commands(screen)
        if isinstance(screen, ChatScreen):
            for title, help, action in (
                ("Compare speculation on and off", "run the prompt twice, side by side", "compare"),
                ("Settings", "temperature, top-p, max tokens, block size, scheduler, speculation", "settings"),
                ("History", "saved conversations: open, delete, export", "history"),
                ("New conversation", "start an empty chat with the same engine", "new"),
                ("Token origins", "colour answers by accepted drafts and target tokens", "origins"),
                ("Copy answer", "copy the focused or last answer to the clipboard", "copy"),
                ("Export conversation", "write it as Markdown to the documents folder", "export"),
                ("Restart engine", "start the engine process again after it stopped", "restart"),
            ):
                yield SystemCommand(title, help, lambda a=action: screen.run_action(a) if a != "export" else self.export(screen.conversation))

    async def on_unmount(self) -> None:
        if self.connection is not None:
            if self.connection.process is not None:
                await self.connection.process.stop()
            await self.connection.client.close()


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="dspark-chat", description="Chat with a local model, faster, with speculative decoding.")
    parser.add_argument("--model", help="start this catalog pair at once instead of showing the picker")
    parser.add_argument("--engine-url", help="use an engine that is already running: ours or any OpenAI-compatible server")
    parser.add_argument("--api-key", help="API key for --engine-url")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="the engine's passes compiled (auto: on a GPU); the first start on a machine compiles for minutes")
    args = parser.parse_args(argv)
    if args.model and args.engine_url:
        parser.error("--model starts an engine and --engine-url uses a running one: give one of them")
    DSparkChat(pair=args.model, engine_url=args.engine_url, api_key=args.api_key, engine_args=("--compile", args.compile)).run()
    return 0
