"""The speculators format (vLLM's `speculators` package), read and written for DSpark and DFlash drafters.

A speculators checkpoint's config.json nests the draft decoder's config (`transformer_layer_config`, a
qwen3 or llama config) and puts the drafter's fields beside it; its layer ids are 1-based (id i is the
target's hidden_states[i], DeepSpec's target_layer_id i - 1); a draft vocabulary is given by
`draft_vocab_size`, the LM head's rows for it (`lm_head.weight`, in draft-id order) and `d2t` (target id
of draft id j = j + d2t[j]) with its mask `t2d`; the Markov head's W2 has the draft vocabulary's rows.
The decoder layers are Qwen3-style (speculators' Qwen3DFlashDecoderLayer) whatever the verifier, read
the verifier's token embeddings as a plain table (no Gemma scaling) and apply no logit soft-cap.

Reading turns such a checkpoint into the DeepSpec-style config and weights DSparkDrafter takes (facts from
speculators 0.9.0, src/speculators/models/{dflash,dspark}/); writing does the reverse for a drafter with
Qwen3-style layers, in the form llama.cpp's convert_hf_to_gguf.py (DSparkModel) and vLLM load as is.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, Qwen3Config

KINDS = {"dspark": "DSparkSpeculator", "dflash": "DFlashSpeculator"}
# The draft decoder configs speculators' training builds (scripts/train.py, DRAFT_ARCH_CONFIGS).
DECODER_CONFIGS = {"qwen3": Qwen3Config, "llama": LlamaConfig}
# Fields the drafter reads beside the decoder's own (DeepSpec's names; the rest are this project's).
DRAFTER_FIELDS = (
    "architectures", "block_size", "target_layer_ids", "num_target_layers", "mask_token_id", "num_anchors",
    "markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov", "torch_dtype", "dtype",
)
# Fields of the DeepSpec-style config that only speculators checkpoints give (DeepSpec's layout has no room for them).
OWN_FIELDS = ("draft_vocab_size", "sample_from_anchor", "sliding_windows", "window_causal", "target_hidden_size")
FORMAT_VERSION = "0.9.0"  # the speculators release whose layout write() follows
# The decoder config's fields as speculators 0.9.0 writes them for a qwen3 draft decoder.
DECODER_KEYS = (
    "attention_bias", "attention_dropout", "bos_token_id", "eos_token_id", "head_dim", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "layer_types", "max_position_embeddings", "max_window_layers", "model_type",
    "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id", "rms_norm_eps", "rope_parameters",
    "sliding_window", "tie_word_embeddings", "use_cache", "use_sliding_window", "vocab_size",
)


def is_speculators(raw: dict) -> bool:
    return "speculators_model_type" in raw


def verifier_name(raw: dict) -> str | None:
    return ((raw.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")


def read_config(raw: dict) -> dict:
    """The drafter's config in DeepSpec's form (with OWN_FIELDS). ValueError says what does not fit."""
    kind = raw["speculators_model_type"]
    if kind not in KINDS:
        raise ValueError(f"speculators_model_type {kind!r}: dspark-chat reads speculators' {', '.join(KINDS)} and eagle3 drafters")
    layer = raw.get("transformer_layer_config")
    if not isinstance(layer, dict) or layer.get("model_type") not in DECODER_CONFIGS:
        given = layer.get("model_type") if isinstance(layer, dict) else layer
        raise ValueError(f"transformer_layer_config has model_type {given!r}; speculators builds its draft decoders "
                         f"from {' or '.join(DECODER_CONFIGS)} configs, and only those are read")
    decoder = DECODER_CONFIGS[layer["model_type"]](**{k: v for k, v in layer.items() if k != "model_type"})
    config = {k: v for k, v in decoder.to_dict().items() if k not in ("model_type", "architectures", "dtype", "transformers_version")}
    rope = config.get("rope_parameters") or {}
    if "sliding_attention" in rope:  # per-layer-type RoPE: speculators' drafter takes the sliding layers' (flatten_rope_parameters)
        config["rope_parameters"] = rope["sliding_attention"]
    for field in ("block_size", "mask_token_id", "aux_hidden_state_layer_ids"):
        if raw.get(field) is None:
            raise ValueError(f"config.json lacks {field!r}, which a speculators {kind} drafter needs")
    vocab = decoder.vocab_size
    draft_vocab = raw.get("draft_vocab_size") or vocab
    if not 0 < draft_vocab <= vocab:
        raise ValueError(f"draft_vocab_size {draft_vocab} is not between 1 and the vocabulary size {vocab}")
    # Slot 0 drafts (DeepSpec's block) or only slots 1.. do (the 1+N block). speculators wrote no such field
    # before July 2026, when every export was 1+N; llama.cpp reads a missing one so too.
    anchor = bool(raw.get("sample_from_anchor", False))
    if raw["block_size"] < (1 if anchor else 2):
        raise ValueError(f"block_size {raw['block_size']} leaves no slot to draft from")
    dspark = kind == "dspark"
    rank = int(raw.get("markov_rank", 256)) if dspark else 0  # speculators' defaults for fields left out
    confidence = bool(raw.get("enable_confidence_head", True)) if dspark else False
    config |= dict(
        architectures=["Qwen3DSparkModel"], model_type="qwen3", block_size=int(raw["block_size"]), mask_token_id=int(raw["mask_token_id"]),
        target_layer_ids=[int(i) - 1 for i in raw["aux_hidden_state_layer_ids"]],
        markov_rank=rank, markov_head_type=str(raw.get("markov_head_type", "vanilla")), enable_confidence_head=confidence,
        confidence_head_with_markov=confidence and rank > 0 and bool(raw.get("confidence_head_with_markov", True)),
        draft_vocab_size=draft_vocab, sample_from_anchor=anchor, target_hidden_size=raw.get("target_hidden_size"),
        sliding_windows=_windows(decoder), window_causal=not raw.get("sliding_window_non_causal", False),
    )
    if dspark and raw.get("confidence_head_with_markov", True) and confidence and rank == 0:
        raise ValueError("confidence_head_with_markov needs a Markov head, and markov_rank is 0")
    return config


def _windows(decoder) -> list[int | None] | None:
    """Per decoder layer, its sliding window, or None for full attention (speculators' DFlashDraftModel: a
    sliding_attention layer with no sliding_window attends fully)."""
    types, window = getattr(decoder, "layer_types", None), getattr(decoder, "sliding_window", None)
    if not types or window is None or "sliding_attention" not in types:
        return None
    if len(types) != decoder.num_hidden_layers:
        raise ValueError(f"transformer_layer_config has {len(types)} layer_types for {decoder.num_hidden_layers} layers")
    if window < 1:
        raise ValueError(f"sliding_window {window} must be at least 1")
    return [window if t == "sliding_attention" else None for t in types]


def read_weights(state: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(the weights under DSparkDrafter's names, the draft vocabulary's target ids or None) for a config from
    read_config. ValueError says what does not fit."""
    vocab, draft_vocab = config["vocab_size"], config["draft_vocab_size"]
    state = {k: v for k, v in state.items() if not k.startswith(("verifier_lm_head.", "verifier_norm."))}  # training only
    d2t, t2d = state.pop("d2t", None), state.pop("t2d", None)
    if draft_vocab == vocab:
        return state, None
    if d2t is None:
        raise ValueError(f"draft_vocab_size {draft_vocab} is below the vocabulary size {vocab} but the weights have no d2t")
    if "lm_head.weight" not in state:
        raise ValueError(f"the weights have no lm_head.weight, the LM head's rows for the {draft_vocab}-token draft vocabulary")
    ids = torch.arange(len(d2t)) + d2t.long()
    if len(ids) != draft_vocab or ids.min() < 0 or ids.max() >= vocab or len(ids.unique()) != len(ids):
        raise ValueError(f"d2t does not map the {draft_vocab} draft ids to distinct target ids below {vocab}")
    if t2d is not None and (t2d.shape != (vocab,) or not t2d.bool()[ids].all() or int(t2d.bool().sum()) != draft_vocab):
        raise ValueError("t2d does not mark exactly the target ids d2t maps to")
    state["draft_head.weight"] = state.pop("lm_head.weight")
    return state, ids


