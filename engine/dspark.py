"""The DSpark drafter (DeepSpec's Qwen3DSparkModel), implemented here for inference.

A parallel backbone reads the target's hidden states at a few layers (the context) and drafts a whole
block at once; the Markov head makes the block left-to-right; the confidence head estimates, per
position, the chance that the target accepts the draft given that it accepted everything before it.
DeepSpec's DFlash checkpoints are the same model with no Markov head and no confidence head.
Module and parameter names follow DeepSpec's checkpoints so a released model.safetensors loads as is.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from dspark_chat.kernels.markov import markov_draft

from .sampling import Proposal, Sampling

DRAFT_VOCAB_FILE = "draft_vocab.json"  # optional, beside config.json: the token ids a drafter drafts among


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class DraftAttention(nn.Module):
    """Block queries attend, with no causal mask, to every context position and the whole block."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def context_kv(self, context: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Keys and values of context rows [c, d] at their positions: [kv_heads, c, head_dim] each."""
        c = context.shape[0]
        k = self.k_norm(self.k_proj(context).view(c, self.kv_heads, self.head_dim)).transpose(0, 1)
        v = self.v_proj(context).view(c, self.kv_heads, self.head_dim).transpose(0, 1)
        return _rope(k, cos, sin), v

    def forward(self, x, cos, sin, past_k, past_v):
        """x: block rows [b, d]; past_k/past_v: the context keys and values."""
        b = x.shape[0]
        q = _rope(self.q_norm(self.q_proj(x).view(b, self.heads, self.head_dim)).transpose(0, 1), cos, sin)
        k, v = self.context_kv(x, cos, sin)
        k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out[0].transpose(0, 1).reshape(b, -1))


class DraftLayer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.self_attn = DraftAttention(config)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, past_k, past_v):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v)
        return x + self.mlp(self.post_attention_layernorm(x))


