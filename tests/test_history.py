"""Saved conversations against real files in tmp_path; the only fakes are the injected crashes."""

from __future__ import annotations

import calendar
import errno
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import platformdirs
import pytest

from dspark_chat.app import history
from dspark_chat.app.history import Conversation, History, HistoryError

REPO = Path(__file__).resolve().parent.parent
STATS = {"tokens": 64, "decode_tokens_per_s": 19.26, "tau": 1.857, "acceptance_rate": 0.38,
         "acceptance_by_position": [0.61, None], "finish_reason": "stop"}


def chat(model: str = "SmolLM2-360M + smollm2-dspark", first: str = "Héllo ✓ 日本語 — naïve 🙂\nsecond line") -> Conversation:
    conv = Conversation.new(model, {"temperature": 0.7, "top_p": 0.95, "speculative": True})
    conv.messages += [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": first},
        {"role": "assistant", "content": "Ça va 🙂", "stats": dict(STATS), "tokens": [1, 2, 3]},
    ]
    return conv


def files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_new_conversation_id_is_utc_time_and_random_suffix():
    a, b = Conversation.new("m", {}), Conversation.new("m", {})
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}", a.id)
    assert a.id[:15] == time.strftime("%Y%m%d-%H%M%S", time.gmtime(a.created))
    assert a.title == "New conversation" and a.messages == [] and a.created == a.updated
    assert a.id != b.id or a.created != b.created  # 1 in 65536 to collide within one second


def test_round_trip_ordering_and_delete(tmp_path):
    h = History(tmp_path)
    a, b = chat(), chat(first="Second chat")
    path = h.save(a)
    assert path == tmp_path / f"{a.id}.json"
    assert json.loads(path.read_text(encoding="utf-8"))["version"] == 1
    assert a.title == "Héllo ✓ 日本語 — naïve 🙂"
    h.save(b)
    assert b.updated > a.updated

    listed, problems = h.list()
    assert problems == []
    assert [c.id for c in listed] == [b.id, a.id]  # newest updated first
    assert listed[1] == a

    loaded = h.load(a.id)
    assert loaded == a
    assert loaded.messages[2]["stats"] == STATS and loaded.messages[2]["tokens"] == [1, 2, 3]

    a.messages.append({"role": "user", "content": "more"})
    h.save(a)
    assert [c.id for c in h.list()[0]] == [a.id, b.id]
    assert h.load(a.id) == a

    h.delete(a.id)
    assert [c.id for c in h.list()[0]] == [b.id]
    assert files(tmp_path) == [f"{b.id}.json"]
    with pytest.raises(HistoryError, match=re.escape(f"{a.id}.json")):
        h.load(a.id)
    with pytest.raises(HistoryError, match=a.id):
        h.delete(a.id)


def test_list_of_missing_root_is_empty_and_creates_nothing(tmp_path):
    assert History(tmp_path / "none").list() == ([], [])
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    "messages, title, expected",
    [
        ([{"role": "assistant", "content": "hi"}], "New conversation", "New conversation"),
        ([{"role": "user", "content": "\n  " + "x" * 80 + "\nmore"}], "New conversation", "x" * 60),
        ([{"role": "user", "content": "  "}, {"role": "user", "content": "real\nq"}], "New conversation", "real"),
        ([{"role": "user", "content": "ignored"}], "Renamed by the user", "Renamed by the user"),
    ],
)
def test_title_is_set_from_first_user_message_only_while_default(tmp_path, messages, title, expected):
    conv = Conversation.new("m", {})
    conv.messages, conv.title = messages, title
    History(tmp_path).save(conv)
    assert conv.title == expected
    assert History(tmp_path).load(conv.id).title == expected


