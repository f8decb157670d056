"""Downloads against a local stand-in for the Hub: a threaded HTTP server on 127.0.0.1 that answers the
few endpoints huggingface_hub calls (model info with file metadata, HEAD/GET resolve with the X-Repo-Commit,
ETag, X-Linked-Etag/Size headers, a CDN redirect on another origin for LFS files, Range requests).
huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE when imported, so every client runs
in a fresh process (the real `dspark-chat` command line) with those set."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .conftest import EAGLE3, REFERENCE, TINY_DSPARK_PAIR_TOML, TINY_TARGET_TOML

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)
    gated: bool = False
    private: bool = False
    claimed_sizes: dict[str, int] = field(default_factory=dict)  # what the listing says, if not the real size


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.log: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.serve(self, body=False)

            def do_GET(self):
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def requests(self, pattern: str) -> list[dict]:
        return [r for r in self.log if re.search(pattern, r["path"])]

    def serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.log.append({"method": h.command, "path": h.path, "range": h.headers.get("Range"),
                         "auth": h.headers.get("Authorization")})
        path = h.path.split("?")[0]
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
            return self.model_info(h, m.group(1), m.group(2))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self.resolve(h, m.group(1), m.group(2), m.group(3), body)
        if m := re.fullmatch(r"/cdn/([0-9a-f]{64})", path):
            data = next((d for r in self.repos.values() for d in r.files.values()
                         if hashlib.sha256(d).hexdigest() == m.group(1)), None)
            return self.send(h, 404) if data is None else self.send_bytes(h, data, body)
        self.send(h, 404)

    def send(self, h, status, headers=None, data=b""):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if data and h.command != "HEAD":
            h.wfile.write(data)

    def send_bytes(self, h, data: bytes, body: bool, headers=None):
        headers = dict(headers or {}, **{"Accept-Ranges": "bytes"})
        start = 0
        if m := re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or ""):
            start = int(m.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        h.send_response(206 if start else 200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if body:
            h.wfile.write(data[start:])

    def refuse(self, h, repo: Repo, name: str) -> bool:
        if repo is None or repo.private:
            self.send(h, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return True
        if repo.gated and h.headers.get("Authorization") is None:
            self.send(h, 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": f"Access to model {name} is restricted."})
            return True
        return False

    def model_info(self, h, name, revision):
        repo = self.repos.get(name)
        if repo is None or repo.private:  # the listing of a gated repo is public, its files are not
            return self.send(h, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if revision not in ("main", COMMIT):
            return self.send(h, 404, {"X-Error-Code": "RevisionNotFound"})
        siblings = []
        for fname, data in repo.files.items():
            entry = {"rfilename": fname, "blobId": git_blob_id(data), "size": len(data)}
            if fname in repo.lfs:
                size = repo.claimed_sizes.get(fname, len(data))
                entry["lfs"] = {"size": size, "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(entry)
        info = {"id": name, "modelId": name, "sha": COMMIT, "private": False, "siblings": siblings}
        self.send(h, 200, {"Content-Type": "application/json"}, json.dumps(info).encode())

    def resolve(self, h, name, revision, fname, body):
        repo = self.repos.get(name)
        if self.refuse(h, repo, name):
            return
        if revision not in ("main", COMMIT) or fname not in repo.files:
            return self.send(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        data = repo.files[fname]
        headers = {"X-Repo-Commit": COMMIT}
        if fname in repo.lfs:
            sha = hashlib.sha256(data).hexdigest()
            # like the Hub: LFS files redirect to a CDN on another origin ("localhost" is not "127.0.0.1")
            headers |= {"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_id(b"pointer")}"',
                        "Location": f"http://localhost:{self.port}/cdn/{sha}"}
            return self.send(h, 302, headers)
        self.send_bytes(h, data, body, headers | {"ETag": f'"{git_blob_id(data)}"'})


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def tiny_repo(tiny_target_dir) -> Repo:
    """The tiny Qwen3 target as a Hub repository, with files a download must skip."""
    files = {p.name: p.read_bytes() for p in sorted(tiny_target_dir.iterdir()) if p.is_file()}
    files |= {"pytorch_model.bin": b"pickle" * 1000, "README.md": b"# tiny\n", "original/consolidated.pth": b"x" * 100}
    return Repo(files, lfs={"model.safetensors", "pytorch_model.bin", "original/consolidated.pth"})


def run(tmp_path: Path, *args: str, endpoint: str | None = None, offline: bool = False, token: str | None = None,
        code: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and "proxy" not in k.lower()}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "cache"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ETAG_TIMEOUT": "5", "NO_PROXY": "127.0.0.1,localhost"}
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if token:
        env["HF_TOKEN"] = token
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "dspark_chat.engine", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def pull(tmp_path: Path, spec: str, **options) -> subprocess.CompletedProcess:
    """hub.pull alone, reported the way `dspark-chat pull --json` does: the command line imports torch and
    transformers first (about 6 s here), which tests of the download code need not pay each time."""
    repo, _, revision = spec.partition("@")
    code = f"""
