"""The app's side of the engine: start our engine process, follow its start-up, stream answers from it
or from any OpenAI-compatible server, and keep live statistics. Imports no torch: the engine process
owns the model."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import httpx
import platformdirs

from dspark_chat.engine.stats import summarize

START_TIMEOUT_S = 120  # from spawning to the listening line: imports and binding, not model loading


class EngineError(Exception):
    """Something the user must know about the engine, said in words with what to do."""


def engine_log_path() -> Path:
    return Path(platformdirs.user_log_dir("dspark-chat")) / "engine.log"


class EngineProcess:
    """`dspark-chat serve --model NAME` as a child process on a free loopback port. Its log goes to a
    file (a pipe nobody reads would block it), whose tail explains a failed start."""

    def __init__(self, model: str, extra_args: tuple[str, ...] = (), log_path: Path | None = None):
        self.model, self.extra_args = model, tuple(extra_args)
        self.log_path = log_path or engine_log_path()
        self.proc: asyncio.subprocess.Process | None = None
        self.url: str | None = None

    async def start(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "dspark_chat.engine", "serve", "--model", self.model, "--port", "0", *self.extra_args,
                stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL,
                env=os.environ | {"PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.stop()
            raise EngineError(f"the engine did not start within {START_TIMEOUT_S} s; its log is {self.log_path}") from None
        try:
            self.url = json.loads(line)["url"]
        except (ValueError, KeyError):
            await self.proc.wait()
            raise EngineError(self.failure()) from None
        return self.url

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def failure(self) -> str:
        """Why the process ended, from the last lines of its log."""
        lines = [line for line in self.log_tail().splitlines() if line.strip()]
        errors = [line.split("error: ", 1)[1] for line in lines if "error: " in line]
        reason = errors[-1] if errors else (lines[-1] if lines else "no output")
        return f"the engine stopped (exit code {self.returncode}): {reason}\n(full log: {self.log_path})"

    def log_tail(self, size: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@dataclass
class Chunk:
    """One streamed piece of an answer: its text, and whatever the server reports beside it."""

    text: str
    event: dict | None = None  # our engine's round event (token ids, drafts, origins, timings)
    usage: dict | None = None
    timings: dict | None = None  # llama.cpp's server
    finish_reason: str | None = None


class EngineClient:
    def __init__(self, url: str, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        # No read timeout: a long answer may take minutes between connect and the last byte.
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=httpx.Timeout(30, read=None))

    async def close(self) -> None:
        await self.http.aclose()

    async def health(self) -> dict | None:
        """Our engine's /health (state, download progress); None from servers that have no such JSON."""
        try:
            r = await self.http.get("/health")
        except httpx.TransportError as e:
            raise EngineError(f"cannot reach the engine at {self.url}: {e}") from e
        try:
            body = r.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) and "status" in body else None

    async def model_id(self) -> str:
        try:
            r = await self.http.get("/v1/models")
        except httpx.TransportError as e:
            raise EngineError(f"cannot reach {self.url}: {e}; is the server running?") from e
        if r.status_code == 401:
            raise EngineError(f"{self.url} refused the API key: pass the right one with --api-key")
        try:
            return r.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EngineError(f"{self.url}/v1/models answered {r.status_code} without a model: is it an OpenAI-compatible server?") from None

    async def wait_ready(self, on_state: Callable[[dict], None], process: EngineProcess | None = None, poll_s: float = 0.2) -> dict:
        """Poll /health until the model is loaded; each state goes to on_state (downloading, loading, with the start-up phases so far)."""
        while True:
            if process is not None and process.returncode is not None:
                raise EngineError(process.failure())
            health = await self.health()
            if health is None:
                return {}
            on_state(health)
            if health["status"] == "ready":
                return health
            if health["status"] == "error":
                raise EngineError(health.get("message") or "the engine failed to load the model")
            await asyncio.sleep(poll_s)

    async def chat(self, model: str, messages: list[dict], body: dict) -> AsyncIterator[Chunk]:
        """Stream an answer. Cancelling the task that iterates closes the connection, which stops our
        engine within one round."""
        request = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}} | body
        try:
            async with self.http.stream("POST", "/v1/chat/completions", json=request) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise EngineError(_error_message(r))
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    payload = json.loads(data)
                    if "error" in payload:
                        raise EngineError(payload["error"].get("message") or str(payload["error"]))
                    choice = (payload.get("choices") or [{}])[0]
                    yield Chunk((choice.get("delta") or {}).get("content") or "", payload.get("dspark"), payload.get("usage"),
                                payload.get("timings"), choice.get("finish_reason"))
        except httpx.TransportError as e:
            raise EngineError(f"lost the connection to the engine at {self.url}: {e}") from e


