"""Exporting drafters: written in the speculators format or DeepSpec's layout and loaded back, a drafter
proposes what it proposed before; the speculators export is what llama.cpp's converter reads (its
convert_hf_to_gguf.py, DSparkModel, checked here field by field since the converter is not on PyPI at a
version that has it); what a layout cannot express is refused with the way out."""

from __future__ import annotations

import json
import shutil
from itertools import islice

import pytest
import torch
from safetensors import safe_open

from dspark_chat.engine import export
from dspark_chat.engine.cli import main as cli
from dspark_chat.engine.decode import decode
from dspark_chat.engine.loading import load_drafter
from .conftest import REFERENCE, SPECULATORS, Forcing, drafter_copy

# What llama.cpp b11434's converter (conversion/qwen.py DSparkModel on DFlashModel, gguf-py tensor_mapping) reads.
CONVERTER_ARCHITECTURES = ("Qwen3DSparkModel", "DSparkDraftModel", "DSparkSpeculator", "Lfm2DSparkDraftModel", "LingDSparkModel")
CONVERTER_DECODER_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                            "head_dim", "intermediate_size", "rms_norm_eps", "rope_parameters")
LAYER_TENSORS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
                 "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
TOP_TENSORS = ("fc.weight", "hidden_norm.weight", "norm.weight", "markov_head.markov_w1.weight", "markov_head.markov_w2.weight",
               "confidence_head.proj.weight", "confidence_head.proj.bias", "lm_head.weight", "d2t", "t2d")


def proposals(target, drafter, prompt, greedy, rounds=8):
    """The drafter's own blocks over rounds that accept 3, 0, 5, 1 ... drafts."""
    target.rewind(0)
    drafter.rewind(0)
    forcing = Forcing(drafter, len(prompt), greedy, [3, 0, 5, 1, 7, 2])
    list(islice(decode(target, forcing, prompt, max_new_tokens=48), rounds + 1))
    return forcing.own


