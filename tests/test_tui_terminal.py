"""The app in a real terminal: `dspark-chat` (the installed console script) inside a detached tmux session,
driven by keystrokes and read back from the screen and the saved conversation: with the real engine answering on
the embedded SmolLM2, and with the tiny pair for prompts sent in one burst with their Enter.

The saved conversations (XDG_DATA_HOME) and the engine log (XDG_STATE_HOME) go to a temporary folder; the cache
is the suite's own (conftest's own_cache_dir), so the SmolLM2 weights converted from GGUF once per run are reused.
Every wait is bounded and generous (the machine may be busy); nothing asserts a speed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .test_tui import tiny_hub  # noqa: F401 (a fixture: the tiny pair in an offline Hub cache)

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

DSPARK_CHAT = Path(sys.executable).with_name("dspark-chat")  # the console script beside this interpreter
WIDTH, HEIGHT = 110, 40
PROMPT = "Write a Python function that reverses a string."
CATALOG_S = 180  # `dspark-chat models --json` in a child process: about 10 s when the machine is idle
ENGINE_S = 600  # SmolLM2 loads in well under a minute idle; minutes when benchmarks hold both cores
ANSWER_S = 600  # at most 512 tokens, greedy
QUIT_S = 60


class Terminal:
    """One tmux server of our own (its socket in a folder of ours, so no other tmux session is touched and nothing
    is left behind), one window."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="dspark-chat-tmux-"))  # short: a socket path has a length limit
        self.socket = self.folder / "socket"

    def tmux(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, timeout=30)
        if check and done.returncode:
            raise RuntimeError(f"tmux {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def start(self, command: str, env: dict[str, str]) -> None:
        # A shell around the app keeps the window open after the app ends, with its exit code on the screen.
        script = f"{command}; echo \"[dspark-chat exited with $?]\"; sleep 3600"
        self.tmux("new-session", "-d", "-s", "chat", "-x", str(WIDTH), "-y", str(HEIGHT),
                  *(arg for key, value in env.items() for arg in ("-e", f"{key}={value}")), "sh", "-c", script)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "chat", check=False)

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", "chat", *(["-l"] if literal else []), *keys)

    def paste_then_enter(self, text: str) -> None:
        """A bracketed paste (-p: the app asked for bracketed paste mode) and Enter, in one tmux command, so that
        they reach the app in one burst."""
        self.tmux("set-buffer", "-b", "prompt", text)
        self.tmux("paste-buffer", "-p", "-d", "-b", "prompt", "-t", "chat", ";", "send-keys", "-t", "chat", "Enter")

    def shell_pid(self) -> int:
        return int(self.tmux("display-message", "-p", "-t", "chat", "#{pane_pid}").strip())

    def wait_for(self, condition, seconds: float, what: str, log: Path | None = None) -> str:
        deadline = time.monotonic() + seconds
        while True:
            screen = self.screen()
            if condition(screen):
                return screen
            if "[dspark-chat exited" in screen or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else "(no engine log)"
                pytest.fail(f"waiting for {what}: {'the app exited' if '[dspark-chat exited' in screen else f'not within {seconds} s'}."
                            f"\n--- screen ---\n{screen}\n--- engine log (tail) ---\n{tail}")
            time.sleep(1)

    def kill(self) -> None:
        self.tmux("kill-server", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


KINDS = ("dspark+lookup", "dspark", "dflash", "eagle3", "prompt-lookup", "none")


def pair_rows(screen: str) -> list[str]:
    """The pair column of the picker's table rows (those with a download size or "built in"): the word before
    the kind (a target's first row starts with the target, its other rows with the pair)."""
    rows = []
    for line in screen.splitlines():
        words = line.split()
        kind = next((i for i, w in enumerate(words) if w in KINDS), None)
        if kind and ("built in" in line or " GB " in line):
            rows.append(words[kind - 1])
    return rows


def stats_lines(screen: str) -> list[str]:
    return [line for line in screen.splitlines() if "tok/s" in line and "tau" in line and "first token" in line]


@pytest.mark.slow
def test_chat_in_a_real_terminal(tmp_path):
    """Picker -> Enter on the embedded pair (listed first) -> the engine starts -> a prompt typed and sent -> the
    streamed answer ends with its stats line; it is saved, and quitting the app stops the engine it started."""
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_STATE_HOME": str(tmp_path / "state"), "TERM": "xterm-256color",
           "COLUMNS": str(WIDTH), "LINES": str(HEIGHT)}
    log = tmp_path / "state" / "dspark-chat" / "log" / "engine.log"
    terminal = Terminal()
    shell: psutil.Process | None = None
    ours: list[psutil.Process] = []  # the app and the engine it started
    try:
        terminal.start(str(DSPARK_CHAT), env)
        shell = psutil.Process(terminal.shell_pid())
        # The rows and the explanation of the highlighted one; the first frame with rows may still have the columns
        # as wide as their titles ("smol"), so wait for the full name.
        screen = terminal.wait_for(lambda s: "smollm2: SmolLM2-135M-Instruct" in s and "smollm2" in pair_rows(s), CATALOG_S,
                                   "the catalog in the picker")
        assert pair_rows(screen)[0] == "smollm2", screen  # the embedded pair comes first (and is highlighted)

        terminal.keys("Enter")
        terminal.wait_for(lambda s: "Enter sends" in s, ENGINE_S, "the chat screen (engine ready)", log)
        ours = shell.children(recursive=True)
        assert any("serve" in p.cmdline() for p in ours), [p.cmdline() for p in ours]

        terminal.keys(PROMPT, "Enter")  # in one burst, as a quick typist or a paste and Enter send them
        # While the answer streams only the status bar shows a stats line; the answer's own appears when it ends.
        screen = terminal.wait_for(lambda s: len(stats_lines(s)) >= 2, ANSWER_S, "the end of the answer", log)

        print(screen)  # shown with -s, or when a check below fails
        assert "def" in screen, screen  # greedy SmolLM2 answers with a Python function
        saved = list((tmp_path / "data" / "dspark-chat" / "conversations").glob("*.json"))
        assert len(saved) == 1, saved
        conversation = json.loads(saved[0].read_text(encoding="utf-8"))
        assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
        assert conversation["messages"][0]["content"] == PROMPT
        answer = conversation["messages"][1]
        assert answer["content"].strip() and "def" in answer["content"], answer["content"]
        assert answer["stats"]["tokens"] > 0 and answer["events"], answer["stats"]

        terminal.keys("C-q")
        terminal.wait_for(lambda s: "[dspark-chat exited with 0]" in s, QUIT_S, "the app to quit", log)
        _, alive = psutil.wait_procs(ours, timeout=QUIT_S)
        assert not alive, f"still running after the app quit: {[p.cmdline() for p in alive]}"
    finally:
        # Whatever is left of what this test started (by pid: the app under the shell and its engine) is ended;
        # closing the tmux server alone would leave an engine whose app died without stopping it.
        if shell is not None:
            try:
                ours += shell.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        terminal.kill()
        for process in ours:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


