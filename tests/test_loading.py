"""Loading a pair: sharing the target's tensors, and every refusal with a message that says what is wrong."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from dspark_chat.engine.loading import LoadError, embedded_gguf, gguf_as_safetensors, load_drafter, load_target

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


def test_a_changed_gguf_file_replaces_its_older_conversion(tmp_path, monkeypatch):
    """A reinstalled package leaves a new GGUF file at the same path: its conversion replaces the old copy
    (half a GB for SmolLM2) instead of adding to it, and the conversions of other files stay."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gguf = tmp_path / "models" / embedded_gguf().name
    gguf.parent.mkdir()
    shutil.copy(embedded_gguf(), gguf)
    first = gguf_as_safetensors(gguf)
    other = first.parent / "another-model-0123456789-1-1"  # another file's conversion
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert gguf_as_safetensors(gguf) == first  # unchanged: reused
    later = gguf.stat().st_mtime + 60
    os.utime(gguf, (later, later))
    second = gguf_as_safetensors(gguf)
    assert second != first and (second / "config.json").is_file()
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([second.name, other.name])
    assert AutoTokenizer.from_pretrained(second)("hello").input_ids
    shutil.rmtree(tmp_path)  # 600 MB that pytest would otherwise keep for three runs