def write(drafter, config: dict, verifier: str, verifier_architectures: list[str], target_head, dtype: torch.dtype
          ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) of a Qwen3-style drafter in the speculators format. config: its DeepSpec-style
    config; target_head: the target's LM head module (the drafter's full head is left out when it is that)."""
    rank = int(config.get("markov_rank", 0) or 0)
    confidence = drafter.confidence_head is not None
    kind = "dspark" if rank or confidence else "dflash"
    decoder = Qwen3Config(**{k: v for k, v in config.items() if k not in DRAFTER_FIELDS + OWN_FIELDS}).to_dict()
    decoder = {k: decoder[k] for k in DECODER_KEYS if k in decoder}
    windows = config.get("sliding_windows") or [None] * len(drafter.layers)
    sizes = {w for w in windows if w is not None}
    if len(sizes) > 1:
        raise ValueError(f"the speculators format has one sliding_window for all sliding layers; this drafter has {sorted(sizes)}")
    decoder |= dict(model_type="qwen3", layer_types=["sliding_attention" if w else "full_attention" for w in windows],
                    sliding_window=next(iter(sizes), None), use_sliding_window=bool(sizes), tie_word_embeddings=False)
    vocab = drafter.draft_vocab
    out = {
        "architectures": [KINDS[kind]], "speculators_model_type": kind, "speculators_version": FORMAT_VERSION,
        "transformer_layer_config": decoder, "draft_vocab_size": config["vocab_size"] if vocab is None else len(vocab),
        "block_size": drafter.slots, "target_hidden_size": None,
        "aux_hidden_state_layer_ids": [i + 1 for i in drafter.feature_layers], "mask_token_id": drafter.mask_token_id,
        "sample_from_anchor": drafter.first_slot == 0, "sliding_window_non_causal": not config.get("window_causal", True),
        "speculators_config": {
            "algorithm": kind, "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": drafter.block_size,
                                  "accept_tolerance": 0.0, "verifier_accept_k": 1}],
            "verifier": {"name_or_path": verifier, "architectures": list(verifier_architectures)},
        },
        "tie_word_embeddings": False, "dtype": str(dtype).removeprefix("torch."),
    }
    if kind == "dspark":
        out |= {"markov_rank": rank, "markov_head_type": config.get("markov_head_type", "vanilla"),
                "enable_confidence_head": confidence, "confidence_head_with_markov": drafter.confidence_with_markov}
    tensors = {name: p for name, p in drafter.state_dict().items()
               if not name.startswith(("embed_tokens.", "lm_head.", "draft_head."))}
    if vocab is not None:
        tensors["lm_head.weight"] = drafter.draft_head.weight
        if drafter.markov_head is not None and not drafter.markov_head.pruned:
            tensors["markov_head.markov_w2.weight"] = tensors["markov_head.markov_w2.weight"][vocab]
        tensors["d2t"] = vocab.cpu() - torch.arange(len(vocab))
        tensors["t2d"] = torch.zeros(config["vocab_size"], dtype=torch.bool).index_fill_(0, vocab.cpu(), True)
    elif drafter.lm_head is not target_head:
        tensors["lm_head.weight"] = drafter.lm_head.weight
    # The LM head's rows are the target's, kept in its dtype: rounded to another they would not be its rows.
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() and k != "lm_head.weight" else v.dtype).contiguous()
               for k, v in tensors.items()}
    return out, tensors