class MarkovHead(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        rank, vocab, d = int(config.markov_rank), config.vocab_size, config.hidden_size
        self.kind = str(config.markov_head_type).lower()
        self.markov_w1 = nn.Embedding(vocab, rank)
        self.markov_w2 = nn.Linear(rank, vocab, bias=False)
        if self.kind == "gated":
            self.gate_proj = nn.Linear(d + rank, rank)
        if self.kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + d, 3 * rank)

    def weights(self, vocab: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The head's tensors; with a draft vocabulary, W2 keeps only its tokens' rows (W1 is indexed by
        the previous token, which may be any token of the target's)."""
        w = {"w1": self.markov_w1.weight, "w2": self.markov_w2.weight if vocab is None else self._rows(vocab)}
        if self.kind == "gated":
            w |= {"gate_w": self.gate_proj.weight, "gate_b": self.gate_proj.bias}
        if self.kind == "rnn":
            w |= {"joint_w": self.joint_proj.weight, "joint_b": self.joint_proj.bias}
        return w

    def _rows(self, vocab: torch.Tensor) -> torch.Tensor:
        """W2's rows for the draft vocabulary. Outside autograd they are gathered once and kept (the
        gather cost a tenth of a CPU draft), until the weight or the vocabulary changes; training
        gathers them every time, so gradients reach W2."""
        weight = self.markov_w2.weight
        if torch.is_grad_enabled() and weight.requires_grad:
            return weight[vocab]
        kept = getattr(self, "_kept", None)  # (weight, its version, vocab, its version, rows)
        if kept is None or kept[0] is not weight or kept[1] != weight._version or kept[2] is not vocab or kept[3] != vocab._version:
            self._kept = kept = (weight, weight._version, vocab, vocab._version, weight.detach()[vocab])
        return kept[4]


class ConfidenceHead(nn.Module):
    def __init__(self, input_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, 1)


class DSparkDrafter(nn.Module):
    """One live sequence: context keys/values are cached per layer and grow as the target commits."""

    # --- the architecture-specific parts (Gemma4DSparkDrafter in dspark_gemma4.py overrides them) --
    @classmethod
    def config_from(cls, raw: dict) -> Qwen3Config:
        """The model config from a checkpoint's config.json; ValueError says what is missing or unsupported."""
        return Qwen3Config(**{k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "dtype")})

    def new_layer(self, config, index: int) -> nn.Module:
        return DraftLayer(config)

    def new_norm(self, config) -> nn.Module:
        return Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def new_rotary(self, config) -> nn.Module:
        return Qwen3RotaryEmbedding(config)

    def new_embedding(self, config) -> nn.Embedding:
        return nn.Embedding(config.vocab_size, config.hidden_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_head(hidden)

    @property
    def output_head(self) -> nn.Module:
        """The LM head over the draft vocabulary, or the target's whole head when there is none."""
        return self.lm_head if self.draft_head is None else self.draft_head

    def __init__(self, config: Qwen3Config, embed_tokens: nn.Embedding | None = None, lm_head: nn.Linear | None = None):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.block_size = int(config.block_size)
        self.mask_token_id = int(config.mask_token_id)
        self.feature_layers = tuple(int(i) for i in config.target_layer_ids)
        self.layers = nn.ModuleList(self.new_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = self.new_norm(config)
        self.fc = nn.Linear(len(self.feature_layers) * d, d, bias=False)
        self.hidden_norm = self.new_norm(config)
        self.rotary_emb = self.new_rotary(config)
        # Shared with the target when the checkpoint's copies are identical (they are frozen copies).
        self.embed_tokens = self.new_embedding(config) if embed_tokens is None else embed_tokens
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False) if lm_head is None else lm_head
        rank = int(getattr(config, "markov_rank", 0) or 0)
        self.markov_head = MarkovHead(config) if rank > 0 else None
        self.confidence_head = None
        self.confidence_with_markov = False
        if getattr(config, "enable_confidence_head", False):
            self.confidence_with_markov = bool(getattr(config, "confidence_head_with_markov", False))
            self.confidence_head = ConfidenceHead(d + (rank if self.confidence_with_markov else 0))
        self.draft_vocab: torch.Tensor | None = None
        self.draft_head: nn.Linear | None = None
        self.int8 = False  # whether quantize() ran
        self.rewind(0)

    def use_draft_vocab(self, ids: torch.Tensor) -> None:
        """Draft only among these token ids (ascending): the LM head and the Markov head's output shrink
        to their rows, which makes drafting cheaper where the head dominates it (a 49152-way head over 7
        positions on a CPU). Losslessness does not depend on it: verification sees the drafted tokens and,
        when sampling, the distribution they were drawn from, zero outside the draft vocabulary."""
        weight = self.lm_head.weight
        self.draft_vocab = ids.to(self.device, torch.long)
        self.draft_head = nn.Linear(weight.shape[1], len(ids), bias=False, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            self.draft_head.weight.copy_(weight.detach()[ids.to(weight.device)])
        self.draft_head.requires_grad_(False)

    def quantize(self) -> None:
        """Run the drafter's layers and draft-vocabulary head with int8 weights, one scale per output row,
        activations quantised on the fly with one scale per product (fbgemm's dynamic quantisation). On a
        CPU a draft is bound by reading weights, and this halves it (SmolLM2's drafter: 11-12 ms a block,
        5.5-7.5 ms in int8). Outputs do not change: the target verifies every token, and sampling compares
        with the distribution these weights drew from. The feature projection stays float: the target's
        hidden states have outlier channels that one activation scale flattens (quantised too, SmolLM2's
        drafter proposed the float drafter's block 1 time in 60 instead of 46). The embeddings and LM head
        shared with the target are left alone."""
        own = {name: per_channel_dynamic_qconfig for name in ("layers", "draft_head") if getattr(self, name) is not None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch marks eager quantisation deprecated in favour of torchao, and keeps it
            quantize_dynamic(self, own, inplace=True)
        self.int8 = True

    # --- the sequence state -------------------------------------------------------------------
    def rewind(self, length: int) -> int:
        """Forget every position from `length` on; returns how many positions of context remain."""
        if length <= 0 or not hasattr(self, "_past"):
            self._past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
            self._cached = 0  # positions whose context keys/values are in _past
            self._pending: torch.Tensor | None = None  # features of the positions after those
        elif length < self._cached:
            self._past = [None if p is None else (p[0][:, :length], p[1][:, :length]) for p in self._past]
            self._cached, self._pending = length, None
        elif self._pending is not None:
            self._pending = self._pending[: length - self._cached]
        return self.context_length

    @property
    def context_length(self) -> int:
        return self._cached + (0 if self._pending is None else self._pending.shape[0])

    def observe(self, features: torch.Tensor) -> None:
        """Target features [n, len(layers) * d] of the next n committed positions."""
        self._pending = features if self._pending is None else torch.cat([self._pending, features])

    # --- drafting -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (float even when the weights are int8)."""
        return self.norm.weight.dtype

    @torch.inference_mode()
    def propose(self, ids: torch.Tensor, limit: int, sampling: Sampling, generator=None) -> Proposal:
        """Draft min(limit, block_size) tokens after ids[-1] (the anchor, at position len(ids) - 1)."""
        start = ids.shape[0] - 1
        if start != self.context_length:
            raise RuntimeError(f"drafter context has {self.context_length} positions, anchor is at {start}")
        n = min(limit, self.block_size)
        if n <= 0:
            return Proposal.empty(ids.device)
        anchor = ids[-1].to(self.device, non_blocking=True)  # a blocking copy would wait for the device
        hidden = self.backbone(anchor)[:n]
        base_logits = self.logits(hidden)
        vocab = self.draft_vocab
        if self.markov_head is None:
            tokens, probs = sampling.pick(base_logits, generator)
            tokens = tokens if vocab is None else vocab[tokens]
        else:
            tokens, _, probs = markov_draft(
                base_logits, hidden, anchor, self.markov_head.kind, self.markov_head.weights(vocab),
                sampling.temperature, sampling.top_k, sampling.top_p, generator, vocab,
            )
        if probs is not None and vocab is not None:  # the acceptance rule compares with the target's whole vocabulary
            probs = probs.new_zeros(probs.shape[0], self.config.vocab_size).index_copy_(1, vocab, probs)
        confidence = None
        if self.confidence_head is not None:
            features = hidden
            if self.confidence_with_markov:
                prev = torch.cat([anchor.view(1), tokens[:-1]])
                features = torch.cat([hidden, self.markov_head.markov_w1(prev).to(hidden.dtype)], -1)
            confidence = self.confidence_head.proj(features).squeeze(-1).float()
        return Proposal(tokens, probs, confidence)

    def backbone(self, anchor: torch.Tensor) -> torch.Tensor:
        """Hidden states [block_size, d] of the block [anchor, mask, ...]; folds pending context into the cache."""
        start, gamma = self.context_length, self.block_size
        embed_device = self.embed_tokens.weight.device
        block_ids = torch.full((gamma,), self.mask_token_id, dtype=torch.long, device=embed_device)
        block_ids[0] = anchor.to(embed_device)
        x = self.embed_tokens(block_ids).to(self.device, self.dtype)
        positions = torch.arange(self._cached, start + gamma, device=self.device)
        cos, sin = self.rotary_emb(x, positions[None])
        cos, sin = cos[0], sin[0]
        new = start - self._cached
        context = None
        if new:
            context = self.hidden_norm(self.fc(self._pending.to(self.device, x.dtype)))
        for i, layer in enumerate(self.layers):
            past = self._past[i]
            if context is not None:
                k, v = layer.self_attn.context_kv(context, cos[:new], sin[:new])
                past = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))
                self._past[i] = past
            if past is None:
                empty = x.new_zeros(layer.self_attn.kv_heads, 0, layer.self_attn.head_dim)
                past = (empty, empty)
            x = layer(x, cos[new:], sin[new:], *past)
        self._cached, self._pending = start, None
        return self.norm(x)
