"""Downloads from the Hugging Face Hub into its shared cache (HF_HOME / HF_HUB_CACHE, the same one
transformers and the `hf` command use): only what loading needs, with a free-disk check before the first
byte, resumable partial files, and progress as events. Offline, or with no network, the cache alone.

huggingface_hub >= 2 writes each download to a temporary file of its own and deletes it when interrupted,
so the transfer itself is done here: into blobs/<etag>.incomplete (the name older huggingface_hub versions
used too), resumed with an HTTP Range request, then renamed to the blob. hf_hub_download then links the
snapshot to the blob, so the cache layout stays huggingface_hub's own."""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import httpx2  # huggingface_hub's HTTP client: its transport errors mean "no network"
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import http_get, repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers

# Configs, tokenizers, chat templates and safetensors weights, at the top of the repository. Never pickle
# checkpoints (.bin, .pt, .pth): unpickling runs code from the file.
WANTED = (".json", ".safetensors", ".jinja", ".model", ".txt", ".tiktoken")
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DISK_SLACK = 256 << 20  # keep this much free after a download: a full disk breaks everything else too


class HubError(ValueError):
    """A download that cannot happen; the message says what to do."""


class _Unreachable(Exception):
    pass


@dataclass(frozen=True)
class Progress:
    """One step of a pull: bytes of this file on disk and of all files of the pull (files already in the
    cache and resumed partial files count as done from the start)."""

    repo_id: str
    filename: str
    file_done: int
    file_size: int
    done: int
    total: int


OnProgress = Callable[[Progress], None]


@dataclass
class RemoteFile:
    name: str
    size: int
    blob: str  # the cache's blob name: sha256 for LFS files, the git blob id otherwise
    have: int = 0  # bytes already in the cache (the whole size, or a partial file's)


@dataclass
class RepoPlan:
    repo_id: str
    revision: str
    commit: str
    files: list[RemoteFile]

    @property
    def folder(self) -> Path:
        return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=self.repo_id, repo_type="model")

    @property
    def snapshot(self) -> Path:
        return self.folder / "snapshots" / self.commit

    @property
    def missing(self) -> int:
        return sum(f.size - f.have for f in self.files)


def pull_command(repo_id: str, revision: str = "main") -> str:
    return f"dspark-chat pull {repo_id}" + ("" if revision == "main" else f"@{revision}")


def wanted(name: str) -> bool:
    return "/" not in name and name.endswith(WANTED)


def fetch(repo_id: str, revision: str = "main", on_progress: OnProgress | None = None) -> Path:
    """The snapshot folder of one repository, downloading what is missing."""
    return pull([(repo_id, revision)], on_progress)[0]


def pull(repos: list[tuple[str, str]], on_progress: OnProgress | None = None) -> list[Path]:
    """Snapshot folders of several repositories (a target and its drafter), checked for disk space together."""
    if constants.HF_HUB_OFFLINE:
        return [cached(repo, revision, "HF_HUB_OFFLINE is set") for repo, revision in repos]
    try:
        plans = [plan(repo, revision) for repo, revision in repos]
    except _Unreachable as e:
        return [cached(repo, revision, f"the Hugging Face Hub cannot be reached ({e})") for repo, revision in repos]
    check_disk(plans)
    return download(plans, on_progress)


class _hub_errors:
    """Hub errors as HubError with what to do; network failures as _Unreachable."""

    def __init__(self, repo_id: str, revision: str):
        self.repo_id, self.revision = repo_id, revision

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        login = "log in with `hf auth login` or set HF_TOKEN to a token that can read it"
        if isinstance(error, GatedRepoError):
            raise HubError(f"{self.repo_id} is gated: accept its conditions at {constants.ENDPOINT}/{self.repo_id}, "
                           f"then {login}") from error
        if isinstance(error, RepositoryNotFoundError):
            raise HubError(f"{self.repo_id} is not on the Hub, or it is private: check the name; if it is private, "
                           f"{login}") from error
        if isinstance(error, RevisionNotFoundError):
            raise HubError(f"{self.repo_id} has no revision {self.revision!r}") from error
        if isinstance(error, (OfflineModeIsEnabled, httpx2.TransportError)):
            raise _Unreachable(f"{type(error).__name__}") from error
        if isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code >= 500:
            raise _Unreachable(f"HTTP {error.response.status_code}") from error
        return False


def plan(repo_id: str, revision: str = "main") -> RepoPlan:
    """What to fetch from a repository, from one listing call, and how much of it the cache already has."""
    with _hub_errors(repo_id, revision):
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    names = [s.rfilename for s in info.siblings or []]
    if not any(n.endswith(".safetensors") for n in names if wanted(n)):
        pickled = [n for n in names if n.endswith(PICKLED)]
        raise HubError(f"{repo_id} has no .safetensors weights" + (
            f" (only {', '.join(pickled[:3])}: pickle checkpoints are not downloaded, since loading them runs code)"
            if pickled else ""))
    out = RepoPlan(repo_id, revision, info.sha, [])
    for s in info.siblings:
        if not wanted(s.rfilename):
            continue
        size, blob = (s.lfs.size, s.lfs.sha256) if s.lfs else (s.size or 0, s.blob_id)
        f = RemoteFile(s.rfilename, size, blob)
        path = out.folder / "blobs" / blob
        if (out.snapshot / f.name).is_file() or path.is_file():
            f.have = size
        elif (partial := path.with_name(blob + ".incomplete")).is_file():
            f.have = min(partial.stat().st_size, size)
        out.files.append(f)
    return out


