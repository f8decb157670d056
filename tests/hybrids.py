"""Tiny random hybrid targets: one per family transformers runs whose layers keep a recurrent or convolution
state besides (or instead of) keys and values. Hidden 64, 4 layers mixing those layers with attention, the
tests' 512-token vocabulary, and weights drawn with a large initializer_range so that greedy text varies."""

from __future__ import annotations

import json
from pathlib import Path

import torch

COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, initializer_range=0.2, max_position_embeddings=1024,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
GATED_DELTANET = dict(layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
                      linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                      linear_conv_kernel_dim=4)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
              mamba_chunk_size=16)
MIXED = ["linear_attention", "full_attention", "linear_attention", "full_attention"]

# model_type -> config fields. Every family but LFM2 keeps a recurrent state; LFM2 keeps convolution states only.
FAMILIES: dict[str, dict] = {
    "qwen3_5_text": ATTENTION | GATED_DELTANET | dict(intermediate_size=128),
    "qwen3_5_moe_text": ATTENTION | GATED_DELTANET | dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_next": ATTENTION | GATED_DELTANET | dict(
        intermediate_size=128, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32),
    "lfm2": dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, block_auto_adjust_ff_dim=False,
                 conv_L_cache=3, layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "nemotron_h": ATTENTION | dict(
        layers_block_type=["linear_attention", "mlp", "full_attention", "moe"], intermediate_size=128,
        mamba_num_heads=4, mamba_head_dim=32, n_groups=1, ssm_state_size=16, conv_kernel=4, expand=2, chunk_size=16,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32),
    "granitemoehybrid": ATTENTION | MAMBA2 | dict(
        layer_types=MIXED, intermediate_size=64, shared_intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "falcon_h1": ATTENTION | MAMBA2 | dict(intermediate_size=128, mamba_d_ssm=128),
    "bamba": ATTENTION | MAMBA2 | dict(intermediate_size=128, attn_layer_indices=[1, 3]),
    "jamba": ATTENTION | dict(
        intermediate_size=128, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
        use_mamba_kernels=False),
}


def build(family: str, seed: int = 0, **changes):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **(COMMON | FAMILIES[family] | changes))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save(family: str, folder: Path, tokenizer, seed: int = 0, **changes) -> Path:
    """A target folder (safetensors, config, the tests' tokenizer) for a tiny model of `family`."""
    model = build(family, seed, **changes)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_drafter(folder: Path, vocab_size: int, seed: int = 0, std: float = 0.8) -> Path:
    """A random DSpark drafter (block 4, Markov head, confidence head) for the tiny hybrids, in DeepSpec's layout."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    from dspark_chat.engine.dspark import DSparkDrafter

    fields = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        architectures=["Qwen3DSparkModel"], block_size=4, num_hidden_layers=1, num_target_layers=4,
        target_layer_ids=[0, 2], mask_token_id=3, layer_types=["full_attention"], markov_rank=4,
        markov_head_type="vanilla", enable_confidence_head=True, confidence_head_with_markov=True, num_anchors=8,
    )
    torch.manual_seed(seed)
    config = Qwen3Config(**fields)
    drafter = DSparkDrafter(config)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * std)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in drafter.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder
