"""The DSpark drafter (DeepSpec's Qwen3DSparkModel), implemented here for inference.

A parallel backbone reads the target's hidden states at a few layers (the context) and drafts a whole
block at once; the Markov head makes the block left-to-right; the confidence head estimates, per
position, the chance that the target accepts the draft given that it accepted everything before it.
DeepSpec's DFlash checkpoints are the same model with no Markov head and no confidence head.
Module and parameter names follow DeepSpec's checkpoints so a released model.safetensors loads as is.

The speculators format (engine/speculators.py) adds three things its checkpoints may use: the 1+N block
(`sample_from_anchor` false: the anchor's own slot drafts nothing, slots 1.. draft), a draft vocabulary
whose LM-head and Markov output rows the checkpoint carries (`draft_vocab_size`), and sliding-window
layers (the block sees only the last `window` context positions, and itself causally unless
`sliding_window_non_causal`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from dspark_chat.kernels.markov import markov_bias, markov_draft

from . import cpu_linear
from .sampling import Proposal, Sampling

DRAFT_VOCAB_FILE = "draft_vocab.json"  # optional, beside config.json: the token ids a drafter drafts among


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class DraftAttention(nn.Module):
    """Block queries attend, with no causal mask, to every context position and the whole block; with a
    window, to the last `window` context positions only, and (causal_block) to the block causally."""

    def __init__(self, config: Qwen3Config, window: int | None = None, causal_block: bool = False):
        super().__init__()
        self.window, self.causal_block = window, causal_block
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

    def forward(self, x, cos, sin, past_k, past_v, visible=None):
        """x: block rows [b, d]; past_k/past_v: the context keys and values; visible: which of those the
        block sees (None: all of them)."""
        b = x.shape[0]
        q = _rope(self.q_norm(self.q_proj(x).view(b, self.heads, self.head_dim)).transpose(0, 1), cos, sin)
        k, v = self.context_kv(x, cos, sin)
        if self.window is not None and visible is None:
            past_k, past_v = past_k[:, -self.window :], past_v[:, -self.window :]
        elif self.window is not None:
            # A compiled block reads the context buffers to a bucketed length, `visible` up to the context's end
            # (a prefix, so its count is the context length): the window is the last `window` of those.
            positions = torch.arange(visible.shape[0], device=visible.device)
            visible = visible & (positions >= visible.sum() - self.window)
        k, v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
        if self.causal_block:  # block row i sees the (visible) context rows and block rows 0..i
            context = torch.ones(b, past_k.shape[1], dtype=torch.bool, device=x.device) if visible is None else visible.expand(b, -1)
            mask = torch.cat([context, torch.ones(b, b, dtype=torch.bool, device=x.device).tril()], 1)
        else:
            mask = block_mask(visible, b)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out[0].transpose(0, 1).reshape(b, -1))


def block_mask(visible: torch.Tensor | None, block: int) -> torch.Tensor | None:
    """The keys a block's queries see: the visible context positions, then the whole block."""
    return None if visible is None else torch.cat([visible, visible.new_ones(block)])[None]


class DraftLayer(nn.Module):
    def __init__(self, config: Qwen3Config, index: int = 0):
        super().__init__()
        windows = getattr(config, "sliding_windows", None)  # per layer: a window size, or None for full attention
        window = windows[index] if windows else None
        self.self_attn = DraftAttention(config, window, window is not None and bool(getattr(config, "window_causal", False)))
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, past_k, past_v, visible=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, visible)
        return x + self.mlp(self.post_attention_layernorm(x))