def check_disk(plans: list[RepoPlan]) -> None:
    needed = sum(p.missing for p in plans)
    if not needed:
        return
    where = Path(constants.HF_HUB_CACHE)
    probe = next(p for p in (where, *where.parents) if p.exists())
    free = shutil.disk_usage(probe).free
    if needed + DISK_SLACK > free:
        raise HubError(
            f"{' and '.join(p.repo_id for p in plans)} need {needed / 1e9:.1f} GB more in {where}, which has "
            f"{free / 1e9:.1f} GB free: free some space (`hf cache prune` removes unused revisions) or point "
            "HF_HUB_CACHE at a bigger disk"
        )


def download(plans: list[RepoPlan], on_progress: OnProgress | None = None) -> list[Path]:
    total = sum(f.size for p in plans for f in p.files)
    done = sum(f.have for p in plans for f in p.files)
    for p in plans:
        for f in p.files:
            if not (p.snapshot / f.name).is_file():
                try:
                    done = _fetch_file(p, f, done, total, on_progress)
                except _Unreachable as e:
                    raise HubError(f"downloading {f.name} from {p.repo_id} failed ({e}): run "
                                   f"`{pull_command(p.repo_id, p.revision)}` again, it resumes where it stopped") from e
        if p.revision != p.commit:
            # what hf_hub_download(revision=...) records too: offline lookups of "main" find the commit here
            ref = p.folder / "refs" / p.revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(p.commit)
    return [p.snapshot for p in plans]


class _Counter:
    """Stands in for tqdm in http_get (its documented tqdm_class hook) and turns byte counts into events."""

    def __init__(self, report: Callable[[int], None], *, initial: int = 0, **_):
        self.report, self.n = report, initial

    def update(self, n: int) -> None:
        self.n += n  # negative when a server ignores Range and the file restarts
        self.report(self.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fetch_file(p: RepoPlan, f: RemoteFile, done: int, total: int, on_progress: OnProgress | None) -> int:
    start = done - f.have

    def report(file_done: int) -> None:
        if on_progress:
            on_progress(Progress(p.repo_id, f.name, file_done, f.size, start + file_done, total))

    with _hub_errors(p.repo_id, p.revision):
        blob = p.folder / "blobs" / f.blob
        if not blob.is_file():
            url = hf_hub_url(p.repo_id, f.name, revision=p.commit)
            meta = get_hf_file_metadata(url)  # follows the Hub's own redirects, stops at a CDN's
            blob = p.folder / "blobs" / (meta.etag or f.blob)
            headers = build_hf_headers()
            if urlsplit(meta.location).netloc != urlsplit(url).netloc:
                headers.pop("authorization", None)  # a signed CDN address: the token stays with the Hub
            lock = Path(constants.HF_HUB_CACHE) / ".locks" / p.folder.name / f"{blob.name}.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            blob.parent.mkdir(parents=True, exist_ok=True)
            with WeakFileLock(lock):  # the lock hf_hub_download takes for the same blob
                if not blob.is_file():
                    partial = blob.with_name(blob.name + ".incomplete")
                    with partial.open("r+b" if partial.exists() else "wb") as out:
                        resume = out.seek(0, os.SEEK_END)
                        report(resume)
                        http_get(meta.location, out, resume_size=resume, headers=headers, expected_size=f.size,
                                 displayed_filename=f.name, tqdm_class=functools.partial(_Counter, report))
                    os.replace(partial, blob)
        hf_hub_download(p.repo_id, f.name, revision=p.commit)  # links snapshots/<commit>/<name> to the blob
    return start + f.size


def cache_status(repo_id: str, revision: str = "main") -> tuple[Path | None, list[str]]:
    """The cached snapshot of a repository (None if there is none) and what it lacks to be loaded."""
    config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(config, str):
        return None, ["config.json"]
    snapshot = Path(config).parent
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return snapshot, [s for s in shards if not (snapshot / s).is_file()]
    return snapshot, [] if any(snapshot.glob("*.safetensors")) else ["*.safetensors weights"]


def cached(repo_id: str, revision: str, reason: str) -> Path:
    snapshot, missing = cache_status(repo_id, revision)
    if snapshot is not None and not missing:
        return snapshot
    what = "is not in" if snapshot is None else f"is incomplete in ({', '.join(missing[:4])} missing)"
    raise HubError(
        f"{repo_id}{'' if revision == 'main' else '@' + revision} {what} the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and {reason}: run `{pull_command(repo_id, revision)}` with network access "
        "(or copy a cache that has it and point HF_HUB_CACHE at it)"
    )


def json_lines(stream=None) -> OnProgress:
    """Events as JSON lines, for a parent process (the app) to read."""
    stream = stream or sys.stdout

    def emit(event: Progress) -> None:
        stream.write(json.dumps({"event": "progress", **asdict(event)}) + "\n")
        stream.flush()

    return emit


def progress_bars(stream=None) -> OnProgress:
    """Two tqdm bars on stderr: the whole pull, and the file being transferred."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def show(event: Progress) -> None:
        if "all" not in bars:
            bars["all"] = tqdm(total=event.total, initial=event.done, unit="B", unit_scale=True,
                               desc="total", position=0, file=stream or sys.stderr)
        if bars.get("name") != event.filename:
            if "file" in bars:
                bars["file"].close()
            bars["name"] = event.filename
            bars["file"] = tqdm(total=event.file_size, initial=event.file_done, unit="B", unit_scale=True,
                                desc=event.filename[-40:], position=1, leave=False, file=stream or sys.stderr)
        bars["all"].update(event.done - bars["all"].n)
        bars["file"].update(event.file_done - bars["file"].n)
        if event.done >= event.total:
            bars["file"].close()
            bars["all"].close()

    return show
