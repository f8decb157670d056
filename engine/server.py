"""The engine process: OpenAI-compatible HTTP over one loaded model pair, streaming each decoding
round's Step event beside the text.

One worker thread owns the engine (it is not thread-safe) and takes requests from a FIFO queue; the
asyncio side only validates, waits and writes. A request that is cancelled or whose client goes away
sets a flag that the worker reads after every round, so it stops within one round. The model loads
in a background thread once the socket listens, so /health can report progress from the start.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Literal

import jinja2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .decode import ContextLengthError, Step, TextStream
from .divergence import explain_divergence
from . import STARTED
from .loading import LoadError
from .sampling import Sampling
from .scheduler import Interrupted
from .stats import summarize

log = logging.getLogger("dspark_chat.server")

MAX_BODY_BYTES = 4 << 20
MAX_STOP_LENGTH = 256
POLL_S = 0.25  # how often a waiting request checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self, headers: dict | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, self.status, headers=headers)


# ---- request shapes (unknown OpenAI fields are ignored so standard clients work unchanged) ----


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # Chat templates know "system"; OpenAI's newer name for it is "developer".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class DSparkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_size: int | None = Field(None, ge=0, le=1024, description="draft at most this many tokens a round")
    scheduler: Literal["off", "threshold", "auto"] | None = Field(None, description="how many drafts the target verifies")
    threshold: float | None = Field(None, ge=0, le=1, description="confidence threshold for the threshold scheduler")
    compare_with: list[int] | None = Field(None, max_length=1 << 20, description=(
        "greedy only: token ids of another answer to the same messages; the final usage says where this answer "
        "parts from it and whether that is a near-tie within the dtype's precision"))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1, max_length=4096)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int | None = None
    speculative: bool = Field(True, description="dspark extension: false decodes without the drafter (the baseline)")
    dspark: DSparkOptions | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise APIError(400, f"stop takes up to 4 non-empty strings of at most {MAX_STOP_LENGTH} characters", param="stop")
        return stops


# ---- the worker side ----


@dataclass
class Job:
    messages: list[dict]
    sampling: Sampling
    max_tokens: int
    speculative: bool
    options: DSparkOptions
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None  # "disconnected" or "stop" (a stop string ended the answer)
    started: bool = False  # taken off the queue by the worker
    prompt_tokens: int = 0
    divergence: dict | None = None  # set before the last round is emitted, when compare_with asks for it

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel("disconnected")

    def cancel(self, reason: str) -> None:
        if not self.cancelled.is_set():
            self.reason = reason
            self.cancelled.set()


class Metrics:
    """Counters in Prometheus text format, named after vLLM's spec-decode metrics with a dspark: prefix."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counters: dict[str, float] = {}
        self.running = self.waiting = 0

    def add(self, name: str, value: float = 1) -> None:
        with self.lock:
            self.counters[name] = self.counters.get(name, 0) + value

    def step(self, step: Step) -> None:
        with self.lock:
            c = self.counters
            c["generation_tokens_total"] = c.get("generation_tokens_total", 0) + len(step.token_ids)
            if not step.prefill:
                c["spec_decode_num_proposed_tokens_total"] = c.get("spec_decode_num_proposed_tokens_total", 0) + len(step.draft_ids)
            if step.verified:
                for name, value in (("num_drafts", 1), ("num_draft_tokens", step.verified), ("num_accepted_tokens", step.accepted)):
                    key = f"spec_decode_{name}_total"
                    c[key] = c.get(key, 0) + value
                for k in range(step.accepted):
                    key = f'spec_decode_num_accepted_tokens_per_pos_total{{position="{k}"}}'
                    c[key] = c.get(key, 0) + 1

    def render(self) -> str:
        help_ = {
            "prompt_tokens_total": "Prompt tokens of finished and cancelled requests.",
            "generation_tokens_total": "Tokens committed by the decode loop.",
            "spec_decode_num_drafts_total": "Rounds in which the target verified at least one draft token.",
            "spec_decode_num_draft_tokens_total": "Draft tokens the target verified (the scheduler may verify fewer than proposed).",
            "spec_decode_num_proposed_tokens_total": "Draft tokens the drafter proposed.",
            "spec_decode_num_accepted_tokens_total": "Draft tokens accepted.",
            "spec_decode_num_accepted_tokens_per_pos_total": "Draft tokens accepted at each position of the block (0 is the first).",
            "request_success_total": "Requests that finished, by finish reason.",
            "requests_cancelled_total": "Requests stopped because the client disconnected or cancelled.",
            "requests_failed_total": "Requests that ended in an error.",
        }
        with self.lock:
            counters = dict(self.counters)
            gauges = {"num_requests_running": self.running, "num_requests_waiting": self.waiting}
        lines = []
        for family, text in help_.items():
            lines += [f"# HELP dspark:{family} {text}", f"# TYPE dspark:{family} counter"]
            series = sorted(k for k in counters if k == family or k.startswith(family + "{"))
            lines += [f"dspark:{k} {counters[k]:g}" for k in series] or ([] if family.endswith(("per_pos_total", "success_total")) else [f"dspark:{family} 0"])
        for name, value in gauges.items():
            lines += [f"# HELP dspark:{name} Requests {name.rsplit('_', 1)[1]} for the loaded pair.", f"# TYPE dspark:{name} gauge", f"dspark:{name} {value}"]
        return "\n".join(lines) + "\n"