import json, sys
from dspark_chat.engine import hub
try:
    for path in hub.pull([({repo!r}, {revision or "main"!r})], hub.json_lines()):
        print(json.dumps({{"event": "done", "path": str(path)}}))
except hub.HubError as e:
    print(f"dspark-chat: error: {{e}}", file=sys.stderr)
    sys.exit(2)
"""
    return run(tmp_path, code=code, **options)


def events(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def cache_folder(tmp_path: Path, repo: str = "acme/tiny") -> Path:
    return tmp_path / "cache" / ("models--" + repo.replace("/", "--"))


def build_cache(tmp_path: Path, files: dict[str, bytes], repo: str = "acme/tiny") -> Path:
    """The Hub cache layout by hand: blobs named by hash, a snapshot of symlinks, refs/main."""
    folder = cache_folder(tmp_path, repo)
    (folder / "blobs").mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_pull_fetches_only_what_loading_needs_with_progress(hub, tiny_repo, tmp_path):
    hub.repos["acme/tiny"] = tiny_repo
    result = run(tmp_path, "pull", "acme/tiny", "--json", endpoint=hub.url, token="hf_secret")
    assert result.returncode == 0, result.stderr
    out = events(result)
    folder = Path(out[-1]["path"])
    assert folder == cache_folder(tmp_path) / "snapshots" / COMMIT
    wanted = {n for n in tiny_repo.files if "/" not in n and n.endswith((".json", ".safetensors", ".jinja"))}
    assert {p.name for p in folder.iterdir()} == wanted
    for name in wanted:
        assert (folder / name).read_bytes() == tiny_repo.files[name]
        assert (folder / name).is_symlink()  # huggingface_hub's own layout: snapshots link to blobs
    sha = hashlib.sha256(tiny_repo.files["model.safetensors"]).hexdigest()
    assert (cache_folder(tmp_path) / "blobs" / sha).is_file()
    assert (cache_folder(tmp_path) / "refs" / "main").read_text() == COMMIT
    assert not list(cache_folder(tmp_path).rglob("*.incomplete"))
    # pickle weights, subfolders and the README were never asked for
    assert not hub.requests(r"pytorch_model\.bin|consolidated|README")
    # the token went to the Hub, never to the CDN
    assert all(r["auth"] == "Bearer hf_secret" for r in hub.requests(r"^/api/|/resolve/"))
    assert hub.requests(r"^/cdn/") and not any(r["auth"] for r in hub.requests(r"^/cdn/"))

    progress = [e for e in out if e["event"] == "progress"]
    total = sum(len(tiny_repo.files[n]) for n in wanted)
    assert {e["total"] for e in progress} == {total}
    assert progress[-1]["done"] == total
    for name in wanted:
        mine = [e for e in progress if e["filename"] == name]
        assert mine[0]["file_done"] == 0 and mine[-1]["file_done"] == mine[-1]["file_size"] == len(tiny_repo.files[name])
        steps = [b["file_done"] - a["file_done"] for a, b in zip(mine, mine[1:])]
        assert sum(steps) == len(tiny_repo.files[name]) and all(s >= 0 for s in steps)
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)

    # a second pull finds everything in the cache: one listing call, no transfer, no event
    hub.log.clear()
    again = pull(tmp_path, "acme/tiny", endpoint=hub.url)
    assert again.returncode == 0, again.stderr
    assert [e["event"] for e in events(again)] == ["done"]
    assert [r["path"].split("?")[0] for r in hub.log] == ["/api/models/acme/tiny/revision/main"]


def test_partial_blob_resumes_from_its_size(hub, tiny_repo, tmp_path):
    hub.repos["acme/tiny"] = tiny_repo
    data = tiny_repo.files["model.safetensors"]
    blobs = cache_folder(tmp_path) / "blobs"
    blobs.mkdir(parents=True)
    sha = hashlib.sha256(data).hexdigest()
    kept = len(data) // 3
    (blobs / f"{sha}.incomplete").write_bytes(data[:kept])

    result = pull(tmp_path, "acme/tiny", endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    weights = [e for e in events(result) if e.get("filename") == "model.safetensors"]
    assert weights[0]["file_done"] == kept
    assert weights[-1]["file_done"] == len(data)
    assert sum(b["file_done"] - a["file_done"] for a, b in zip(weights, weights[1:])) == len(data) - kept
    assert [r["range"] for r in hub.requests(r"^/cdn/") if r["method"] == "GET"] == [f"bytes={kept}-"]
    assert (blobs / sha).read_bytes() == data
    assert not (blobs / f"{sha}.incomplete").exists()
    assert events(result)[0]["done"] == kept  # the overall count starts with the resumed bytes


def test_offline_cache_hit_needs_no_network(hub, tiny_repo, tmp_path):
    hub.repos["acme/tiny"] = tiny_repo
    files = {n: d for n, d in tiny_repo.files.items() if n.endswith((".json", ".safetensors", ".jinja"))}
    snapshot = build_cache(tmp_path, files)
    result = pull(tmp_path, "acme/tiny", endpoint=hub.url, offline=True)
    assert result.returncode == 0, result.stderr
    assert events(result) == [{"event": "done", "path": str(snapshot)}]
    assert hub.log == []


def test_offline_missing_names_the_repo_and_the_pull_command(hub, tmp_path):
    result = pull(tmp_path, "acme/tiny", endpoint=hub.url, offline=True)
    assert result.returncode == 2
    assert "acme/tiny is not in the Hugging Face cache" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr and "`dspark-chat pull acme/tiny`" in result.stderr
    assert hub.log == []


def test_offline_incomplete_snapshot_lists_the_missing_shards(tiny_repo, tmp_path):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    build_cache(tmp_path, {"config.json": tiny_repo.files["config.json"],
                           "model.safetensors.index.json": json.dumps(index).encode(),
                           "model-00001-of-00002.safetensors": tiny_repo.files["model.safetensors"]})
    result = pull(tmp_path, "acme/tiny@v1", offline=True)
    assert result.returncode == 2
    assert "acme/tiny@v1 is not in the Hugging Face cache" in result.stderr  # no refs/v1: another revision
    result = pull(tmp_path, "acme/tiny", offline=True)
    assert "is incomplete in (model-00002-of-00002.safetensors missing) the Hugging Face cache" in result.stderr


def test_no_network_falls_back_to_the_cache(tiny_repo, tmp_path):
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    result = pull(tmp_path, "acme/tiny", endpoint=closed)
    assert result.returncode == 2
    assert "cannot be reached" in result.stderr and "`dspark-chat pull acme/tiny`" in result.stderr
    snapshot = build_cache(tmp_path, {n: d for n, d in tiny_repo.files.items() if n.endswith((".json", ".safetensors", ".jinja"))})
    result = pull(tmp_path, "acme/tiny", endpoint=closed)
    assert result.returncode == 0, result.stderr
    assert events(result)[-1]["path"] == str(snapshot)


def test_gated_and_private_repos_say_how_to_log_in(hub, tiny_repo, tmp_path):
    hub.repos["acme/gated"] = Repo(tiny_repo.files, tiny_repo.lfs, gated=True)
    hub.repos["acme/private"] = Repo(tiny_repo.files, tiny_repo.lfs, private=True)
    gated = pull(tmp_path, "acme/gated", endpoint=hub.url)
    assert gated.returncode == 2
    assert "acme/gated is gated" in gated.stderr and "hf auth login" in gated.stderr and "HF_TOKEN" in gated.stderr
    private = pull(tmp_path, "acme/private", endpoint=hub.url)
    assert private.returncode == 2
    assert "or it is private" in private.stderr and "hf auth login" in private.stderr
    # with a token the gated repo downloads
    ok = pull(tmp_path, "acme/gated", endpoint=hub.url, token="hf_granted")
    assert ok.returncode == 0, ok.stderr


def test_not_enough_disk_is_refused_before_any_transfer(hub, tiny_repo, tmp_path):
    tiny_repo.claimed_sizes["model.safetensors"] = 10**15  # a petabyte: no test machine has it free
    hub.repos["acme/huge"] = tiny_repo
    result = pull(tmp_path, "acme/huge", endpoint=hub.url)
    assert result.returncode == 2
    assert "need 1000000.0 GB more" in result.stderr and "HF_HUB_CACHE" in result.stderr
    assert not hub.requests(r"/resolve/|^/cdn/")


def test_only_pickle_weights_are_refused(hub, tmp_path):
    hub.repos["acme/pickled"] = Repo({"config.json": b"{}", "pytorch_model.bin": b"x" * 10}, {"pytorch_model.bin"})
    result = pull(tmp_path, "acme/pickled", endpoint=hub.url)
    assert result.returncode == 2
    assert "no .safetensors weights" in result.stderr and "pytorch_model.bin" in result.stderr
    assert not hub.requests(r"/resolve/|^/cdn/")


def test_load_target_by_hub_id_downloads_then_loads_offline(hub, tiny_repo, tmp_path):
    """model_dir in engine/loading.py goes through the hub module: the real loader on the real download."""
    hub.repos["acme/tiny"] = tiny_repo
    code = ("from dspark_chat.engine.loading import load_target; "
            "t = load_target('acme/tiny', dtype='float32', device='cpu'); print(t.num_layers, t.hidden_size)")
    result = run(tmp_path, code=code, endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "64"]
    hub.log.clear()
    offline = code + ("\nfrom dspark_chat.engine.loading import LoadError, model_dir\n"
                      "try:\n    model_dir('acme/absent')\nexcept LoadError as e:\n    print(e)")
    result = run(tmp_path, code=offline, endpoint=hub.url, offline=True)
    assert result.returncode == 0, result.stderr
    assert hub.log == []
    loaded, message = result.stdout.split("\n", 1)
    assert loaded.split() == ["4", "64"]
    assert message.startswith("acme/absent is not in the Hugging Face cache") and "dspark-chat pull acme/absent" in message


def test_catalog_pair_pull_and_models_status(hub, tiny_repo, tmp_path):
    """A pair from the user's catalog: pulled by name (the fit check passes for a tiny model) and then
    listed as downloaded by `dspark-chat models`."""
    hub.repos["acme/tiny"] = tiny_repo
    user = tmp_path / "config" / "dspark-chat" / "models.toml"
    user.parent.mkdir(parents=True)
    user.write_text(TINY_TARGET_TOML + """
