"""The DSpark drafter for Gemma 4 targets (DeepSpec's Gemma4DSparkModel), for inference.

The decode-time machinery (context cache, proposing, Markov and confidence heads) is DSparkDrafter's;
this module swaps in the Gemma 4 parts, each as DeepSpec's Gemma4DSparkModel builds it:
- attention with head size `global_head_dim`, q/k RMS norms, an unscaled RMS norm on v, and softmax
  scale 1 (the norms already fix the logit scale); with `attention_k_eq_v` there is no v_proj, the
  values are the raw key projection, over `num_global_key_value_heads` heads;
- RoPE of the target's full-attention layers (`rope_parameters["full_attention"]`, usually
  "proportional": only the first `partial_rotary_factor` of the frequencies rotate);
- sandwich norms around attention and MLP, a gated MLP with `hidden_activation`, and the stored
  per-layer `layer_scalar`;
- RMS norms that scale by `weight` (no 1 + weight offset), computed in float32;
- embeddings scaled by sqrt(hidden_size), and logits soft-capped by `final_logit_softcapping`
  before the Markov head adds its bias.
The config is read from the checkpoint's config.json as written by DeepSpec, which copies the
target's Gemma 4 text config; transformers' own Gemma 4 config class would rewrite
`global_head_dim` and `num_global_key_value_heads` into per-layer settings of the target's layers.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from .dspark import DSparkDrafter, _rope, block_mask

TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "global_head_dim", "attention_k_eq_v", "hidden_activation", "rms_norm_eps",
    "rope_parameters",
)
# Fields a Gemma 4 text config may leave out (gemma4_unified has no MoE or per-layer-input fields).
DEFAULTS = {
    "attention_bias": False, "final_logit_softcapping": None, "use_double_wide_mlp": False,
    "num_kv_shared_layers": 0, "enable_moe_block": False, "hidden_size_per_layer_input": 0,
    "num_global_key_value_heads": None,
}
ROPE_TYPES = ("default", "proportional")


def gemma4_config(raw: dict, model: str = "Gemma4DSparkModel",
                  own_fields: tuple[str, ...] = ("block_size", "mask_token_id", "target_layer_ids")) -> SimpleNamespace:
    """A drafter's config.json, written by DeepSpec as the target's Gemma 4 text config plus the drafter's
    own fields; ValueError names what `model` (the architecture) needs and does not find or support."""
    missing = [field for field in TEXT_FIELDS + own_fields if field not in raw]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(map(repr, missing))}, which {model} reads")
    config = SimpleNamespace(**(DEFAULTS | {k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "dtype")}))
    if config.enable_moe_block:
        raise ValueError(f"enable_moe_block is set, but {model} layers have no MoE block")
    if config.hidden_size_per_layer_input:
        raise ValueError(f"hidden_size_per_layer_input is set, but {model} layers have no per-layer inputs")
    if config.attention_k_eq_v and not config.num_global_key_value_heads:
        raise ValueError("attention_k_eq_v is set without num_global_key_value_heads")
    rope = (config.rope_parameters or {}).get("full_attention")
    if not rope or rope.get("rope_type") not in ROPE_TYPES:
        raise ValueError(f"rope_parameters['full_attention'] must have rope_type {' or '.join(ROPE_TYPES)}, got {rope}")
    return config


class Gemma4DraftAttention(nn.Module):
    """DraftAttention's interface (context_kv, forward, kv_heads, head_dim) with Gemma 4's projections."""

    def __init__(self, config):
        super().__init__()
        self.heads = int(config.num_attention_heads)
        self.head_dim = int(config.global_head_dim)
        k_eq_v = bool(config.attention_k_eq_v)
        self.kv_heads = int(config.num_global_key_value_heads if k_eq_v else config.num_key_value_heads)
        d, bias, eps = config.hidden_size, bool(config.attention_bias), config.rms_norm_eps
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = None if k_eq_v else nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)
        self.q_norm = Gemma4RMSNorm(self.head_dim, eps=eps)
        self.k_norm = Gemma4RMSNorm(self.head_dim, eps=eps)
        self.v_norm = Gemma4RMSNorm(self.head_dim, eps=eps, with_scale=False)

    def context_kv(self, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        c = context.shape[0]
        k = self.k_proj(context).view(c, self.kv_heads, self.head_dim)
        v = k if self.v_proj is None else self.v_proj(context).view(c, self.kv_heads, self.head_dim)
        return _rope(self.k_norm(k).transpose(0, 1), cos, sin), self.v_norm(v).transpose(0, 1)

    def forward(self, x, cos, sin, past_k, past_v, visible=None):
        b = x.shape[0]
        q = _rope(self.q_norm(self.q_proj(x).view(b, self.heads, self.head_dim)).transpose(0, 1), cos, sin)
        k, v = self.context_kv(x, cos, sin)
        k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
        out = F.scaled_dot_product_attention(
            q[None], k[None], v[None], attn_mask=block_mask(visible, b), scale=1.0, enable_gqa=self.heads != self.kv_heads
        )
        return self.o_proj(out[0].transpose(0, 1).reshape(b, -1))


class Gemma4DraftMLP(nn.Module):
    def __init__(self, config, intermediate_size: int):
        super().__init__()
        d = config.hidden_size
        self.gate_proj = nn.Linear(d, intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, d, bias=False)
        self.act_fn = ACT2FN[config.hidden_activation]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def mlp_size(config, index: int) -> int:
    """DeepSpec builds transformers 5.10's Gemma4TextMLP with the drafter's own layer count, where a layer
    is "KV-shared" (and double-wide) only if it is past num_hidden_layers - num_kv_shared_layers > 0."""
    first_shared = config.num_hidden_layers - config.num_kv_shared_layers
    wide = bool(config.use_double_wide_mlp) and index >= first_shared > 0
    return config.intermediate_size * (2 if wide else 1)


class Gemma4DraftLayer(nn.Module):
    def __init__(self, config, index: int):
        super().__init__()
        self.self_attn = Gemma4DraftAttention(config)
        self.mlp = Gemma4DraftMLP(config, mlp_size(config, index))
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = Gemma4RMSNorm(d, eps=eps)
        self.post_attention_layernorm = Gemma4RMSNorm(d, eps=eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(d, eps=eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(d, eps=eps)
        self.register_buffer("layer_scalar", torch.ones(1))  # persistent: checkpoints store it

    def forward(self, x, cos, sin, past_k, past_v, visible=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, visible))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class Gemma4DraftRotary(nn.Module):
    """cos/sin for the drafter's positions, with the target's full-attention RoPE over global_head_dim."""

    def __init__(self, config):
        super().__init__()
        params = config.rope_parameters["full_attention"]
        dim, base = int(config.global_head_dim), params["rope_theta"]
        # As transformers computes it: exponents from int64 steps, divided by the whole head size.
        if params["rope_type"] == "proportional":
            angles = int(params.get("partial_rotary_factor", 1.0) * dim // 2)
            rotated = 1.0 / base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / dim)
            inv_freq = torch.cat([rotated, torch.zeros(dim // 2 - angles)]) / params.get("factor", 1.0)
        else:
            inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class ScaledEmbedding(nn.Embedding):
    """Gemma's embedding: the table times sqrt(hidden_size), the factor rounded to the table's dtype."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.embedding_dim**0.5).to(self.weight.dtype)
        return super().forward(ids) * scale.to(self.weight.device)


class Gemma4DSparkDrafter(DSparkDrafter):
    @classmethod
    def config_from(cls, raw: dict) -> SimpleNamespace:
        return gemma4_config(raw)

    def new_layer(self, config, index: int) -> nn.Module:
        return Gemma4DraftLayer(config, index)

    def new_norm(self, config) -> nn.Module:
        return Gemma4RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def new_rotary(self, config) -> nn.Module:
        return Gemma4DraftRotary(config)

    def new_embedding(self, config) -> nn.Embedding:
        return ScaledEmbedding(config.vocab_size, config.hidden_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.output_head(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