@pytest.mark.parametrize(
    "target, error, raised",
    [("replace", OSError(errno.ENOSPC, "No space left on device"), HistoryError),
     ("fsync", OSError(errno.EIO, "Input/output error"), HistoryError),
     ("replace", RuntimeError("crash"), RuntimeError)],
)
def test_failed_save_leaves_previous_file_byte_identical(tmp_path, monkeypatch, target, error, raised):
    h = History(tmp_path)
    conv = chat()
    path = h.save(conv)
    before, updated = path.read_bytes(), conv.updated

    def crash(*args):
        raise error

    conv.messages.append({"role": "user", "content": "this must not reach the disk"})
    monkeypatch.setattr(history.os, target, crash)
    with pytest.raises(raised):
        h.save(conv)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert files(tmp_path) == [path.name]  # the temp file was removed
    assert conv.updated == updated
    assert len(h.load(conv.id).messages) == 3


def test_sigkill_during_saves_never_exposes_partial_json(tmp_path):
    # Big, varying sizes so a kill lands mid-write often and a torn file could not parse by luck.
    child = textwrap.dedent("""
        import sys
        from pathlib import Path
        from dspark_chat.app.history import Conversation, History
        h = History(Path(sys.argv[1]))
        conv = Conversation.new("m", {})
        for i in range(10**9):
            conv.messages = [{"role": "user", "content": "q " * 50_000},
                             {"role": "assistant", "content": str(i % 10) * (100_000 + 37_000 * (i % 7)), "stats": {"i": i}}]
            h.save(conv)
            if i == 0:
                print(conv.id, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conv_id = proc.stdout.readline().strip()
        assert conv_id, proc.stderr.read()
        h = History(tmp_path)
        seen = set()
        # Read for a second and at least 5 distinct saves (the writer may be starved by a busy machine).
        start = time.monotonic()
        while time.monotonic() < start + 1 or len(seen) < 5:  # a concurrent reader only ever sees a complete file
            assert time.monotonic() < start + 120, f"only {len(seen)} saves seen in two minutes"
            reply = h.load(conv_id).messages[1]
            i = reply["stats"]["i"]
            seen.add(i)
            assert reply["content"] == str(i % 10) * (100_000 + 37_000 * (i % 7))  # not a mix of two saves
        assert proc.poll() is None, "the writer stopped before it was killed"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    conversations, problems = h.list()
    assert problems == [] and [c.id for c in conversations] == [conv_id]
    for path in tmp_path.glob("*.json"):
        h.load(path.stem)
    assert all(name == f"{conv_id}.json" or name.endswith(".tmp") for name in files(tmp_path))


def test_list_ignores_leftover_temp_files(tmp_path):
    h = History(tmp_path)
    conv = chat()
    h.save(conv)
    leftover = tmp_path / f".{conv.id}.json.k3j2h1.tmp"
    leftover.write_text('{"version": 1, "id": "trunc')
    assert h.list() == ([conv], [])
    assert leftover.read_text() == '{"version": 1, "id": "trunc'


def test_bad_files_are_reported_and_left_untouched(tmp_path):
    h = History(tmp_path)
    good = chat()
    good_bytes = h.save(good).read_bytes()
    data = json.loads(good_bytes)

    truncated = tmp_path / "20260101-000000-aaaa.json"
    truncated.write_bytes(json.dumps({**data, "id": truncated.stem}).encode()[:150])
    future = tmp_path / "20260101-000000-bbbb.json"
    future.write_text(json.dumps({**data, "id": future.stem, "version": 2}))
    renamed = tmp_path / "20260101-000000-cccc.json"  # copied under another name: saving would fork it
    renamed.write_bytes(good_bytes)
    no_content = tmp_path / "20260101-000000-dddd.json"
    no_content.write_text(json.dumps({**data, "id": no_content.stem, "messages": [{"role": "user"}]}))
    bad = [truncated, future, renamed, no_content]
    before = {p: p.read_bytes() for p in bad}

    conversations, problems = h.list()
    assert conversations == [good]
    assert len(problems) == len(bad)
    for path, problem in zip(bad, problems):
        assert path.name in problem
    assert "not valid JSON" in problems[0] and "version 2" in problems[1]

    for path in bad:
        with pytest.raises(HistoryError, match=re.escape(path.name)):
            h.load(path.stem)
    assert {p: p.read_bytes() for p in bad} == before
    assert h.load(good.id) == good


def test_list_reports_a_json_file_whose_name_is_not_an_id(tmp_path):
    h = History(tmp_path)
    odd = tmp_path / "my notes.json"
    odd.write_text("{}")
    assert h.list()[0] == [] and len(h.list()[1]) == 1 and "my notes.json" in h.list()[1][0]
    assert odd.read_text() == "{}"


def exported() -> Conversation:
    created = calendar.timegm((2026, 11, 23, 22, 15, 30, 0, 0, 0))
    return Conversation(
        id="20261123-221530-3f9a", title="Hello world in Python", model="SmolLM2-360M + smollm2-dspark",
        settings={"temperature": 0.7, "max_tokens": 256, "speculative": True},
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write hello world in Python."},
            {"role": "assistant", "stats": STATS,
             "content": 'Here you go:\n\n```python\ndef main():\n    print("hello, world")\n\n\nmain()\n```'},
            {"role": "user", "content": "Thanks!", "stats": {"tokens": 9}},
            {"role": "assistant", "content": "You're welcome.", "stats": {"tokens": 5, "tau": None}},
            {"role": "assistant", "content": "No stats here.", "stats": {}},
        ],
        created=created, updated=created + 60,
    )


EXPECTED_MARKDOWN = '''\
# Hello world in Python

Model: SmolLM2-360M + smollm2-dspark · 2026-11-23 22:15 UTC · temperature=0.7, max_tokens=256, speculative=True

## System

You are a helpful assistant.

## User

Write hello world in Python.

## Assistant

Here you go:

```python
def main():
    print("hello, world")


main()
```

_64 tokens, 19.3 tok/s, tau 1.86, acceptance 38%_

## User

Thanks!

## Assistant

You're welcome.

_5 tokens_

## Assistant

No stats here.
'''


def test_export_markdown_text(tmp_path):
    assert History(tmp_path).export_markdown(exported()) == EXPECTED_MARKDOWN
    assert list(tmp_path.iterdir()) == []


def test_export_to_file_refuses_to_overwrite_unless_asked(tmp_path):
    h, conv = History(tmp_path / "conversations"), exported()
    out = tmp_path / "chat.md"
    assert h.export_markdown(conv, out) == out
    assert out.read_text(encoding="utf-8") == EXPECTED_MARKDOWN

    conv.title = "Renamed"
    with pytest.raises(HistoryError, match="chat.md"):
        h.export_markdown(conv, out)
    assert out.read_text(encoding="utf-8") == EXPECTED_MARKDOWN

    assert h.export_markdown(conv, out, overwrite=True) == out
    assert out.read_text(encoding="utf-8").startswith("# Renamed\n\nModel: ")
    assert files(tmp_path) == ["chat.md"]  # no temp file left beside it

    with pytest.raises(HistoryError, match="missing"):
        h.export_markdown(conv, tmp_path / "missing" / "chat.md")


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "", ".hidden", "a\\b", "/etc/passwd", "a..b", "x\x00"])
def test_bad_ids_are_refused_and_nothing_outside_root_is_touched(tmp_path, bad):
    outside = tmp_path / "x.json"
    h = History(tmp_path / "root")
    conv = chat()
    h.save(conv)
    outside.write_bytes((h.root / f"{conv.id}.json").read_bytes())

    with pytest.raises(HistoryError, match="not a valid conversation id"):
        h.load(bad)
    with pytest.raises(HistoryError, match="not a valid conversation id"):
        h.delete(bad)
    conv.id = bad
    with pytest.raises(HistoryError, match="not a valid conversation id"):
        h.save(conv)
    assert outside.exists()
    assert files(tmp_path) == ["root", "x.json"]
    assert len(files(h.root)) == 1


def test_default_root_is_under_user_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    h = History()
    assert h.root == Path(platformdirs.user_data_dir("dspark-chat")) / "conversations"
    if sys.platform.startswith("linux"):
        assert h.root == tmp_path / "xdg" / "dspark-chat" / "conversations"
        assert not h.root.exists()  # constructing a History writes nothing
        conv = chat()
        assert h.save(conv) == tmp_path / "xdg" / "dspark-chat" / "conversations" / f"{conv.id}.json"


def test_module_does_not_import_torch():
    code = "import sys, dspark_chat.app.history; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
