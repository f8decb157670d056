"""The engine server as a real process on a free loopback port, driven by the official openai client,
httpx and schemathesis; and the in-process pieces a live server cannot be made to show (a crash)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import REFERENCE

KEY = "test-key"
WAIT_S = 120  # bound on any wait for the server; the tests assert behaviour, never speed
SETTLE_S = 30  # bound on waiting for the metrics to show a cancellation


class Server:
    def __init__(self, target: Path, *options: str, api_key: str | None = None, env: dict | None = None):
        args = [sys.executable, "-m", "dspark_chat.engine", "serve", "--target", str(target), "--port", "0", "--dtype", "float32", "--device", "cpu", *options]
        if api_key:
            args += ["--api-key", api_key]
        self.name, self.key = str(target), api_key
        self.stderr = open(os.devnull, "w")
        # One torch thread: the tiny model gains nothing from more, and a shared 2-core machine stays responsive.
        env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        line = _readline(self.proc, WAIT_S)
        self.listening = json.loads(line)
        self.url = f"http://127.0.0.1:{self.listening['port']}"
        self.http = httpx.Client(base_url=self.url, timeout=WAIT_S, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        self.states = []
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            health = self.http.get("/health").json()
            if not self.states or self.states[-1] != health["status"]:
                self.states.append(health["status"])
            if health["status"] in ("ready", "error"):
                break
            time.sleep(0.05)
        assert self.states[-1] == "ready", health

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "unused", timeout=WAIT_S, max_retries=0)

    def chat(self, body: dict, **headers) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={"model": self.name} | body, headers=headers)

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(dspark:\S+) (\S+)$", text, re.M)}

    def close(self):
        self.http.close()
        self.proc.kill()
        self.proc.wait(timeout=WAIT_S)
        self.stderr.close()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    out = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not out or not out[0]:
        proc.kill()
        raise AssertionError(f"the server printed no listening line (exit code {proc.poll()})")
    return out[0]


@pytest.fixture(scope="module")
def server(tiny_target_dir):
    s = Server(tiny_target_dir, "--drafter", str(REFERENCE / "dspark"), "--scheduler", "off", api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def lookup_server(tiny_target_dir):
    """Prompt lookup accepts some drafts even on the random tiny model; max-tokens keeps fuzzing quick."""
    s = Server(tiny_target_dir, "--prompt-lookup", "--max-tokens", "48")
    yield s
    s.close()


@pytest.fixture(scope="module")
def engine(tiny_target_dir):
    from dspark_chat.engine.engine import Engine

    return Engine.load(str(tiny_target_dir), str(REFERENCE / "dspark"), dtype="float32", device="cpu", scheduler="off")


def settle(server: Server, done) -> dict[str, float]:
    """The metrics once done(metrics) holds, or as they are after SETTLE_S."""
    deadline = time.monotonic() + SETTLE_S
    while not done(metrics := server.metrics()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return metrics


def greedy_text(engine, content: str, max_tokens: int) -> str:
    steps = engine.generate(engine.chat_ids([{"role": "user", "content": content}]), max_new_tokens=max_tokens)
    return "".join(step.text for step in steps)


def sse_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def test_listening_line_health_and_models(server):
    assert server.listening["host"] == "127.0.0.1" and server.listening["port"] > 0
    assert set(server.states) <= {"loading", "ready"}
    health = server.http.get("/health").json()
    assert health["context_length"] == 1024 and "drafter block 7 in int8" in health["engine"]
    # Start-up, part by part with its time, all done; no auto scheduler here, so no verify profile.
    assert [p["name"] for p in health["phases"]] == [
        "starting: Python, torch, transformers and the server", "loading the target", "loading the drafter (int8 on an x86 CPU)"]
    assert all(p["done"] and p["seconds"] >= 0 for p in health["phases"]) and health["verify_profile"] is None
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [server.name]


def test_openai_client_stream_equals_non_stream_and_engine(server, engine):
    client = server.openai()
    messages = [{"role": "user", "content": "Write a function"}]
    whole = client.chat.completions.create(model=server.name, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=server.name, messages=messages, max_tokens=24, temperature=0, stream=True,
                                                 extra_body={"dspark": {"scheduler": "off"}}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content == greedy_text(engine, "Write a function", 24)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens == 24
    assert whole.usage.prompt_tokens == len(engine.chat_ids(messages))
    assert all(c.model_extra["dspark"]["token_ids"] for c in chunks)


def test_events_carry_token_pieces_and_rejected_drafts(server, tokenizer):
    """What the app needs to colour an answer by token origin: one text piece per committed token
    (together the answer), and the text of the drafts the target rejected."""
    with server.http.stream("POST", "/v1/chat/completions", json={
        "model": server.name, "messages": [{"role": "user", "content": "Write a function"}], "max_tokens": 40,
        "temperature": 0, "stream": True}) as response:
        chunks = sse_events(response)
    events = [c["dspark"] for c in chunks if c["choices"]]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert all(len(e["pieces"]) == len(e["token_ids"]) for e in events)
    assert "".join(p for e in events for p in e["pieces"]) == text
    rejected = [e for e in events if e["accepted"] < e["verified"]]
    assert rejected  # the random drafter is often wrong
    for e in rejected:
        assert e["rejected_text"] == tokenizer.decode(e["draft_ids"][e["accepted"]:e["verified"]], skip_special_tokens=True)


def test_compare_with_reports_identity_and_where_answers_part(server):
    """The compare view's verdict comes from the engine: the speculative answer's ids sent with the
    baseline request; identical for greedy, and a doctored answer is located and judged a real mismatch."""
    body = {"model": server.name, "messages": [{"role": "user", "content": "Write a function"}], "max_tokens": 24, "temperature": 0}
    spec = server.chat(body | {"stream": True}).text
    ids = [t for line in spec.splitlines() if line.startswith("data: {") for t in json.loads(line[6:]).get("dspark", {}).get("token_ids", [])]
    assert len(ids) == 24
    same = server.chat(body | {"speculative": False, "dspark": {"compare_with": ids}}).json()["usage"]["dspark"]["comparison"]
    assert same == {"identical": True, "divergence": None}
    doctored = ids[:10] + [(ids[10] + 1) % 512] + ids[11:]
    parted = server.chat(body | {"speculative": False, "dspark": {"compare_with": doctored}}).json()["usage"]["dspark"]["comparison"]
    assert parted["identical"] is False
    d = parted["divergence"]
    assert d["position"] == 10 and d["token_a"] == ids[10] and d["token_b"] == doctored[10]
    assert d["near_tie"] is False and "a real mismatch" in d["verdict"]
    sampled = server.chat(body | {"temperature": 0.8, "dspark": {"compare_with": ids}}).json()["usage"]["dspark"]
    assert "comparison" not in sampled  # only greedy answers have a verdict


@pytest.mark.parametrize("which", ["server", "lookup_server"])
def test_stream_events_add_up(which, request, tokenizer):
    server = request.getfixturevalue(which)
    before = server.metrics()
    with server.http.stream("POST", "/v1/chat/completions", json={
        "model": server.name, "messages": [{"role": "user", "content": "Write a function"}], "max_tokens": 40,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }) as response:
        assert response.status_code == 200
        chunks = sse_events(response)
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and chunks[-2]["usage"] == usage  # the finishing chunk carries it too
    events = [c["dspark"] for c in chunks if c["choices"]]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    ids = [t for e in events for t in e["token_ids"]]
    assert len(ids) == usage["completion_tokens"] == usage["dspark"]["tokens"] == 40
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    rounds = [e for e in events if not e["prefill"]]
    assert events[0]["prefill"] and len(rounds) == usage["dspark"]["rounds"] == len(events) - 1
    assert usage["dspark"]["tau"] == pytest.approx(sum(len(e["token_ids"]) for e in rounds) / len(rounds))
    accepted, verified = sum(e["accepted"] for e in rounds), sum(e["verified"] for e in rounds)
    assert usage["dspark"]["accepted"] == accepted and usage["dspark"]["verified"] == verified
    assert all(e["origins"].count("draft") == e["accepted"] <= e["verified"] <= len(e["draft_ids"]) for e in events)
    assert all(e["origins"][-1] == "target" for e in events)
    after = server.metrics()
    delta = lambda name: after.get(name, 0) - before.get(name, 0)  # noqa: E731
    assert delta("dspark:generation_tokens_total") == 40
    assert delta("dspark:spec_decode_num_accepted_tokens_total") == accepted
    assert delta("dspark:spec_decode_num_draft_tokens_total") == verified
    per_position = sum(delta(k) for k in after if "per_pos" in k)
    assert per_position == accepted
    if which == "lookup_server":
        assert accepted > 0  # prompt lookup finds repeats in this answer: the acceptance path is exercised


def test_disconnect_stops_generation_and_server_goes_on(server):
    before = server.metrics()
    with server.http.stream("POST", "/v1/chat/completions", json={
        "model": server.name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1000, "temperature": 0, "stream": True,
    }) as response:
        lines = response.iter_lines()
        assert sum(1 for _, line in zip(range(3), (l for l in lines if l.startswith("data: ")))) == 3
    # Leaving the block closed the connection mid-answer.
    after = settle(server, lambda m: m["dspark:requests_cancelled_total"] > before["dspark:requests_cancelled_total"] and m["dspark:num_requests_running"] == 0)
    assert after["dspark:requests_cancelled_total"] == before["dspark:requests_cancelled_total"] + 1
    assert after["dspark:generation_tokens_total"] - before["dspark:generation_tokens_total"] < 1000
    stopped_at = after["dspark:generation_tokens_total"]
    time.sleep(0.5)
    assert server.metrics()["dspark:generation_tokens_total"] == stopped_at
    reply = server.openai().chat.completions.create(model=server.name, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 8


def test_request_cancelled_while_queued_never_runs(server, engine):
    before = server.metrics()
    first = [{"role": "user", "content": "The quick brown fox"}]
    with server.http.stream("POST", "/v1/chat/completions", json={"model": server.name, "messages": first, "max_tokens": 1000, "temperature": 0, "stream": True}) as running:
        lines = running.iter_lines()  # kept referenced: a dropped iterator would close the connection
        assert next(lines).startswith("data: ")
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while the request waits in the queue
            server.http.post("/v1/chat/completions", json={"model": server.name, "messages": [{"role": "user", "content": "queued"}], "max_tokens": 8}, timeout=0.5)
        withdrawn = settle(server, lambda m: m["dspark:requests_cancelled_total"] == before["dspark:requests_cancelled_total"] + 1)
        assert withdrawn["dspark:requests_cancelled_total"] == before["dspark:requests_cancelled_total"] + 1
        assert withdrawn["dspark:num_requests_waiting"] == 0 and withdrawn["dspark:num_requests_running"] == 1
    after = settle(server, lambda m: m["dspark:requests_cancelled_total"] == before["dspark:requests_cancelled_total"] + 2 and m["dspark:num_requests_running"] == 0)
    assert after["dspark:requests_cancelled_total"] == before["dspark:requests_cancelled_total"] + 2
    assert after["dspark:num_requests_waiting"] == after["dspark:num_requests_running"] == 0
    # Only the first request's prompt went through the engine.
    assert after["dspark:prompt_tokens_total"] - before["dspark:prompt_tokens_total"] == len(engine.chat_ids(first))


def test_concurrent_clients_all_get_complete_answers(server, engine):
    prompts = ["hello", "The quick brown fox", "def fibonacci(n):", "Janet's ducks", "import json"]
    expected = {p: greedy_text(engine, p, 16) for p in prompts}

    def ask(i_prompt):
        i, prompt = i_prompt
        client = server.openai()
        kwargs = dict(model=server.name, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0)
        if i % 2:
            return prompt, "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices)
        return prompt, client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = dict(pool.map(ask, enumerate(prompts)))
    assert answers == expected


def test_stop_strings_cut_the_answer(server, engine):
    text = greedy_text(engine, "hello", 24)
    match = re.search(r"[A-Za-z]{3}", text[2:])
    assert match, text
    stop = match.group()
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 24, "temperature": 0, "stop": [stop, "never seen"]}
    whole = server.chat(body).json()
    assert whole["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": text[: text.find(stop)]}, "finish_reason": "stop", "logprobs": None}
    with server.http.stream("POST", "/v1/chat/completions", json={"model": server.name, "stream": True} | body) as response:
        chunks = sse_events(response)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == text[: text.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_bad_requests_get_clear_errors(server):
    hello = [{"role": "user", "content": "hello"}]
    assert server.http.post("/v1/chat/completions", json={"model": server.name, "messages": hello}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = server.http.post("/v1/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = server.chat({})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = server.chat({"messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 422 and "messages.0.role" in r.json()["error"]["message"]
    r = server.chat({"messages": hello, "dspark": {"scheduler": "sometimes"}})
    assert r.status_code == 422 and "dspark.scheduler" in r.json()["error"]["message"]
    assert server.chat({"messages": hello, "n": 2}).json()["error"]["param"] == "n"
    r = server.chat({"messages": hello, "max_tokens": 5000})
    assert r.status_code == 400 and "at most 1024" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        server.openai().chat.completions.create(model="gpt-4o", messages=hello)
    r = server.chat({"messages": [{"role": "user", "content": "fox jumps " * 800}], "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = server.http.post("/v1/chat/completions", content=b" " * (5 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert server.http.get("/health").json()["status"] == "ready"
    assert server.chat({"messages": hello, "max_tokens": 2}).json()["usage"]["completion_tokens"] == 2


@pytest.fixture
def never_listens(monkeypatch):
    """`serve` run in this process, where a server that got as far as listening fails the test instead of serving."""
    from dspark_chat.engine import server as server_module

    def listened(self, *args, **kwargs):
        raise AssertionError("the server listened")

    monkeypatch.setattr(server_module._Uvicorn, "run", listened)


def test_binding_beyond_loopback_needs_an_api_key(tiny_target_dir, never_listens, monkeypatch, capsys):
    from dspark_chat.engine import cli

    monkeypatch.delenv("DSPARK_CHAT_API_KEY", raising=False)
    assert cli.main(["serve", "--target", str(tiny_target_dir), "--host", "0.0.0.0", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert "--api-key" in err and out == ""


def test_fuzzing_the_openapi_description_finds_no_server_error(lookup_server, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", lookup_server.url + "/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "15", "--workers", "1", "--request-timeout", "60", "--seed", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,  # schemathesis keeps a cache in its working directory
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert lookup_server.http.get("/health").json()["status"] == "ready"
    # The fuzzer got past validation to real generations.
    assert lookup_server.metrics()['dspark:request_success_total{finished_reason="length"}'] > 0


def test_unknown_catalog_model_is_refused_before_listening(never_listens, capsys):
    from dspark_chat.engine import cli

    assert cli.main(["serve", "--model", "no-such-pair", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert "not in the catalog" in err and out == ""


def test_internal_error_answers_500_with_an_id_and_the_server_goes_on(tiny_target_dir):
    """No request makes the real engine fail, so this breaks one part of a real engine in-process."""
    from fastapi.testclient import TestClient

    from dspark_chat.engine.engine import Engine
    from dspark_chat.engine.server import Service, create_app

    service = Service("tiny")
    engine = Engine.load(str(tiny_target_dir), prompt_lookup=True, dtype="float32", device="cpu", scheduler="off")
    engine.drafter = object()  # not a drafter: the decode loop fails on it
    service.attach(engine)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 500
        error = r.json()["error"]
        assert re.fullmatch(r"[0-9a-f]{12}", error["code"]) and error["code"] in error["message"]
        r = client.post("/v1/chat/completions", json=body | {"speculative": False})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert 'dspark:requests_failed_total 1' in client.get("/metrics").text


def test_the_worker_measures_the_verify_profile_between_requests(tiny_target_dir, monkeypatch, tmp_path):
    """A start waits for no SPS profile: with none cached every draft is verified, and the worker measures one
    while idle. A request that arrives meanwhile stops the measurement and is answered at once; the worker
    measures again once it is idle, and caches the result."""
    from fastapi.testclient import TestClient

    import dspark_chat.engine.scheduler as scheduler_module
    from dspark_chat.engine.engine import Engine
    from dspark_chat.engine.scheduler import Interrupted
    from dspark_chat.engine.server import Service, create_app

    monkeypatch.setattr("dspark_chat.engine.engine.cache_dir", lambda: tmp_path)
    engine = Engine.load(str(tiny_target_dir), prompt_lookup=True, dtype="float32", device="cpu", wait_for_profile=False)
    assert engine.profile is None and engine.profile_wanted
    # Passes of at least 20 ms, so that the request surely lands inside the measurement (seconds).
    monkeypatch.setattr(scheduler_module, "clock", lambda: (time.sleep(0.01), time.perf_counter())[1])
    started, outcomes, real = threading.Event(), [], engine.measure_profile

    def measure(interrupted):
        started.set()
        try:
            real(interrupted)
        except Interrupted:
            outcomes.append("interrupted")
            raise
        outcomes.append("measured")

    monkeypatch.setattr(engine, "measure_profile", measure)
    service = Service("tiny")
    service.attach(engine)
    with TestClient(create_app(service)) as client:
        assert started.wait(WAIT_S)
        assert client.get("/health").json()["verify_profile"].startswith("not measured yet")
        body = {"model": "tiny", "messages": [{"role": "user", "content": "one two three one two three one two"}],
                "max_tokens": 24, "temperature": 0}
        spec, plain = client.post("/v1/chat/completions", json=body).json(), client.post("/v1/chat/completions", json=body | {"speculative": False}).json()
        assert outcomes[0] == "interrupted"
        assert spec["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
        assert spec["usage"]["dspark"]["verified"] == spec["usage"]["dspark"]["drafted"] > 0  # no profile: every draft verified
        deadline = time.monotonic() + WAIT_S
        while outcomes[-1] != "measured" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcomes[-1] == "measured" and engine.scheduler.sps and not engine.profile_wanted
        assert client.get("/health").json()["verify_profile"] in ("measured", "noisy (measured while other work slowed the passes)")
        assert len(list((tmp_path / "sps").glob("*.json"))) == 1


def test_max_model_len_bounds_the_prompts_and_the_cache(tiny_target_dir):
    from dspark_chat.engine.engine import Engine
    from dspark_chat.engine.server import Service
    from dspark_chat.engine.target import GrowingLayer

    engine = Engine.load(str(tiny_target_dir), dtype="float32", device="cpu")
    engine.target.forward([5, 6, 7])  # a cache made before the length was set
    Service("tiny", max_model_len=100).attach(engine)
    assert engine.target.max_length == 100 and engine.target.cached_ids == []
    layers = engine.target.cache.layers
    assert layers and all(isinstance(layer, GrowingLayer) and layer.limit == 100 for layer in layers)


def test_a_compilation_that_fails_is_reported_then_the_server_serves_eagerly(tiny_target_dir, tmp_path):
    """--compile on a machine without a C++ compiler: compiling is a start-up phase of /health that says whether this
    is the first start on this machine and about how long it takes; the engine then warns and serves the eager target.
    A cache folder of its own: kernels the suite compiled before would need no compiler."""
    s = Server(tiny_target_dir, "--compile", "on", env={"CXX": "/nonexistent/g++", "XDG_CACHE_HOME": str(tmp_path)})
    try:
        health = s.http.get("/health").json()
        names = [p["name"] for p in health["phases"]]
        assert names[:2] == ["starting: Python, torch, transformers and the server", "loading the target"]
        assert re.fullmatch(r"compiling \(first start on this machine, about \d+ s\)", names[-1]), names
        assert all(p["done"] for p in health["phases"]) and "compiled" not in health["engine"]
        assert s.chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).status_code == 200
    finally:
        s.close()