class Service:
    """The loaded pair, its state for /health, the request queue and the one worker thread."""

    def __init__(self, name: str, max_model_len: int | None = None, max_tokens: int | None = None):
        self.name, self.max_model_len, self.max_tokens_limit = name, max_model_len, max_tokens
        self.created = int(time.time())
        self.state, self.message, self.progress = "loading", None, None
        self.phases: list[tuple[str, float, float | None]] = []  # start-up: (name, began, ended) on time.monotonic
        self.engine = None
        self.profile_failed = False
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.metrics = Metrics()

    def set_state(self, state: str, message: str | None = None, progress: dict | None = None) -> None:
        self.state, self.message, self.progress = state, message, progress

    def phase(self, name: str, began: float | None = None) -> None:
        """A part of start-up begins (now, or at `began`), and the one before it ends."""
        now = time.monotonic()
        self._end_phase(now)
        self.phases.append((name, now if began is None else began, None))
        self.message = name

    def _end_phase(self, now: float) -> None:
        if self.phases and self.phases[-1][2] is None:
            name, began, _ = self.phases[-1]
            self.phases[-1] = (name, began, now)

    def phase_times(self) -> list[dict]:
        now = time.monotonic()
        return [{"name": name, "seconds": round((ended or now) - began, 2), "done": ended is not None}
                for name, began, ended in list(self.phases)]

    def start(self, load: Callable[["Service"], object]) -> threading.Thread:
        """Load in the background (load calls phase() as each part begins, and set_state for downloads), then serve."""

        def run():
            try:
                engine = load(self)
            except Exception as e:
                log.exception("loading failed")
                self._end_phase(time.monotonic())
                self.set_state("error", str(e) or e.__class__.__name__)
                return
            self.attach(engine)
            phases = self.phase_times()
            log.info("ready after %.1f s: %s", sum(p["seconds"] for p in phases),
                     ", ".join(f"{p['name']} {p['seconds']:.1f} s" for p in phases))

        thread = threading.Thread(target=run, name="dspark-loader", daemon=True)
        thread.start()
        return thread

    def attach(self, engine) -> None:
        if self.max_model_len:
            # The decode loop refuses prompts (and caps answers) by this length.
            engine.target.max_length = min(engine.target.max_length, self.max_model_len)
            engine.target.rewind(0)  # a cache sized for the new length
        self.engine = engine
        threading.Thread(target=self._work, name="dspark-worker", daemon=True).start()
        self._end_phase(time.monotonic())
        self.set_state("ready")

    @property
    def context_length(self) -> int:
        return self.engine.target.max_length

    @property
    def max_tokens(self) -> int:
        return min(self.max_tokens_limit or self.context_length, self.context_length)

    def submit(self, job: Job) -> None:
        with self.metrics.lock:
            self.metrics.waiting += 1
        self.jobs.put(job)

    def cancel(self, job: Job, reason: str) -> None:
        """Stop a job: a waiting one leaves the queue's count at once (and never runs), a running one
        stops after its current round."""
        with self.metrics.lock:
            if not job.started and not job.cancelled.is_set():
                self.metrics.waiting -= 1
                self.metrics.counters["requests_cancelled_total"] = self.metrics.counters.get("requests_cancelled_total", 0) + 1
            job.cancel(reason)

    def _work(self) -> None:
        while True:
            if self.jobs.empty() and self.engine.profile_wanted and not self.profile_failed:
                self._measure_profile()
                continue
            job = self.jobs.get()
            with self.metrics.lock:
                job.started = True
                if job.cancelled.is_set():
                    continue  # withdrawn while waiting, and counted then
                self.metrics.waiting -= 1
                self.metrics.running = 1
            try:
                self._run(job)
            finally:
                with self.metrics.lock:
                    self.metrics.running = 0
                job.emit("end")

    def _measure_profile(self) -> None:
        """The auto scheduler's SPS profile, measured while no request waits: one that arrives stops the
        measurement within a pass, and it starts over once the worker is idle again."""
        try:
            self.engine.measure_profile(interrupted=lambda: not self.jobs.empty())
        except Interrupted:
            pass
        except Exception:
            log.exception("measuring the verify speed profile failed; every draft stays verified")
            self.profile_failed = True

    def verify_profile(self) -> str | None:
        """What the auto scheduler weighs drafts with, for /health (None when it does not run)."""
        engine = self.engine
        if engine is None or engine.scheduler.mode != "auto" or engine.drafter is None:
            return None
        if engine.profile is None:
            return "not measured yet: every draft is verified until it is (between requests)"
        if engine.profile.noisy:
            return "noisy (measured while other work slowed the passes)" + ("" if engine.profile_measured else "; measured again between requests")
        return "measured"

    def _run(self, job: Job) -> None:
        engine = self.engine
        try:
            ids = engine.chat_ids(job.messages)
            job.prompt_tokens = len(ids)
            o = job.options
            steps = engine.generate(ids, job.sampling, job.max_tokens, job.speculative, o.block_size, o.scheduler, o.threshold)
            finish, pieces, tokens = None, TextStream(engine.tokenizer), []
            try:
                for step in steps:
                    self.metrics.step(step)
                    tokens += step.token_ids
                    event = step.to_dict()
                    # Per-token text lets a client colour each token by origin; a piece is "" while a
                    # character's bytes are split over tokens, and the whole character lands on its last one.
                    event["pieces"] = [pieces.push([t]) for t in step.token_ids]
                    rejected = step.draft_ids[step.accepted : step.verified]
                    event["rejected_text"] = engine.tokenizer.decode(rejected, skip_special_tokens=True) if rejected else ""
                    if step.finish_reason and o.compare_with is not None and job.sampling.greedy:
                        found = explain_divergence(engine.target, ids, tokens, o.compare_with)
                        job.divergence = {"identical": found is None and len(tokens) == len(o.compare_with),
                                          "divergence": found.to_dict() | {"verdict": found.describe()} if found else None}
                    job.emit("step", event)
                    finish = step.finish_reason
                    if job.cancelled.is_set():
                        break
            finally:
                steps.close()
        except ContextLengthError as e:
            job.emit("error", APIError(400, f"{e}; shorten the conversation", code="context_length_exceeded", param="messages"))
            self.metrics.add("requests_failed_total")
            return
        except (LoadError, jinja2.TemplateError) as e:
            message = str(e) if isinstance(e, LoadError) else f"the chat template refused these messages: {e}"
            job.emit("error", APIError(400, message, param="messages"))
            self.metrics.add("requests_failed_total")
            return
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("internal error %s", error_id)
            job.emit("error", internal_error(error_id))
            self.metrics.add("requests_failed_total")
            # A round that failed half-way may leave the caches ahead of the committed ids.
            engine.target.rewind(0)
            if hasattr(engine.drafter, "rewind"):
                engine.drafter.rewind(0)
            return
        self.metrics.add("prompt_tokens_total", job.prompt_tokens)
        if finish is None and job.reason == "disconnected":
            self.metrics.add("requests_cancelled_total")
        else:
            self.metrics.add(f'request_success_total{{finished_reason="{finish or job.reason}"}}')