class MarkovHead(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        rank, vocab, d = int(config.markov_rank), config.vocab_size, config.hidden_size
        self.kind = str(config.markov_head_type).lower()
        # W1 reads the previous token (any of the target's); W2's rows are the draft vocabulary's when the
        # checkpoint carries only those (speculators' draft_vocab_size), else the whole vocabulary's.
        rows = getattr(config, "draft_vocab_size", None) or vocab
        self.pruned = rows != vocab
        self.markov_w1 = nn.Embedding(vocab, rank)
        self.markov_w2 = nn.Linear(rank, rows, bias=False)
        if self.kind == "gated":
            self.gate_proj = nn.Linear(d + rank, rank)
        if self.kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + d, 3 * rank)

    def weights(self, vocab: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The head's tensors; with a draft vocabulary, W2 keeps only its tokens' rows (W1 is indexed by
        the previous token, which may be any token of the target's)."""
        w = {"w1": self.markov_w1.weight, "w2": self.markov_w2.weight if vocab is None or self.pruned else self._rows(vocab)}
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
        return DraftLayer(config, index)

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
        # The block is [anchor, mask, ...], `slots` long. DeepSpec drafts from every slot, the anchor's
        # included (slot k proposes position anchor + k + 1); the 1+N layout drafts from slots 1.. only.
        self.slots = int(config.block_size)
        self.first_slot = 0 if getattr(config, "sample_from_anchor", True) else 1
        self.block_size = self.slots - self.first_slot  # drafts a round
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
        self.draft_vocab: torch.Tensor | None = None  # target ids of the draft vocabulary's tokens, in head-row order
        # A checkpoint that carries the draft vocabulary's LM-head rows (speculators' pruned lm_head) loads them
        # here, and its target ids come with set_draft_vocab; otherwise use_draft_vocab gathers the rows.
        pruned = getattr(config, "draft_vocab_size", None)
        self.draft_head = nn.Linear(d, pruned, bias=False) if pruned and pruned != config.vocab_size else None
        self.int8 = False  # whether quantize() ran
        self.rewind(0)

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """The target ids of a carried draft head's rows (draft id j is target id ids[j])."""
        if self.draft_head is None or len(ids) != self.draft_head.out_features:
            raise ValueError(f"{len(ids)} draft ids for a draft head of {0 if self.draft_head is None else self.draft_head.out_features} rows")
        self.draft_vocab = ids.to(self.device, torch.long)

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
        """Forget every position from `length` on; returns how many positions of context remain. The
        context's keys and values stay where they are: forgetting is a length change."""
        if length <= 0 or not hasattr(self, "_cached"):
            self._cached = 0  # positions whose context keys/values are in _kv
            self._pending: torch.Tensor | None = None  # features of the positions after those
        elif length < self._cached:
            self._cached, self._pending = length, None
        elif self._pending is not None:
            self._pending = self._pending[: length - self._cached]
        return self.context_length

    def reserve(self, positions: int) -> None:
        """Make room for the context's keys and values at once (compiled CUDA graphs read them in place:
        a buffer that grows later moves, and each move is a new recording)."""
        self._room(positions, exact=True)

    def _room(self, positions: int, exact: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, buffers for at least `positions` context keys and values, grown geometrically (like
        the target's GrowingLayer) with what they hold kept."""
        kv = getattr(self, "_kv", None)
        if kv is None or kv[0][0].shape[1] < positions:
            capacity = positions if exact else max(256, 2 * positions)
            grown = []
            for i, layer in enumerate(self.layers):
                attention = layer.self_attn
                shape = (attention.kv_heads, capacity, attention.head_dim)
                pair = tuple(torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in "kv")
                if kv is not None:
                    for new, old in zip(pair, kv[i]):
                        new[:, : self._cached] = old[:, : self._cached]
                grown.append(pair)
            self._kv = kv = grown
            if self.compiled is not None and self.device.type == "cuda":
                for buffer in (b for pair in kv for b in pair):
                    torch._dynamo.mark_static_address(buffer)
        return kv

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
        x, cos, sin = self._block_inputs(anchor)
        if self.compiled is not None and sampling.greedy and n == self.block_size:
            return self._propose_compiled(x, cos, sin, anchor)
        kv = self._room(start)
        block = self._layers(x, cos, sin, [(k[:, :start], v[:, :start]) for k, v in kv])
        markov = self.markov_head.weights(self.draft_vocab) if self.markov_head is not None else None
        tokens, probs, confidence = self._draft(block, n, anchor, markov, sampling, generator)
        return Proposal(tokens, probs, confidence)

    def _draft(self, block: torch.Tensor, n: int, anchor: torch.Tensor, markov: dict | None, sampling: Sampling,
               generator=None):
        """n drafts from the block's hidden states: from its first drafting slot on, through _head."""
        state = None
        if markov is not None and self.first_slot and self.markov_head.kind == "rnn":
            # The recurrent state runs over the whole block: the anchor's slot (its previous token the
            # anchor itself) updates it before slot 1 drafts, as speculators trains it.
            state = markov_bias("rnn", markov, anchor, block[0], None)[1]
        return self._head(block[self.first_slot : self.first_slot + n], anchor, markov, sampling, generator, state)

    def _head(self, hidden: torch.Tensor, anchor: torch.Tensor, markov: dict | None, sampling: Sampling, generator=None,
              state: torch.Tensor | None = None):
        """The block's tokens (through the Markov head's `markov` weights, when there is one, from the recurrent
        `state`), the distributions they were drawn from (None when greedy) and the confidence logits (None
        without a confidence head)."""
        base_logits = self.logits(hidden)
        vocab = self.draft_vocab
        if markov is None:
            tokens, probs = sampling.pick(base_logits, generator)
            tokens = tokens if vocab is None else vocab[tokens]
        else:
            tokens, _, probs = markov_draft(
                base_logits, hidden, anchor, self.markov_head.kind, markov,
                sampling.temperature, sampling.top_k, sampling.top_p, generator, vocab, state,
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
        return tokens, probs, confidence

    def backbone(self, anchor: torch.Tensor) -> torch.Tensor:
        """Hidden states [slots, d] of the block [anchor, mask, ...]; folds pending context into the cache."""
        x, cos, sin = self._block_inputs(anchor)
        kv = self._room(self._cached)
        return self._layers(x, cos, sin, [(k[:, : self._cached], v[:, : self._cached]) for k, v in kv])

    def _block_inputs(self, anchor: torch.Tensor):
        """Folds the pending context into the keys and values, and returns the block [anchor, mask, ...]'s
        embeddings and its positions' rotary cos and sin."""
        start, gamma = self.context_length, self.slots
        embed_device = self.embed_tokens.weight.device
        block_ids = torch.full((gamma,), self.mask_token_id, dtype=torch.long, device=embed_device)
        block_ids[0] = anchor.to(embed_device)
        x = self.embed_tokens(block_ids).to(self.device, self.dtype)
        positions = torch.arange(self._cached, start + gamma, device=self.device)
        cos, sin = self.rotary_emb(x, positions[None])
        cos, sin = cos[0], sin[0]
        new = start - self._cached
        if new:
            context = self.hidden_norm(self.fc(self._pending.to(self.device, x.dtype)))
            kv = self._room(start)
            for layer, (keys, values) in zip(self.layers, kv):
                k, v = layer.self_attn.context_kv(context, cos[:new], sin[:new])
                keys[:, self._cached : start], values[:, self._cached : start] = k, v
        self._cached, self._pending = start, None
        return x, cos[new:], sin[new:]

    def _layers(self, x, cos, sin, past, visible=None) -> torch.Tensor:
        for layer, (keys, values) in zip(self.layers, past):
            x = layer(x, cos, sin, keys, values, visible)
        return self.norm(x)

    # --- compiled drafting ----------------------------------------------------------------------
    compiled = None

    def compile(self, positions: int) -> None:
        """Compile the greedy block (layers, LM head, Markov chain, confidence) into one graph, a CUDA graph on
        CUDA, with room for `positions` of context, and draft one block with it. Raises what compiling raises;
        an int8 drafter is refused: torch.compile does not trace its quantised products (and calling them from a
        graph measured no faster, docs/compiled.md)."""
        if self.int8:
            raise ValueError("its int8 products are not traced by torch.compile; it runs eagerly, in int8")
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        if self.device.type == "cpu":
            cpu_linear.pack_for_graphs(self)
        # The Markov head's rows for the draft vocabulary, gathered once: the graph reads them as they are.
        self._markov = self.markov_head.weights(self.draft_vocab) if self.markov_head is not None else None
        self.compiled = torch.compile(self._greedy_block, mode=mode, fullgraph=True, dynamic=False)
        self.rewind(0)
        self._kv = None
        self.reserve(positions + self.block_size)
        self.propose(torch.zeros(1, dtype=torch.long), self.block_size, Sampling())
        self.rewind(0)

    def _propose_compiled(self, x, cos, sin, anchor) -> Proposal:
        from .compiled import key_length

        # The block attends to the buffers up to a bucketed length (never past their end, which holds the
        # context); the positions past the context are hidden.
        length = min(key_length(self._cached, self.device), self._room(self._cached)[0][0].shape[1])
        visible = torch.arange(length, device=self.device) < self._cached
        torch._dynamo.mark_dynamic(visible, 0)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # Copies, not views: dynamo would specialise on a view's offset, which moves every round.
        tokens, confidence = self.compiled(x, cos.clone(), sin.clone(), visible, anchor.clone())
        # A CUDA graph's outputs are overwritten by its next replay: the loop reads them within the round,
        # but a proposal may outlive it (a test's record of drafts), so it gets copies.
        return Proposal(tokens.clone(), None, None if confidence is None else confidence.clone())

    def _greedy_block(self, x, cos, sin, visible, anchor):
        length = visible.shape[0]
        block = self._layers(x, cos, sin, [(k[:, :length], v[:, :length]) for k, v in self._kv], visible)
        tokens, _, confidence = self._draft(block, self.block_size, anchor, self._markov, Sampling())
        return tokens, confidence
