"""What does not fit is refused, saying what is wrong and what to do: speculators-format drafters that are
not for the target, checkpoints the format reader cannot take, and models that would need their own code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark_chat.engine.catalog import BUILTIN, load_catalog
from dspark_chat.engine.hardware import PlanError, plan_pair
from dspark_chat.engine.loading import LoadError, load_drafter, load_target, target_repo
from .conftest import SPECULATORS, TINY_TARGET_TOML

PRUNED = "dspark_anchor_vanilla_pruned"


def copy(tmp_path, variant=PRUNED, change=None, tensors=None):
    """A writable copy of a reference drafter; change(config) edits its config.json, tensors(state) its weights."""
    out = tmp_path / variant
    shutil.copytree(SPECULATORS / variant, out)
    if change:
        config = json.loads((out / "config.json").read_text())
        change(config)
        (out / "config.json").write_text(json.dumps(config))
    if tensors:
        state = load_file(out / "model.safetensors")
        tensors(state)
        save_file(state, out / "model.safetensors")
    return out


def decoder(field, value):
    return lambda config: config["transformer_layer_config"].__setitem__(field, value)


def top(field, value):
    return lambda config: config.__setitem__(field, value)


@pytest.mark.parametrize("change, message", [
    (decoder("vocab_size", 600), "has vocabulary size 600, target .* has 512: not a pair"),
    (decoder("hidden_size", 32), "has hidden size 32, target .* has 64: not a pair"),
    (top("target_hidden_size", 128), "has target_hidden_size 128, target .* has hidden size 64: not a pair"),
    (top("aux_hidden_state_layer_ids", [1, 4]), "aux_hidden_state_layer_id 4 names the target's last layer, whose hidden state "
                                                "transformers returns after the final norm; valid ids are 0..3"),
    (top("aux_hidden_state_layer_ids", [1, 9]), "aux_hidden_state_layer_id 9 is out of range; valid ids are 0..3"),
    (top("mask_token_id", None), "config.json lacks 'mask_token_id', which a speculators dspark drafter needs"),
    (top("speculators_model_type", "medusa"), "speculators_model_type 'medusa': dspark-chat reads speculators' dspark, dflash "
                                              "and eagle3 drafters"),
    (decoder("model_type", "gemma4_text"), "transformer_layer_config has model_type 'gemma4_text'; speculators builds its draft "
                                           "decoders from qwen3 or llama configs, and only those are read"),
    (top("markov_head_type", "transformer"), "markov_head_type 'transformer' is unknown"),
])
def test_a_drafter_that_does_not_fit_is_refused(change, message, tiny_target, tmp_path):
    with pytest.raises(LoadError, match=message):
        load_drafter(str(copy(tmp_path, change=change)), tiny_target)


@pytest.mark.parametrize("tensors, message", [
    (lambda s: s.pop("d2t"), "draft_vocab_size 256 is below the vocabulary size 512 but the weights have no d2t"),
    (lambda s: s.__setitem__("d2t", -torch.arange(256)), "d2t does not map the 256 draft ids to distinct target ids"),
    (lambda s: s.__setitem__("t2d", torch.ones(512, dtype=torch.bool)), "t2d does not mark exactly the target ids d2t maps to"),
    (lambda s: s.pop("lm_head.weight"), "no lm_head.weight, the LM head's rows for the 256-token draft vocabulary"),
])
def test_a_broken_draft_vocabulary_is_refused(tensors, message, tiny_target, tmp_path):
    with pytest.raises(LoadError, match=message):
        load_drafter(str(copy(tmp_path, tensors=tensors)), tiny_target)


def test_a_drafter_made_for_another_verifier_is_refused_with_the_way_out(tiny_target, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_target, "name", "acme/tiny-instruct")
    with pytest.raises(LoadError) as e:
        load_drafter(str(SPECULATORS / PRUNED), tiny_target)
    assert str(e.value) == (
        f"drafter {SPECULATORS / PRUNED} was made for acme/tiny (its speculators_config.verifier.name_or_path), and the "
        "target is acme/tiny-instruct: run it with --target acme/tiny; or, if acme/tiny-instruct has that model's weights "
        "(a copy or a quantisation of it), copy the drafter's folder and set that name to acme/tiny-instruct in its config.json")
    monkeypatch.setattr(tiny_target, "name", "ACME/Tiny@main")  # the same repository: case and revision aside
    load_drafter(str(SPECULATORS / PRUNED), tiny_target)
    # A verifier named by a local path says nothing about a target.
    monkeypatch.setattr(tiny_target, "name", "acme/tiny-instruct")
    load_drafter(str(copy(tmp_path, change=lambda c: c["speculators_config"]["verifier"].__setitem__("name_or_path", "/data/tiny"))),
                 tiny_target)


def test_the_target_s_hub_name_is_known_from_its_spec_or_its_cache_folder(tiny_target, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    for name, repo in [("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"), ("Qwen/Qwen3-8B@main", "Qwen/Qwen3-8B"),
                       (str(snapshot), "acme/tiny"), (str(tmp_path), None)]:
        monkeypatch.setattr(tiny_target, "name", name)
        assert target_repo(tiny_target) == repo


def test_a_checkpoint_without_sample_from_anchor_has_the_1_plus_n_block(tiny_target, tmp_path):
    """speculators wrote no such field before July 2026, when every export was 1+N (llama.cpp reads it so too)."""
    drafter = load_drafter(str(copy(tmp_path, change=lambda c: c.pop("sample_from_anchor"))), tiny_target)
    assert (drafter.first_slot, drafter.block_size, drafter.slots) == (1, 6, 7)


def test_a_target_that_needs_its_own_code_is_refused(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "minicpm5", "architectures": ["MiniCPM5ForCausalLM"],
                                                    "auto_map": {"AutoModelForCausalLM": "modeling_minicpm5.MiniCPM5ForCausalLM"}}))
    with pytest.raises(LoadError, match="model_type 'minicpm5' is not one transformers .* has code for; it would run only with "
                                        "the repository's own code \\(trust_remote_code\\), which dspark-chat never runs"):
        load_target(str(folder))


def test_a_catalog_pair_whose_target_needs_its_own_code_is_refused_before_any_download(tmp_path):
    toml = tmp_path / "models.toml"
    toml.write_text(TINY_TARGET_TOML + "remote_code = true\n" + """
[pairs.tiny-lookup]
target = "tiny"
kind = "prompt-lookup"
block_size = 10
license = "MIT"
""")
    catalog = load_catalog([BUILTIN, toml])
    assert catalog.targets["tiny"].remote_code
    with pytest.raises(PlanError, match="its target acme/tiny runs in transformers only with the repository's own code "
                                        "\\(trust_remote_code\\), and dspark-chat never runs a model's own code: choose another pair"):
        plan_pair(catalog.pairs["tiny-lookup"])
