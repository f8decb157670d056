"""Targets placed by accelerate (part of the weights offloaded to disk) or quantised by bitsandbytes:
speculative decoding stays lossless relative to the target as loaded."""

from __future__ import annotations

import pytest
import torch

from dspark_chat.engine.decode import decode
from dspark_chat.engine.engine import Engine
from dspark_chat.engine.loading import load_drafter, load_target
from dspark_chat.engine.sampling import Sampling

from .conftest import REFERENCE


def greedy(target, drafter, prompt, n=24):
    target.rewind(0)
    if drafter is not None:
        drafter.rewind(0)
    return [t for s in decode(target, drafter, prompt, Sampling(), n) for t in s.token_ids]


def test_disk_offloaded_target_decodes_losslessly(tiny_target_dir, reference, tmp_path):
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
                  "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    target = load_target(str(tiny_target_dir), "float32", placement={"device_map": device_map, "offload_folder": str(tmp_path)})
    assert target.model.hf_device_map["model.layers.1"] == "disk"
    assert hasattr(target.model.model.layers[1], "_hf_hook")  # accelerate loads its weights at each call
    drafter = load_drafter(str(REFERENCE / "dspark"), target)
    for i, prompt in enumerate(reference["prompts"][:2]):
        plain = greedy(target, None, prompt)
        assert plain == reference["baseline_output_ids"][i][:24]  # the same model, however it is placed
        assert greedy(target, drafter, prompt) == plain


@pytest.mark.parametrize("bits", [8, 4])
def test_bitsandbytes_target_decodes_losslessly(tiny_target_dir, reference, bits):
    from transformers import BitsAndBytesConfig

    # 8-bit as the fit planner loads it: without LLM.int8's batch-dependent outlier decomposition.
    quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0) if bits == 8 else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    target = load_target(str(tiny_target_dir), "float32", placement={"quantization_config": quant, "device_map": {"": "cpu"}})
    kind = "Linear8bitLt" if bits == 8 else "Linear4bit"
    assert type(target.model.model.layers[0].mlp.down_proj).__name__ == kind
    engine = Engine(target, load_drafter(str(REFERENCE / "dspark"), target))
    for prompt in reference["prompts"]:
        plain = greedy(target, None, prompt)
        assert greedy(target, engine.drafter, prompt) == plain