[pairs.tiny-lookup]
target = "tiny"
kind = "prompt-lookup"
block_size = 10
license = "MIT"
""")
    pulled = run(tmp_path, "pull", "tiny-lookup", endpoint=hub.url)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == str(cache_folder(tmp_path) / "snapshots" / COMMIT)
    assert "total" in pulled.stderr  # the progress bars
    listed = {e["name"]: e for e in events(run(tmp_path, "models", "--json", endpoint=hub.url))}
    assert listed["tiny-lookup"]["downloaded"] == "yes" and listed["tiny-lookup"]["fits"]
    assert listed["qwen3-4b-dspark"]["downloaded"] == "no"


def test_models_piped_into_a_reader_that_stops_early_is_not_an_error(tmp_path):
    """`dspark-chat models --json | head -c 10`: the reader closes the pipe; no traceback, exit 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {"HF_HUB_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dspark_chat.engine", "models", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    assert "Traceback" not in proc.stderr.read().decode()


def test_a_pair_that_cannot_fit_is_refused_before_any_download(hub, tmp_path):
    result = run(tmp_path, "pull", "qwen3-14b-dspark", "--device-map", "cpu", "--max-memory", "cpu=8GiB", endpoint=hub.url)
    assert result.returncode == 2
    assert "qwen3-14b-dspark" in result.stderr and "--force" in result.stderr
    assert hub.log == []


def test_generate_with_a_catalog_pair_downloads_and_decodes(hub, tiny_repo, tmp_path):
    """`generate --model NAME`: the user's catalog names a target and a DSpark drafter on the (local) Hub;
    the plan admits it, the hub module fetches both, the loader pairs them, the loop decodes."""
    hub.repos["acme/tiny"] = tiny_repo
    hub.repos["acme/tiny-dspark"] = Repo({p.name: p.read_bytes() for p in (REFERENCE / "dspark").iterdir()},
                                         {"model.safetensors"})
    user = tmp_path / "config" / "dspark-chat" / "models.toml"
    user.parent.mkdir(parents=True)
    user.write_text(TINY_TARGET_TOML + TINY_DSPARK_PAIR_TOML)
    result = run(tmp_path, "generate", "--model", "tiny-dspark", "hello", "--json", "--max-new-tokens", "12",
                 "--dtype", "float32", "--device", "cpu", endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "drafter block 7 in int8" in out["engine"] and len(out["token_ids"]) == 12
    assert sum(len(s["draft_ids"]) for s in out["steps"]) > 0  # the drafter took part
    assert hub.requests(r"^/cdn/") and (cache_folder(tmp_path, "acme/tiny-dspark") / "refs" / "main").is_file()
    # The plan's overrides apply to --model: here one device, weights unquantised, offline from the cache;
    # the drafter in float drafts otherwise, and the text stays the target's.
    placed = run(tmp_path, "generate", "--model", "tiny-dspark", "hello", "--json", "--max-new-tokens", "12",
                 "--dtype", "float32", "--device-map", "cpu", "--quant", "none", "--float-drafter", offline=True)
    assert placed.returncode == 0, placed.stderr
    assert json.loads(placed.stdout)["token_ids"] == out["token_ids"]
    assert "drafter block 7, scheduler" in json.loads(placed.stdout)["engine"]
    clash = run(tmp_path, "generate", "--model", "tiny-dspark", "--target", "smollm2", "hi")
    assert clash.returncode == 2 and "not allowed with argument" in clash.stderr


def test_generate_with_an_eagle3_catalog_pair(hub, eagle3_target_dir, tmp_path):
    """`generate --model NAME` for a pair of kind eagle3: a speculators-format drafter on the (local) Hub."""
    hub.repos["acme/tiny6"] = Repo({p.name: p.read_bytes() for p in eagle3_target_dir.iterdir()}, {"model.safetensors"})
    drafter = EAGLE3 / "speculators" / "speculators_llama"
    hub.repos["acme/tiny6-eagle3"] = Repo({p.name: p.read_bytes() for p in drafter.iterdir()}, {"model.safetensors"})
    user = tmp_path / "config" / "dspark-chat" / "models.toml"
    user.parent.mkdir(parents=True)
    user.write_text(TINY_TARGET_TOML.replace("[targets.tiny]", "[targets.tiny6]").replace('"acme/tiny"', '"acme/tiny6"')
                    .replace("layers = 4", "layers = 6") + """
[pairs.tiny-eagle3]
target = "tiny6"
kind = "eagle3"
block_size = 5
drafter = "acme/tiny6-eagle3"
drafter_layers = 1
drafter_params = 90_000
drafter_dtype = "float32"
drafter_download_bytes = 380_000
license = "MIT"
""")
    result = run(tmp_path, "generate", "--model", "tiny-eagle3", "hello", "--json", "--max-new-tokens", "12",
                 "--dtype", "float32", "--device", "cpu", endpoint=hub.url)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "Eagle3 drafter, chain 5 in int8" in out["engine"] and len(out["token_ids"]) == 12
    assert sum(len(s["draft_ids"]) for s in out["steps"]) > 0  # the drafter took part
    plain = run(tmp_path, "generate", "--model", "tiny-eagle3", "hello", "--json", "--max-new-tokens", "12",
                "--dtype", "float32", "--device", "cpu", "--no-spec", offline=True)
    assert json.loads(plain.stdout)["token_ids"] == out["token_ids"]


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_plan_overrides_need_a_catalog_pair(command, capsys):
    from dspark_chat.engine import cli

    assert cli.main([command, "--quant", "8bit", *(["hi"] if command == "generate" else [])]) == 2
    assert "use them with --model" in capsys.readouterr().err