def internal_error(error_id: str) -> APIError:
    return APIError(500, f"internal error {error_id}; the server log has the details", type="internal_error", code=error_id)


# ---- turning Step events into OpenAI chunks ----


class StopText:
    """Cuts the answer before the first stop string, holding back text that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""

    def push(self, text: str) -> tuple[str, bool]:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Answer:
    """One request's steps as they arrive: the content delta of each, the finish reason, the usage."""

    def __init__(self, job: Job, stops: list[str]):
        self.job, self.stop = job, StopText(stops)
        self.steps: list[dict] = []
        self.text = ""
        self.finish: str | None = None

    def add(self, event: dict) -> tuple[str, dict]:
        text = event.pop("text")
        self.steps.append(event)
        delta, hit = self.stop.push(text)
        if hit:
            self.finish = "stop"
            self.job.cancel("stop")
        elif event["finish_reason"]:
            self.finish = event["finish_reason"]
            delta += self.stop.flush()
        self.text += delta
        return delta, event

    def usage(self) -> dict:
        stats = summarize(self.steps)
        prompt, completion = self.job.prompt_tokens, stats["tokens"]
        if self.job.divergence is not None:
            stats["comparison"] = self.job.divergence
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion, "dspark": stats}


async def next_event(service: Service, job: Job, request: Request | None = None) -> tuple[str, object]:
    """The worker's next event; while waiting, notices a client that went away (when `request` is given)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), POLL_S if request else None)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                service.cancel(job, "disconnected")
                return "end", None


# ---- the HTTP side ----


class Guard:
    """The API key on /v1 and the body size bound, checked before anything reads the request. Plain
    ASGI rather than @app.middleware, which would relay every streamed chunk through another task."""

    def __init__(self, app, api_key: str | None):
        self.app, self.expected = app, f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.expected and scope["path"].startswith("/v1/") and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            error = APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", type="authentication_error")
            return await error.response()(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return await APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes").response()(scope, receive, send)
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:  # a chunked body that declared no length
                raise APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
            return message

        await self.app(scope, bounded_receive, send)


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="dspark-chat engine", version="0.1.0", description="OpenAI-compatible chat completions with live speculative-decoding statistics.")

    def openapi() -> dict:
        # The one model name this server accepts, so that generated clients and fuzzers can use it.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema["components"]["schemas"]["ChatRequest"]["properties"]["model"]["enum"] = [service.name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(Guard, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response({"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return APIError(400, f"malformed JSON: {errors[0].get('ctx', {}).get('error', errors[0].get('msg'))}").response()
        where = lambda err: ".".join(str(p) for p in err.get("loc", ()) if p != "body")  # noqa: E731
        message = "; ".join(f"{where(err) or 'body'}: {err.get('msg')}" for err in errors[:5])
        return APIError(422, message, param=where(errors[0]) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), type="invalid_request_error").response(e.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception):
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s", error_id, exc_info=e)
        return internal_error(error_id).response()

    @app.get("/health")
    async def health():
        engine = service.engine
        body = {
            "status": service.state,
            "model": service.name,
            "message": service.message,
            "progress": service.progress,
            "engine": engine.describe() if engine else None,
            "phases": service.phase_times(),
            "verify_profile": service.verify_profile(),
            "context_length": service.context_length if engine else None,
            "requests": {"running": service.metrics.running, "waiting": service.metrics.waiting},
        }
        return JSONResponse(body, 503 if service.state == "error" else 200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": service.name, "object": "model", "created": service.created, "owned_by": "dspark-chat"}
        if service.engine:
            card["max_model_len"] = service.context_length
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        job, stops = make_job(service, body)
        service.submit(job)
        kind, value = await next_event(service, job, request)
        if kind == "error":
            raise value
        if kind == "end":  # cancelled while queued: no one is waiting for this answer
            return JSONResponse({}, 499)
        answer = Answer(job, stops)
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(service, job, answer, value, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        while True:
            if kind == "error":
                raise value
            if kind == "end":
                return JSONResponse({}, 499)
            answer.add(value)
            if answer.finish:
                break
            kind, value = await next_event(service, job, request)
        return reply | {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text}, "finish_reason": answer.finish, "logprobs": None}],
            "usage": answer.usage(),
        }

    return app


def make_job(service: Service, body: ChatRequest) -> tuple[Job, list[str]]:
    if body.model != service.name:
        raise APIError(404, f"model {body.model!r} is not served here; this server has {service.name!r}", code="model_not_found", param="model")
    if service.state != "ready":
        detail = f": {service.message}" if service.message else ""
        raise APIError(503, f"the model is not ready (state {service.state}{detail}); poll /health", type="service_unavailable")
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    stops = body.stop_strings()
    limit = service.max_tokens
    wanted = body.max_completion_tokens or body.max_tokens or limit
    if wanted > limit:
        raise APIError(400, f"max_tokens is {wanted}; this server allows at most {limit}", param="max_tokens")
    sampling = Sampling(temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p or 1.0, seed=body.seed)
    job = Job([m.as_dict() for m in body.messages], sampling, wanted, body.speculative, body.dspark or DSparkOptions(), asyncio.get_running_loop())
    return job, stops


async def sse(service: Service, job: Job, answer: Answer, step: dict, reply: dict, include_usage: bool):
    """Server-sent events: one chunk per round (text delta + the round's `dspark` event), the usage
    on the chunk that finishes, then [DONE]."""

    def chunk(choices: list, **extra) -> str:
        return "data: " + json.dumps(reply | {"object": "chat.completion.chunk", "choices": choices} | extra) + "\n\n"

    kind, value, first = "step", step, True
    try:
        while kind == "step":
            delta, event = answer.add(value)
            extra = {"dspark": event}
            if answer.finish:
                extra["usage"] = answer.usage()
            message = {"role": "assistant", "content": delta} if first else {"content": delta}
            first = False
            yield chunk([{"index": 0, "delta": message, "finish_reason": answer.finish, "logprobs": None}], **extra)
            if answer.finish:
                if include_usage:  # the OpenAI shape: a last chunk with no choices and the usage
                    yield chunk([], usage=extra["usage"])
                break
            kind, value = await next_event(service, job)
        if kind == "error":
            yield "data: " + json.dumps({"error": {"message": value.message, "type": value.type, "code": value.code}}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # Starlette cancels this generator when the client disconnects; the worker stops within a round.
        if answer.finish is None:
            service.cancel(job, "disconnected")


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_listen: Callable[[], None]):
        super().__init__(config)
        self.on_listen = on_listen

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.on_listen()


def hub_repos(*specs: str | None) -> list[tuple[str, str]]:
    """The Hub repositories among model specs (local folders and files, and the embedded model, are not)."""
    from pathlib import Path

    from .catalog import HUB_ID

    repos = []
    for spec in specs:
        repo, _, revision = (spec or "").partition("@")
        if spec and HUB_ID.fullmatch(repo) and not Path(spec).expanduser().exists():
            repos.append((repo, revision or "main"))
    return repos


def run(args, name: str, placement: dict | None = None) -> int:
    """`dspark-chat serve`: bind, print {"event": "listening", ...} on stdout, then load (`placement`:
    the fit plan's load arguments for a catalog pair) and serve as model `name`."""
    try:
        family, _, proto, _, address = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        print(f"dspark-chat: error: cannot resolve --host {args.host}: {e}", file=sys.stderr)
        return 2
    if not ipaddress.ip_address(address[0]).is_loopback and not args.api_key:
        print(f"dspark-chat: error: --host {args.host} makes the engine reachable from other machines; "
              "give it an --api-key (or set DSPARK_CHAT_API_KEY) or bind to 127.0.0.1", file=sys.stderr)
        return 2
    # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it
    # Nagle's algorithm holds each response's body behind its headers for a delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        print(f"dspark-chat: error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    sock.listen(128)
    host, port = sock.getsockname()[:2]

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Service(name, args.max_model_len, args.max_tokens)

    def load(service: Service):
        from . import hub
        from .engine import Engine

        repos = hub_repos(args.target, args.drafter)
        if repos:
            service.phase("downloading " + ", ".join(repo for repo, _ in repos))
            service.set_state("downloading", ", ".join(repo for repo, _ in repos))

            def progress(p: hub.Progress) -> None:
                service.set_state("downloading", f"{p.repo_id}: {p.filename}", {
                    "done": p.done, "total": p.total, "file": p.filename, "file_done": p.file_done, "file_size": p.file_size})

            hub.pull(repos, progress)
            service.set_state("loading")
        # The SPS profile is never waited for: the cached one, else every draft verified until the worker has
        # measured it between requests.
        return Engine.load(args.target, args.drafter, args.prompt_lookup, args.dtype, args.device, args.scheduler, args.threshold,
                           args.calibration, placement=placement, float_drafter=args.float_drafter, wait_for_profile=False,
                           phase=service.phase, compile=args.compile, max_length=args.max_model_len)

    def on_listen():
        service.phase("starting: Python, torch, transformers and the server", began=STARTED)
        url_host = f"[{host}]" if ":" in host else host
        print(json.dumps({"event": "listening", "host": host, "port": port, "url": f"http://{url_host}:{port}"}), flush=True)
        service.start(load)

    config = uvicorn.Config(create_app(service, args.api_key), log_level="info", access_log=False, timeout_graceful_shutdown=3)
    _Uvicorn(config, on_listen).run(sockets=[sock])
    return 0