def assert_converter_reads(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"][0] in CONVERTER_ARCHITECTURES and "auto_map" not in config
    decoder = config["transformer_layer_config"]
    assert all(field in decoder for field in CONVERTER_DECODER_FIELDS)
    assert config["markov_head_type"] == "vanilla" and isinstance(config["sample_from_anchor"], bool)
    for field in ("block_size", "mask_token_id", "aux_hidden_state_layer_ids", "draft_vocab_size"):
        assert isinstance(config[field], (int, list)), field
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = set(f.keys())
        layers = {f"layers.{i}.{t}.weight" for i in range(decoder["num_hidden_layers"]) for t in LAYER_TENSORS}
        assert names <= layers | set(TOP_TENSORS) and layers <= names
        vocab = config["draft_vocab_size"]
        if vocab < decoder["vocab_size"]:  # the converter writes d2t + arange as the draft tokens' target ids
            ids = f.get_tensor("d2t") + torch.arange(vocab)
            assert ids.dtype == torch.int64 and len(ids.unique()) == vocab and 0 <= ids.min() and ids.max() < decoder["vocab_size"]
            assert f.get_tensor("lm_head.weight").shape == (vocab, decoder["hidden_size"])
            assert f.get_tensor("markov_head.markov_w2.weight").shape[0] == vocab
        else:
            assert "lm_head.weight" not in names and "d2t" not in names


@pytest.mark.parametrize("variant", ["dspark", "dspark_rnn"])
def test_a_deepspec_drafter_with_a_draft_vocabulary_exports_to_speculators_and_back(variant, tiny_target, reference, tmp_path):
    source = drafter_copy(tmp_path, variant)
    vocab = list(range(1, 512, 3))
    (source / "draft_vocab.json").write_text(json.dumps({"ids": vocab}))
    before = load_drafter(str(source), tiny_target, int8=False)
    notes = export.write(before, before.config_dict, tmp_path / "out", "speculators", torch.float32, tiny_target, "acme/tiny")
    assert notes == ([] if variant == "dspark" else ["llama.cpp converts DSpark drafters with the vanilla Markov head only; this one's is rnn"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["draft_vocab_size"] == len(vocab) and config["aux_hidden_state_layer_ids"] == [1, 3]
    assert config["speculators_config"]["verifier"] == {"name_or_path": "acme/tiny", "architectures": ["Qwen3ForCausalLM"]}
    if variant == "dspark":
        assert_converter_reads(tmp_path / "out")
    after = load_drafter(str(tmp_path / "out"), tiny_target, int8=False)
    assert after.layout == "speculators" and after.draft_vocab.tolist() == vocab and after.markov_head.pruned
    for prompt, greedy in zip(reference["prompts"][:2], reference["baseline_output_ids_extended"]):
        assert proposals(tiny_target, after, prompt, greedy) == proposals(tiny_target, before, prompt, greedy)


@pytest.mark.parametrize("variant", ["dspark_anchor_vanilla_pruned", "dspark_bonus_window", "dflash_bonus_pruned"])
def test_a_speculators_drafter_exports_to_speculators_unchanged(variant, tiny_target, reference, tmp_path):
    before = load_drafter(str(SPECULATORS / variant), tiny_target, int8=False)
    export.write(before, before.config_dict, tmp_path / "out", "speculators", torch.float32, tiny_target, "acme/tiny")
    theirs = json.loads((SPECULATORS / variant / "config.json").read_text())
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    for field in ("speculators_model_type", "draft_vocab_size", "block_size", "aux_hidden_state_layer_ids", "mask_token_id",
                  "sample_from_anchor", "sliding_window_non_causal", "markov_rank", "markov_head_type", "enable_confidence_head",
                  "confidence_head_with_markov"):
        assert ours.get(field) == theirs.get(field), field
    for field in ("layer_types", "sliding_window", "num_hidden_layers", "hidden_size", "head_dim", "rope_parameters"):
        assert ours["transformer_layer_config"][field] == theirs["transformer_layer_config"][field], field
    with safe_open(SPECULATORS / variant / "model.safetensors", "pt") as a, safe_open(tmp_path / "out" / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_a_pruned_speculators_drafter_exports_to_deepspec_and_back(tiny_target, reference, tmp_path):
    before = load_drafter(str(SPECULATORS / "dspark_anchor_vanilla_pruned"), tiny_target, int8=False)
    notes = export.write(before, before.config_dict, tmp_path / "out", "deepspec", torch.float32, tiny_target, "acme/tiny")
    assert len(notes) == 1 and "other engines draft over all 512 tokens" in notes[0]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["target_layer_ids"] == [0, 2]
    assert not {"draft_vocab_size", "sample_from_anchor", "sliding_windows"} & set(config)
    after = load_drafter(str(tmp_path / "out"), tiny_target, int8=False)
    assert after.layout == "deepspec" and torch.equal(after.draft_vocab, before.draft_vocab)
    for prompt, greedy in zip(reference["prompts"][2:], reference["baseline_output_ids_extended"][2:]):
        assert proposals(tiny_target, after, prompt, greedy) == proposals(tiny_target, before, prompt, greedy)


@pytest.mark.parametrize("variant, why", [("dspark_bonus_rnn", "sample_from_anchor false"), ("dflash_anchor_window", "sliding-window")])
def test_deepspec_s_layout_refuses_what_it_cannot_hold(variant, why, tiny_target, tmp_path):
    drafter = load_drafter(str(SPECULATORS / variant), tiny_target, int8=False)
    with pytest.raises(ValueError, match=why) as e:
        export.write(drafter, drafter.config_dict, tmp_path / "out", "deepspec", torch.float32, tiny_target, "acme/tiny")
    assert "export it with --format speculators" in str(e.value) and not (tmp_path / "out").exists()


def test_the_export_command_writes_a_new_folder_only(tiny_target_dir, tmp_path, capsys):
    out = tmp_path / "exported"
    assert cli(["export", str(REFERENCE / "dspark"), "--format", "speculators", "--out", str(out),
                "--target", str(tiny_target_dir), "--verifier", "acme/tiny"]) == 0
    assert "wrote" in capsys.readouterr().err and json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert cli(["export", str(REFERENCE / "dspark"), "--format", "deepspec", "--out", str(out), "--target", str(tiny_target_dir)]) == 2
    assert "exists and is not an empty folder: choose another --out" in capsys.readouterr().err


@pytest.mark.slow
def test_the_shipped_drafter_exports_for_llama_cpp_and_drafts_as_before(smollm2, tmp_path):
    """The shipped SmolLM2 drafter (DeepSpec layout + draft_vocab.json) as other engines get it: its 8,192-token
    draft vocabulary as d2t, the rows it needs, SmolLM2 named; loaded back, the same blocks."""
    from dspark_chat.engine.catalog import SHIPPED_DRAFTERS

    source = SHIPPED_DRAFTERS["smollm2"]
    before = load_drafter(str(source), smollm2, int8=False)
    export.write(before, before.config_dict, tmp_path / "out", "speculators", torch.bfloat16, smollm2, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert_converter_reads(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["draft_vocab_size"] == 8192 and config["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]
    shutil.copy(source / "calibration.json", tmp_path / "out")
    after = load_drafter(str(tmp_path / "out"), smollm2, int8=False)
    ids = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that adds two numbers."}],
                                                add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    blocks = []
    for drafter in (before, after):
        smollm2.rewind(0)
        drafter.rewind(0)
        blocks.append([s.draft_ids for s in decode(smollm2, drafter, ids, max_new_tokens=12)])
    assert blocks[0] == blocks[1]
