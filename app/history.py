"""Saved conversations: one JSON file each, written atomically so a crash or a full disk never leaves a
half-written file where a good one was. Files that cannot be read are reported, never deleted or rewritten:
they may come from a newer dspark-chat or hold the only copy of a conversation worth repairing by hand."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import platformdirs

VERSION = 1
DEFAULT_TITLE = "New conversation"
TITLE_LENGTH = 60
# Conservative on purpose: an id becomes a file name, so it must not be able to name anything outside the
# root, a hidden file (our temp files start with a dot) or a different file on a case-insensitive disk.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_FIELDS = {"id": str, "title": str, "model": str, "settings": dict, "messages": list,
           "created": (int, float), "updated": (int, float)}


class HistoryError(Exception):
    """Something went wrong with a saved conversation; the message names the file and what to do."""


@dataclass
class Conversation:
    id: str
    title: str
    model: str
    settings: dict
    messages: list[dict]
    created: float
    updated: float

    @classmethod
    def new(cls, model: str, settings: dict) -> Conversation:
        now = time.time()
        # UTC time first so ids sort by creation; the random suffix (32 bits) separates conversations started in the same second.
        conv_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(4)
        return cls(conv_id, DEFAULT_TITLE, model, dict(settings), [], now, now)


def default_title(messages: list[dict]) -> str:
    """The first line of the first non-blank user message, cut to 60 characters."""
    for message in messages:
        text = message.get("content", "")
        if message.get("role") == "user" and isinstance(text, str) and text.strip():
            return text.strip().splitlines()[0].strip()[:TITLE_LENGTH].rstrip()
    return DEFAULT_TITLE


class History:
    def __init__(self, root: Path | None = None):
        # Resolved here rather than at import so XDG_DATA_HOME set by the caller (or a test) is honoured.
        self.root = Path(root) if root is not None else Path(platformdirs.user_data_dir("dspark-chat")) / "conversations"

    def path(self, conv_id: str) -> Path:
        if not isinstance(conv_id, str) or not _ID.fullmatch(conv_id) or ".." in conv_id:
            raise HistoryError(
                f"{conv_id!r} is not a valid conversation id (letters, digits, '-', '_' and '.' only, no '..'); "
                f"nothing under {self.root} was touched. Pick a conversation from the saved list."
            )
        return self.root / f"{conv_id}.json"

    def save(self, conv: Conversation) -> Path:
        path = self.path(conv.id)
        title = default_title(conv.messages) if conv.title == DEFAULT_TITLE else conv.title
        saved = replace(conv, title=title, updated=time.time())
        try:
            data = json.dumps({"version": VERSION, **asdict(saved)}, ensure_ascii=False, indent=1).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise HistoryError(f"Conversation {conv.id} cannot be stored as JSON ({e}); {path} was not changed.") from e
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, data)
        except OSError as e:
            raise HistoryError(
                f"Could not save {path} ({e}); the previous version, if any, is intact. "
                "Check free space and permissions, then save again."
            ) from e
        # Only after the file is safely on disk, so a failed save leaves the caller's object as it was.
        conv.title, conv.updated = saved.title, saved.updated
        return path

    def load(self, conv_id: str) -> Conversation:
        return self._read(self.path(conv_id))

    def list(self) -> tuple[list[Conversation], list[str]]:
        """(conversations, newest updated first; one message per file that could not be read)."""
        try:
            paths = sorted(p for p in self.root.iterdir() if p.suffix == ".json" and not p.name.startswith("."))
        except FileNotFoundError:
            return [], []
        except OSError as e:
            raise HistoryError(f"Cannot list saved conversations in {self.root} ({e}); check its permissions.") from e
        conversations, problems = [], []
        for path in paths:
            try:
                self.path(path.stem)  # a name load() would refuse cannot be opened from the list either
                conversations.append(self._read(path))
            except HistoryError as e:
                problems.append(str(e) if path.name in str(e) else f"{path.name}: {e}")
        conversations.sort(key=lambda c: (c.updated, c.id), reverse=True)
        return conversations, problems

    def delete(self, conv_id: str) -> None:
        path = self.path(conv_id)
        try:
            path.unlink()
        except FileNotFoundError as e:
            raise HistoryError(f"No saved conversation {conv_id} ({path} does not exist); it may already be deleted.") from e
        except OSError as e:
            raise HistoryError(f"Could not delete {path} ({e}); check its permissions.") from e

    def export_markdown(self, conv: Conversation, path: Path | None = None, overwrite: bool = False) -> Path | str:
        text = to_markdown(conv)
        if path is None:
            return text
        path = Path(path)
        # Check-then-replace leaves a tiny window for another program to create the file; acceptable for a
        # user-initiated export, and os.link (the race-free way) fails on filesystems such as exFAT.
        if path.exists() and not overwrite:
            raise HistoryError(f"{path} already exists; choose another file name or export with overwrite.")
        try:
            _write_atomic(path, text.encode("utf-8"))
        except OSError as e:
            raise HistoryError(f"Could not export to {path} ({e}); check that the folder exists and is writable.") from e
        return path

    def _read(self, path: Path) -> Conversation:
        try:
            raw = path.read_bytes()
        except FileNotFoundError as e:
            raise HistoryError(f"No saved conversation at {path}; it may have been deleted. Pick another one.") from e
        except OSError as e:
            raise HistoryError(f"Cannot read {path} ({e}); check its permissions. The file was left as it is.") from e
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise HistoryError(
                f"{path} is not valid JSON ({e}); it was left as it is. Repair it by hand or move it out of {path.parent}."
            ) from e
        if not isinstance(data, dict):
            raise HistoryError(f"{path} does not hold a conversation (not a JSON object); it was left as it is.")
        if data.get("version") != VERSION:
            raise HistoryError(
                f"{path} has format version {data.get('version')!r}, this dspark-chat reads version {VERSION}; "
                "open it with the dspark-chat that wrote it. The file was left as it is."
            )
        problem = _shape_problem(data, path.stem)
        if problem:
            raise HistoryError(f"{path} is not a valid conversation ({problem}); it was left as it is. Repair it by hand.")
        return Conversation(**{name: data[name] for name in _FIELDS})


def _shape_problem(data: dict, stem: str) -> str | None:
    for name, kind in _FIELDS.items():
        if not isinstance(data.get(name), kind):
            return f"field {name!r} missing or of the wrong type"
    # Saving writes <id>.json, so a mismatch would make the next save fork the conversation into another file.
    if data["id"] != stem:
        return f"its id {data['id']!r} does not match the file name"
    for i, message in enumerate(data["messages"]):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            return f"message {i} needs a string 'role' and 'content'"
    return None


def to_markdown(conv: Conversation) -> str:
    header = f"Model: {conv.model} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(conv.created))}"
    if conv.settings:
        header += " · " + ", ".join(f"{key}={value}" for key, value in conv.settings.items())
    parts = [f"# {conv.title}", header]
    for message in conv.messages:
        parts += [f"## {message['role'].capitalize()}", message["content"]]
        stats = message.get("stats")
        if message["role"] == "assistant" and isinstance(stats, dict) and (line := _stats_line(stats)):
            parts.append(line)
    return "\n\n".join(parts) + "\n"


def _stats_line(stats: dict) -> str:
    def number(key):
        value = stats.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    formats = [("tokens", "{} tokens"), ("decode_tokens_per_s", "{:.1f} tok/s"), ("tau", "tau {:.2f}")]
    parts = [text.format(number(key)) for key, text in formats if number(key) is not None]
    if number("acceptance_rate") is not None:
        parts.append(f"acceptance {100 * number('acceptance_rate'):.0f}%")
    return f"_{', '.join(parts)}_" if parts else ""


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a mix: the data goes to a temp file in the same
    directory (same filesystem, so the rename is atomic), reaches the disk, then replaces the target."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself lives in the directory; without this a power cut can still bring back the old file.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some filesystems and platforms cannot fsync a directory
    finally:
        os.close(dir_fd)