# Typed (sent with their Enter in one write, as `tmux send-keys TEXT Enter` does) and pasted, of several lengths;
# the longest wraps in the input. None is a tmux key name, so send-keys sends each as text.
BURSTS = [
    ("typed", "Hi there!"),
    ("typed", "Write a Python function that checks whether a number is prime, with a docstring."),
    ("typed", "Explain, step by step and with an example for each, how speculative decoding drafts tokens with a small "
              "model, verifies them with the large one in a single pass, and why the output stays exactly the same."),
    ("pasted", "Fix this function:\ndef add(a, b):\n    return a - b\n\nand explain the bug."),
]


def engine_url(shell: psutil.Process) -> str:
    """The address of the engine the app started: its process's listening socket."""
    engine = next(p for p in shell.children(recursive=True) if "serve" in p.cmdline())
    port = next(c.laddr.port for c in engine.net_connections("inet") if c.status == psutil.CONN_LISTEN)
    return f"http://127.0.0.1:{port}"


def test_prompts_sent_in_one_burst_with_their_enter_arrive_whole(tiny_hub, own_cache_dir):
    """Each prompt and its Enter reach the app at once (typed, or a bracketed paste of several lines): the saved
    question is exactly the prompt, and the saved answer is the engine's own greedy answer to it. Each prompt
    starts a new conversation (ctrl+n), since the tiny model's answers run to 512 tokens and its context holds 1024."""
    env = {key: os.environ[key] for key in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "OMP_NUM_THREADS")}
    env |= {"XDG_STATE_HOME": str(tiny_hub / "state"), "XDG_CACHE_HOME": str(own_cache_dir), "TERM": "xterm-256color"}
    log = tiny_hub / "state" / "dspark-chat" / "log" / "engine.log"
    conversations = tiny_hub / "data" / "dspark-chat" / "conversations"
    terminal = Terminal()
    ours: list[psutil.Process] = []
    try:
        terminal.start(f"{DSPARK_CHAT} --model tiny-dspark", env)
        shell = psutil.Process(terminal.shell_pid())
        terminal.wait_for(lambda s: "Enter sends" in s, ENGINE_S, "the chat screen (engine ready)", log)
        ours = shell.children(recursive=True)
        url = engine_url(shell)
        for number, (how, prompt) in enumerate(BURSTS, 1):
            if number > 1:
                terminal.keys("C-n")
                terminal.wait_for(lambda s: "Assistant" not in s, QUIT_S, "a new conversation", log)
            if how == "typed":
                terminal.keys(prompt, "Enter")
            else:
                terminal.paste_then_enter(prompt)
            # The question is saved when sent, the answer when it ends; each conversation in a file of its own.
            terminal.wait_for(lambda _: len(saved(conversations)) == number and len(saved(conversations)[-1]) == 2, ANSWER_S,
                              f"the answer to prompt {number} ({how}, {len(prompt)} characters)", log)
            question, answer = saved(conversations)[-1]
            assert question == {"role": "user", "content": prompt}, (how, terminal.screen())
            expected = httpx.post(f"{url}/v1/chat/completions", timeout=ANSWER_S, json={
                "model": "tiny-dspark", "messages": [question], "max_tokens": 512, "temperature": 0, "speculative": False}).json()
            assert answer["content"] == expected["choices"][0]["message"]["content"], (how, prompt)
            assert "Enter sends" in terminal.screen()  # the input is empty again, showing its placeholder
    finally:
        ours += _children(terminal)
        terminal.kill()
        for process in ours:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def saved(folder: Path) -> list[list[dict]]:
    """The saved conversations' messages (role and content), oldest conversation first."""
    files = sorted(folder.glob("*.json"), key=lambda f: f.stat().st_ctime) if folder.is_dir() else []
    return [[{"role": m["role"], "content": m["content"]} for m in json.loads(f.read_text(encoding="utf-8"))["messages"]]
            for f in files]


def _children(terminal: Terminal) -> list[psutil.Process]:
    try:
        return psutil.Process(terminal.shell_pid()).children(recursive=True)
    except (psutil.NoSuchProcess, RuntimeError, ValueError):
        return []
