"""Loading a pair: sharing the target's tensors, and every refusal with a message that says what is wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from dspark_chat.engine.loading import LoadError, gguf_as_safetensors, load_drafter, load_target

from .conftest import REFERENCE, drafter_copy


def test_identical_embeddings_and_head_are_shared_not_copied(tiny_target):
    drafter = load_drafter(str(REFERENCE / "dspark"), tiny_target)
    assert drafter.embed_tokens is tiny_target.model.get_input_embeddings()
    assert drafter.lm_head is tiny_target.model.get_output_embeddings()


def test_a_drafter_with_its_own_embeddings_keeps_them(tiny_target, tmp_path):
    folder = drafter_copy(tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] + 0.01
    save_file(weights, folder / "model.safetensors")
    drafter = load_drafter(str(folder), tiny_target)
    assert drafter.embed_tokens is tiny_target.model.get_input_embeddings()
    assert drafter.lm_head is not tiny_target.model.get_output_embeddings()
    torch.testing.assert_close(drafter.lm_head.weight, weights["lm_head.weight"])


def test_a_drafter_saved_without_embeddings_uses_the_targets(tiny_target, tmp_path):
    folder = drafter_copy(tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["embed_tokens.weight"], weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors")
    drafter = load_drafter(str(folder), tiny_target)
    assert drafter.lm_head is tiny_target.model.get_output_embeddings()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"vocab_size": 600}, "vocabulary size 600, target .* has 512: not a pair"),
        ({"hidden_size": 32}, "hidden size 32, target .* has 64: not a pair"),
        ({"target_layer_ids": [0, 7]}, "target_layer_id 7 is out of range; valid ids are -1..2"),
        ({"target_layer_ids": [0, 3]}, "target_layer_id 3 names the target's last layer"),
        ({"architectures": ["LlamaEagle3Model"]}, "architecture LlamaEagle3Model is not supported"),
        ({"markov_head_type": "transformer"}, "markov_head_type 'transformer' is unknown"),
    ],
)
def test_mismatched_pairs_are_refused(tiny_target, tmp_path, changes, message):
    with pytest.raises(LoadError, match=message):
        load_drafter(str(drafter_copy(tmp_path, **changes)), tiny_target)


def test_a_config_without_drafter_fields_is_refused(tiny_target, tmp_path):
    folder = drafter_copy(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["block_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="lacks 'block_size'; is this a DeepSpec DSpark/DFlash checkpoint"):
        load_drafter(str(folder), tiny_target)


def test_missing_and_unexpected_weights_are_named(tiny_target, tmp_path):
    folder = drafter_copy(tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["markov_head.markov_w1.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(LoadError, match="weights missing from the checkpoint: markov_head.markov_w1.weight"):
        load_drafter(str(folder), tiny_target)
    folder = drafter_copy(tmp_path / "b", "dflash")
    weights = load_file(folder / "model.safetensors")
    weights["confidence_head.proj.weight"] = torch.zeros(1, 64)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(LoadError, match="weights this config does not use: confidence_head.proj.weight"):
        load_drafter(str(folder), tiny_target)


@pytest.mark.parametrize("content", ['{"ids": []}', '{"ids": [5, 3]}', '{"ids": [1, 512]}', '{"ids": [1.5]}', '[1, 2]', "not json"])
def test_a_bad_draft_vocabulary_is_refused_with_what_to_do(tiny_target, tmp_path, content):
    folder = drafter_copy(tmp_path)
    (folder / "draft_vocab.json").write_text(content)
    with pytest.raises(LoadError, match="draft_vocab.json: .*delete it to draft over the whole vocabulary"):
        load_drafter(str(folder), tiny_target)


def test_pickle_weights_are_not_loaded(tiny_target, tmp_path):
    folder = drafter_copy(tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(LoadError, match="no .safetensors weights"):
        load_drafter(str(folder), tiny_target)


def test_bad_target_specs_say_what_to_do(tmp_path):
    with pytest.raises(LoadError, match="no such GGUF file"):
        load_target(str(tmp_path / "missing.gguf"))
    with pytest.raises(LoadError, match="not a model folder, a .gguf file or a Hub id"):
        load_target(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="has no config.json"):
        load_target(str(tmp_path / "empty"))
    with pytest.raises(LoadError, match="unknown dtype 'float8'"):
        load_target("smollm2", dtype="float8")


def write_tiny_gguf(path: Path, tokenizer) -> Path:
    """A one-layer llama GGUF file with float32 weights and the tests' byte-level BPE tokenizer: converted
    like the embedded model's, in a second rather than half a minute."""
    import gguf

    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]
    hidden, ff, heads, kv_heads = 16, 32, 2, 1
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in tokenizer.all_special_tokens else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    g = torch.Generator().manual_seed(0)
    shapes = {"token_embd.weight": (len(tokens), hidden), "output.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,), "blk.0.attn_q.weight": (hidden, hidden),
              "blk.0.attn_k.weight": (kv_heads * head_dim, hidden), "blk.0.attn_v.weight": (kv_heads * head_dim, hidden),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate.weight": (ff, hidden), "blk.0.ffn_up.weight": (ff, hidden),
              "blk.0.ffn_down.weight": (hidden, ff)}
    for name, shape in shapes.items():
        weight = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.1
        writer.add_tensor(name, weight.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_changed_gguf_file_replaces_its_older_conversion(tmp_path, monkeypatch, tokenizer):
    """A reinstalled package leaves a new GGUF file at the same path: its conversion replaces the old copy
    (half a GB for SmolLM2) instead of adding to it, and the conversions of other files stay."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "models").mkdir()
    gguf = write_tiny_gguf(tmp_path / "models" / "tiny.gguf", tokenizer)
    converting = []
    first = gguf_as_safetensors(gguf, lambda: converting.append(gguf.stat().st_mtime))
    other = first.parent / "another-model-0123456789-1-1"  # another file's conversion
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert gguf_as_safetensors(gguf, lambda: converting.append(gguf.stat().st_mtime)) == first  # unchanged: reused
    assert len(converting) == 1
    later = gguf.stat().st_mtime + 60
    os.utime(gguf, (later, later))
    second = gguf_as_safetensors(gguf, lambda: converting.append(gguf.stat().st_mtime))
    assert second != first and (second / "config.json").is_file() and converting[1:] == [later]
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([second.name, other.name])
    assert AutoTokenizer.from_pretrained(second)("hello").input_ids == tokenizer("hello").input_ids
    target = load_target(str(gguf), "float32", "cpu")  # the converted copy loads as a target
    assert target.model.config.model_type == "llama" and target.vocab_size == len(tokenizer.get_vocab())


def test_no_folder_of_the_checkout_shadows_an_installed_package():
    """The package's folders sit at the top of the checkout, which is on sys.path when the tests or `python -m` run
    there: a folder named like an installed package would be imported in its place (transformers 5.25 imports the
    `kernels` package, and a top-level kernels/ broke every import of transformers' models)."""
    import importlib.metadata

    from dspark_chat.engine.catalog import tomllib  # tomli before Python 3.11

    root = Path(__file__).parent.parent
    folders = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    installed = importlib.metadata.packages_distributions()
    assert not [folder for folder in folders if folder in installed and "dspark-chat" not in installed[folder]]
