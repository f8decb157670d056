"""Writing a drafter in a layout other engines load as it is: the speculators format (vLLM; llama.cpp's
convert_hf_to_gguf.py; a draft vocabulary travels as draft_vocab_size, the LM head's rows for it and
d2t/t2d) or DeepSpec's (vLLM, SGLang, llama.cpp, MLX; it drafts over the whole vocabulary, so a draft
vocabulary goes in this project's own draft_vocab.json, which other engines do not read).
`dspark-chat train` writes its drafters with write(); `dspark-chat export` converts one that exists."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import speculators
from .dspark import DRAFT_VOCAB_FILE, DSparkDrafter

FORMATS = ("speculators", "deepspec")
# This project's files beside a drafter (the scheduler's calibration, the training report): an export keeps them.
OWN_FILES = ("calibration.json", "training.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write(drafter: DSparkDrafter, config: dict, out: Path, fmt: str, dtype: torch.dtype, target, verifier: str,
          with_embeddings: bool = False) -> list[str]:
    """Write the drafter (float weights) into `out` in format `fmt`; `config` is its DeepSpec-style config.
    Returns notes for the user. ValueError when the format cannot express the drafter, saying what to do."""
    head = target.model.get_output_embeddings()
    notes = []
    vocab = None
    if fmt == "speculators":
        if config.get("architectures", ["Qwen3DSparkModel"])[0] != "Qwen3DSparkModel":
            raise ValueError(f"the speculators format holds Qwen3-style drafter layers; this drafter is a {config['architectures'][0]}: "
                             "export it with --format deepspec")
        if drafter.markov_head is not None and drafter.markov_head.kind != "vanilla":
            notes.append(f"llama.cpp converts DSpark drafters with the vanilla Markov head only; this one's is {drafter.markov_head.kind}")
        layout, tensors = speculators.write(drafter, config, verifier, target.model.config.architectures or [], head, dtype)
    else:
        layout, tensors = _deepspec(drafter, config, dtype, target, with_embeddings)
        vocab = drafter.draft_vocab
        if vocab is not None:
            notes.append(f"other engines draft over all {config['vocab_size']} tokens with this layout; the {len(vocab)}-token draft "
                         f"vocabulary is in {DRAFT_VOCAB_FILE}, which only dspark-chat reads (--format speculators carries it for all)")
    out.mkdir(parents=True, exist_ok=True)
    # Each file is written whole, then renamed: a run killed mid-write leaves the previous drafter readable.
    save_file(tensors, out / "model.safetensors.tmp", metadata={"format": "pt"})
    (out / "model.safetensors.tmp").replace(out / "model.safetensors")
    vocab_file = out / DRAFT_VOCAB_FILE
    if vocab is None:
        vocab_file.unlink(missing_ok=True)  # left by an earlier drafter in this folder: it would change this one
    else:
        (out / "draft_vocab.tmp").write_text(json.dumps({"ids": vocab.tolist()}))
        (out / "draft_vocab.tmp").replace(vocab_file)
    (out / "config.json.tmp").write_text(json.dumps(layout, indent=2))
    (out / "config.json.tmp").replace(out / "config.json")
    return notes


def _deepspec(drafter: DSparkDrafter, config: dict, dtype: torch.dtype, target, with_embeddings: bool):
    if drafter.first_slot:
        raise ValueError("DeepSpec's layout drafts from the anchor's own slot, and this drafter drafts after it "
                         "(sample_from_anchor false): export it with --format speculators")
    if config.get("sliding_windows"):
        raise ValueError("DeepSpec's layout has no sliding-window drafter layers, and this drafter has some: "
                         "export it with --format speculators")
    layout = {k: v for k, v in config.items() if k not in speculators.OWN_FIELDS}
    layout |= {"num_target_layers": target.num_layers, "torch_dtype": str(dtype).removeprefix("torch.")}
    tensors = {n: t for n, t in drafter.state_dict().items() if not n.startswith(("embed_tokens.", "lm_head.", "draft_head."))}
    head = drafter.markov_head
    if head is not None and head.pruned:  # DeepSpec's W2 has a row for every token: the others' bias is 0
        rows = head.markov_w2.weight
        tensors["markov_head.markov_w2.weight"] = rows.new_zeros(config["vocab_size"], rows.shape[1]).index_copy_(0, drafter.draft_vocab, rows)
    if with_embeddings:  # the target's tensors exactly, so that a loader recognises and shares them
        tensors["embed_tokens.weight"] = drafter.embed_tokens.weight
        tensors["lm_head.weight"] = drafter.lm_head.weight.clone()  # may be tied to the embeddings
    keep = ("embed_tokens.weight", "lm_head.weight")
    return layout, {k: v.detach().to("cpu", v.dtype if k in keep else dtype).contiguous() for k, v in tensors.items()}


def main(args) -> int:
    from .loading import load_drafter, load_target, model_dir, target_repo

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: choose another --out (an export writes over nothing)")
    source = model_dir(args.drafter)
    target = load_target(args.target, device="cpu")
    drafter = load_drafter(str(source), target, int8=False)
    config = drafter.config_dict
    saved = config.get("torch_dtype") or config.get("dtype")
    dtype = DTYPES[args.dtype or (saved if saved in DTYPES else "bfloat16")]
    verifier = args.verifier or (drafter.layout == "speculators" and speculators.verifier_name(
        json.loads((source / "config.json").read_text()))) or target_repo(target) or args.target
    notes = write(drafter, config, out, args.format, dtype, target, verifier)
    for name in OWN_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {out} ({args.format} format, {str(dtype).removeprefix('torch.')}, verifier {verifier})", file=sys.stderr)
    return 0