def _error_message(r: httpx.Response) -> str:
    try:
        return f"the engine refused the request ({r.status_code}): {r.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"the engine answered {r.status_code}: {r.text[:300]}"


@dataclass
class TurnStats:
    """Live statistics of one answer. With our engine they come from its round events (the same
    numbers `generate` prints); from another server, from arrival times and whatever it reports."""

    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    chunks: int = 0
    events: list[dict] = field(default_factory=list)
    usage: dict | None = None
    timings: dict | None = None

    def add(self, chunk: Chunk) -> None:
        now = time.perf_counter()
        if chunk.event is not None:
            self.events.append(chunk.event)
        if chunk.text:
            self.chunks += 1
            self.first = self.first or now
            self.last = now
        self.usage = chunk.usage or self.usage
        self.timings = chunk.timings or self.timings

    def summary(self) -> dict:
        """tokens, decode_tokens_per_s, time_to_first_token_ms, and where reported: tau,
        acceptance_rate, acceptance_by_position, draft_ms, verify_ms; `source` says which."""
        if self.events:
            comparison = ((self.usage or {}).get("dspark") or {}).get("comparison")
            out = summarize(self.events) | {"source": "dspark"} | ({"comparison": comparison} if comparison else {})
            if self.last and self.last > self.first:  # what arrived here: the engine's rate plus transport and UI
                out["received_tokens_per_s"] = (out["tokens"] - len(self.events[0]["token_ids"])) / (self.last - self.first)
            return out
        usage = self.usage or {}
        tokens = usage.get("completion_tokens") or self.chunks
        out = {"tokens": tokens, "source": "timing",
               "time_to_first_token_ms": (self.first - self.started) * 1000 if self.first else 0.0,
               "decode_tokens_per_s": (tokens - 1) / (self.last - self.first) if self.first and self.last > self.first else 0.0}
        spec = usage.get("speculative_decoding")  # vLLM's per-request metrics
        if isinstance(spec, dict):
            drafted, accepted = spec.get("num_draft_tokens"), spec.get("num_accepted_tokens")
            if drafted:
                out |= {"acceptance_rate": accepted / drafted, "source": "vllm"}
            if spec.get("num_drafts"):
                out["tau"] = 1 + accepted / spec["num_drafts"]
        t = self.timings or {}
        if t.get("draft_n"):  # llama.cpp's server
            out |= {"acceptance_rate": t.get("draft_n_accepted", 0) / t["draft_n"], "source": "llama.cpp"}
        if t.get("predicted_per_second"):
            out["decode_tokens_per_s"] = t["predicted_per_second"]
        return out

    def token_ids(self) -> list[int]:
        return [t for e in self.events for t in e["token_ids"]]


def format_stats(stats: dict) -> str:
    """One status line; says plainly when the server does not report acceptance."""
    parts = [f"{stats.get('tokens', 0)} tokens", f"{stats.get('decode_tokens_per_s', 0):.1f} tok/s"]
    if "tau" in stats:
        parts.append(f"tau {stats['tau']:.2f}")
    if "acceptance_rate" in stats and (stats.get("source") != "dspark" or stats.get("verified")):
        parts.append(f"acceptance {100 * stats['acceptance_rate']:.0f}%")
    elif stats.get("source") == "timing":
        parts.append("acceptance not reported by this server")
    parts.append(f"first token {stats.get('time_to_first_token_ms', 0):.0f} ms")
    split = stats.get("draft_ms", 0) + stats.get("verify_ms", 0)
    if split:
        parts.append(f"draft {100 * stats['draft_ms'] / split:.0f}% / verify {100 * stats['verify_ms'] / split:.0f}%")
    return " · ".join(parts)


BARS = " ▁▂▃▄▅▆▇█"


def acceptance_chart(by_position: list[float | None]) -> str:
    """Per-position conditional acceptance as one bar character each: position 1 first."""
    return "".join("·" if p is None else BARS[min(len(BARS) - 1, round(p * (len(BARS) - 1)))] for p in by_position)
