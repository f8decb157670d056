"""`dspark-chat train`: a DSpark drafter distilled online from a frozen target.

1. The target answers the prompts (batched greedy generation, chat template kept). While it generates
   we keep, per position, its hidden states at the drafter's layers (the context features) and its last
   (post-norm) hidden state, from which its logits are recomputed through its own lm_head when needed:
   49152 logits per position would not fit on disk, 576 numbers do. Shards land in a cache keyed by
   the target, the prompts and the settings, so a rerun (or a resumed run) reuses them.
2. Training draws random anchors in the answers and builds blocks [anchor, mask, ...]; the drafter's own
   modules (engine/dspark.py) run them in one batched pass in which every block attends to the context
   before its anchor and to itself (DeepSpec's create_dspark_attention_mask), so the weights trained
   here are the weights inference runs. Loss as DeepSpec's: 0.1 CE + 0.9 L1(draft, target) + 1.0
   BCE(confidence, 1 - TV), position k weighted by exp(-k / 4); the Markov head is teacher-forced.
   With --draft-vocab N the drafter drafts among the N tokens the answers use most (in the speculators
   format, draft_vocab_size and d2t; in DeepSpec's layout, this project's draft_vocab.json beside the
   weights); the L1 term stays the whole vocabulary's,
   the draft being 0 outside its vocabulary, and the target's log-normaliser is computed once per
   position, so a step computes logits over the draft vocabulary only.
3. Checkpoints (resumable) and the drafter (engine/export.py: the speculators format by default, or
   DeepSpec's layout) are written every --save-every steps; at the end the confidence head is
   calibrated (engine/calibrate.py) on held-out rounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from dspark_chat.kernels.markov import markov_bias

from . import calibrate, export, speculators
from .dspark import DSparkDrafter
from .target import Target

CE_WEIGHT, L1_WEIGHT, CONFIDENCE_WEIGHT, DECAY = 0.1, 0.9, 1.0, 4.0  # DeepSpec's released configs
HOLDOUT_EVERY = 20  # every 20th prompt is held out: acceptance estimates and calibration


# --- data: the target's answers and features ---------------------------------------------------------
@dataclass
class Sequence:
    ids: torch.Tensor  # [L] prompt + answer
    prompt_len: int
    features: torch.Tensor  # [L - 1, len(layers) * d]: the target's hidden states at the drafter's layers
    last: torch.Tensor  # [L - 1, d]: the target's final (post-norm) hidden state; logits = lm_head(last)
    holdout: bool
    lse: torch.Tensor | None = None  # [L - 1]: log-sum-exp of those logits, computed the first time it is drawn


def read_prompts(paths: list[str]) -> list[list[str]]:
    """Per file, the first user turns of JSON lines with a 'turns' list (the bench format) or a 'prompt'."""
    files = []
    for path in paths:
        prompts = []
        # split on "\n" only: str.splitlines() also splits at U+2028 and friends, which JSON strings may hold
        for number, line in enumerate(Path(path).read_text().split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["turns"][0] if "turns" in row else row["prompt"]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise ValueError(f"{path}:{number}: expected {{\"turns\": [...]}} or {{\"prompt\": ...}} ({e})") from e
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{number}: the prompt must be a non-empty string")
            prompts.append(text)
        if not prompts:
            raise ValueError(f"no prompts in {path}")
        files.append(prompts)
    return files


def prompt_ids(target: Target, files: list[list[str]], max_prompt_tokens: int, seed: int) -> list[list[int]]:
    """Chat-formatted prompt ids, too-long ones dropped; each file shuffled (seeded), then the files
    interleaved, so that any prefix of the list mixes them evenly."""
    tokenizer = target.tokenizer
    shuffled = []
    for number, prompts in enumerate(files):
        rows = []
        for text in prompts:
            messages = [{"role": "user", "content": text}]
            if getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            else:
                ids = tokenizer(text)["input_ids"]
            if len(ids) <= max_prompt_tokens:
                rows.append(list(ids))
        random.Random(seed + number).shuffle(rows)
        shuffled.append(rows)
    longest = max(map(len, shuffled))
    return [rows[i] for i in range(longest) for rows in shuffled if i < len(rows)]


@torch.inference_mode()
def generate_shard(target: Target, batch: list[tuple[int, list[int]]], layers: tuple[int, ...], max_new_tokens: int) -> dict:
    """Greedy answers for one batch of prompts (left-padded), with the features and last hidden states
    of every position but the last (whose hidden states generation never computes)."""
    width = max(len(ids) for _, ids in batch)
    pad = target.tokenizer.pad_token_id
    pad = pad if pad is not None else target.stop_ids[0]
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in batch], device=target.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in batch], device=target.device)
    out = target.model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=list(target.stop_ids), pad_token_id=pad, output_hidden_states=True, return_dict_in_generate=True,
    )
    # hidden_states: one tuple per generated token; entry i + 1 is decoder layer i's output, -1 is post-norm.
    steps = out.hidden_states
    stacked = [torch.cat([step[i] for step in steps], 1) for i in [j + 1 for j in layers] + [len(steps[0]) - 1]]
    shard = {}
    for row, (index, ids) in enumerate(batch):
        answer = out.sequences[row, width:].tolist()
        stop = next((k for k, t in enumerate(answer) if t in target.stop_ids), None)
        answer = answer if stop is None else answer[: stop + 1]
        length = len(ids) + len(answer)
        begin = width - len(ids)
        span = slice(begin, begin + length - 1)
        shard[f"{index}.ids"] = torch.tensor(ids + answer, dtype=torch.int64)
        shard[f"{index}.prompt_len"] = torch.tensor([len(ids)], dtype=torch.int64)
        shard[f"{index}.features"] = torch.cat([h[row, span] for h in stacked[:-1]], -1).to(torch.bfloat16).contiguous()
        shard[f"{index}.last"] = stacked[-1][row, span].to(torch.bfloat16).contiguous()
    return shard


def data_key(target: Target, prompts: list[list[str]], layers, options) -> str:
    """Everything the cached answers depend on. Not --max-prompts: shards are consecutive chunks of one
    shuffled prompt list, so a larger --max-prompts reuses the shards a smaller one made."""
    identity = [target.name, target.num_layers, target.hidden_size, target.vocab_size, str(target.dtype), prompts,
                list(layers), options.max_new_tokens, options.max_prompt_tokens, options.gen_batch, options.seed]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def build_corpus(target: Target, prompts: list[list[str]], layers: tuple[int, ...], options, cache: Path, log=print) -> list[Sequence]:
    """The target's answers and features for the first --max-prompts prompts, generated once per cache key."""
    rows = prompt_ids(target, prompts, options.max_prompt_tokens, options.seed)
    if not rows:
        raise ValueError(f"every prompt is longer than --max-prompt-tokens {options.max_prompt_tokens}")
    rows = list(enumerate(rows[: options.max_prompts] if options.max_prompts else rows))
    batches = [rows[i : i + options.gen_batch] for i in range(0, len(rows), options.gen_batch)]
    cache.mkdir(parents=True, exist_ok=True)
    todo = [b for b in range(len(batches)) if not (cache / f"shard-{b:05d}.safetensors").is_file()]
    if todo:
        log(f"generating answers for {len(rows)} prompts ({len(todo)} of {len(batches)} batches to do) into {cache}")
    started = time.time()
    for done, b in enumerate(todo, 1):
        shard = generate_shard(target, batches[b], layers, options.max_new_tokens)
        tmp = cache / f"shard-{b:05d}.tmp"
        save_file(shard, tmp)
        tmp.replace(cache / f"shard-{b:05d}.safetensors")
        tokens = sum(int(v.numel()) for k, v in shard.items() if k.endswith(".ids"))
        log(f"  batch {done}/{len(todo)}: {len(batches[b])} sequences, {tokens} tokens, {time.time() - started:.0f}s")
    corpus = []
    for b in range(len(batches)):
        with safe_open(cache / f"shard-{b:05d}.safetensors", "pt") as f:
            for index in sorted({int(k.split(".")[0]) for k in f.keys()}):
                get = lambda name: f.get_tensor(f"{index}.{name}")
                corpus.append(Sequence(get("ids"), int(get("prompt_len")[0]), get("features"), get("last"),
                                       index % HOLDOUT_EVERY == 0))
    return corpus


# --- the drafter -------------------------------------------------------------------------------------
def default_layers(num_layers: int, count: int = 4) -> list[int]:
    """Evenly spaced from layer 1 to the second-to-last (the last one's hidden state comes post-norm)."""
    last = num_layers - 2
    return sorted({round(1 + i * (last - 1) / max(count - 1, 1)) for i in range(count)})


def drafter_config(target: Target, options, layers: list[int]) -> dict:
    """DeepSpec's config.json: the target's config plus the drafter's fields."""
    config = target.model.config.get_text_config().to_dict()
    for key in ("architectures", "quantization_config", "auto_map", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    mask = options.mask_token_id
    if mask is None:
        tok = target.tokenizer
        mask = next(i for i in (tok.mask_token_id, tok.unk_token_id, tok.pad_token_id, 0) if i is not None)
    rank = options.markov_rank
    config |= dict(
        architectures=["Qwen3DSparkModel"], model_type="qwen3", block_size=options.block_size,
        num_hidden_layers=options.layers, num_target_layers=target.num_layers, target_layer_ids=layers,
        layer_types=["full_attention"] * options.layers, tie_word_embeddings=False, mask_token_id=int(mask),
        num_anchors=options.anchors, markov_rank=rank, markov_head_type=options.markov_head,
        enable_confidence_head=True, confidence_head_with_markov=rank > 0, head_dim=target_head_dim(target),
        intermediate_size=options.intermediate_size or target_mlp_width(config),
    )
    return json.loads(json.dumps(config))  # as config.json will hold it (integer keys become strings)


def target_mlp_width(config: dict) -> int:
    """The target's MLP width; where every layer is a mixture of experts (Qwen3.5-MoE has no dense width), the
    width a token passes through: its routed experts' and its shared expert's."""
    if config.get("intermediate_size"):
        return int(config["intermediate_size"])
    routed = (config.get("moe_intermediate_size") or 0) * (config.get("num_experts_per_tok") or 0)
    return int(routed + (config.get("shared_expert_intermediate_size") or 0))


def target_head_dim(target: Target) -> int:
    c = target.model.config.get_text_config()
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


# option -> (config.json field, default without --init)
ARCHITECTURE = {"layers": ("num_hidden_layers", 2), "block_size": ("block_size", 7), "markov_rank": ("markov_rank", 32),
                "markov_head": ("markov_head_type", "vanilla"), "target_layers": ("target_layer_ids", None),
                "mask_token_id": ("mask_token_id", None), "intermediate_size": ("intermediate_size", None)}


def resolve_architecture(options, init_config: dict | None) -> None:
    """Fill in the architecture options left out: the --init drafter's, else the defaults. One given
    that contradicts the --init drafter is refused (its weights have that shape), except more layers
    and another MLP width, which carry_over makes from its weights."""
    for name, (field, default) in ARCHITECTURE.items():
        given = getattr(options, name)
        if init_config is None:
            setattr(options, name, default if given is None else given)
            continue
        theirs = init_config.get(field, default)
        if given is not None and given != theirs:
            if name == "intermediate_size" or (name == "layers" and given > theirs):
                continue
            flag = "--" + name.replace("_", "-")
            fewer = "; layers can be added to a drafter, not taken away" if name == "layers" else ""
            raise ValueError(f"{flag} {given}: the --init drafter {options.init} has {theirs}{fewer}; leave {flag} out to keep it")
        setattr(options, name, theirs)


def reshaped(init_config: dict, layers: int, width: int | None) -> dict:
    """The --init drafter's config with `layers` layers (added ones attend like the rest) and MLPs `width` wide."""
    config = init_config | {"num_hidden_layers": layers} | ({} if width is None else {"intermediate_size": width})
    if "layer_types" in init_config:
        config["layer_types"] = init_config["layer_types"] + ["full_attention"] * (layers - len(init_config["layer_types"]))
    return config


def carry_over(init: DSparkDrafter, drafter: DSparkDrafter) -> None:
    """Start `drafter` from the --init drafter's weights. Layers it adds, and the neurons of an MLP made
    wider, start with zero output projections: they add nothing to the residual stream until training
    moves them, so the grown drafter starts out drafting exactly as the --init one did. A narrower MLP
    keeps each layer's strongest neurons (by the product of their three weight vectors' norms) and
    starts out close to it."""
    params = trainable(drafter)
    with torch.no_grad():
        for name, p in trainable(init).items():
            if params[name].shape == p.shape:  # an MLP of another width is carried over below
                params[name].copy_(p)
        if init.markov_head is not None and init.markov_head.pruned:  # W2's rows for the draft vocabulary only
            params["markov_head.markov_w2.weight"][init.draft_vocab] = init.markov_head.markov_w2.weight
        for layer in drafter.layers[len(init.layers) :]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for old, new in zip(init.layers, drafter.layers):
            keep = strongest_neurons(old.mlp, new.mlp.gate_proj.out_features)
            new.mlp.gate_proj.weight[: len(keep)] = old.mlp.gate_proj.weight[keep]
            new.mlp.up_proj.weight[: len(keep)] = old.mlp.up_proj.weight[keep]
            new.mlp.down_proj.weight[:, : len(keep)] = old.mlp.down_proj.weight[:, keep]
            new.mlp.down_proj.weight[:, len(keep) :] = 0


def strongest_neurons(mlp, count: int) -> torch.Tensor:
    """The indices, in order, of an MLP's `count` neurons (all of them if it has fewer) whose gate, up and
    down weight vectors have the largest product of norms: a neuron's output scales with all three."""
    strength = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
    if count >= len(strength):
        return torch.arange(len(strength))
    return strength.topk(count).indices.sort().values


def starting_drafter(spec: str, target: Target, anchors: int) -> tuple[dict, DSparkDrafter]:
    """The config and weights of a drafter to go on training (--init), loaded and checked as the engine
    loads drafters, in float."""
    from .loading import load_drafter, model_dir

    folder = model_dir(spec)  # a Hub id is fetched once, here
    drafter = load_drafter(str(folder), target, int8=False)  # says what is wrong with a folder that is not a drafter
    config = dict(drafter.config_dict)
    arch = (config.get("architectures") or ["(none)"])[0]
    if arch != "Qwen3DSparkModel" or drafter.confidence_head is None:
        without = "" if drafter.confidence_head is not None else " without a confidence head"
        raise ValueError(f"--init {spec}: training goes on from a Qwen3-style DSpark drafter with a confidence head "
                         f"(what `dspark-chat train` writes); this one is a {arch}{without}")
    if drafter.first_slot or config.get("sliding_windows"):
        raise ValueError(f"--init {spec}: training drafts from the anchor's slot with full attention, as DeepSpec does; this "
                         "drafter " + ("drafts after the anchor (sample_from_anchor false)" if drafter.first_slot else "has sliding-window layers"))
    for key in ("torch_dtype", "dtype", *speculators.OWN_FIELDS):
        config.pop(key, None)
    return config | {"num_anchors": anchors}, drafter


def new_drafter(config: dict, target: Target, seed: int) -> DSparkDrafter:
    from transformers import Qwen3Config

    torch.manual_seed(seed)
    embed, head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    drafter = DSparkDrafter(Qwen3Config(**{k: v for k, v in config.items() if k != "architectures"}), embed, head)
    std = float(config.get("initializer_range", 0.02))
    for name, p in trainable(drafter).items():  # the initialisation of transformers' models
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)
    return drafter.to(target.device, torch.float32)


def trainable(drafter: DSparkDrafter) -> dict[str, torch.nn.Parameter]:
    """Everything but the frozen embeddings and LM head (and its draft-vocabulary rows): the target's."""
    return {n: p for n, p in drafter.named_parameters() if not n.startswith(("embed_tokens.", "lm_head.", "draft_head."))}


def choose_draft_vocab(sequences: list[Sequence], size: int, vocab_size: int, keep: tuple[int, ...]) -> torch.Tensor | None:
    """The `size` tokens the target writes most often in these answers (ties to the lower id), always
    with the `keep` tokens (the stop tokens); ascending. None when that is the whole vocabulary."""
    if size <= 0 or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        counts += torch.bincount(seq.ids[seq.prompt_len :], minlength=vocab_size)
    counts[list(keep)] = counts.max() + 1
    return torch.argsort(counts, descending=True, stable=True)[:size].sort().values


def vocab_coverage(vocab: torch.Tensor | None, sequences: list[Sequence]) -> float:
    """The share of the answers' tokens that are in the draft vocabulary."""
    if vocab is None:
        return 1.0
    answers = torch.cat([seq.ids[seq.prompt_len :] for seq in sequences])
    return float(torch.isin(answers, vocab).float().mean())


def in_draft_vocab(drafter: DSparkDrafter, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's column in the drafter's logits, and whether it has one (0 where it has not)."""
    vocab = drafter.draft_vocab
    if vocab is None:
        return token_ids, torch.ones_like(token_ids, dtype=torch.bool)
    column = torch.searchsorted(vocab, token_ids).clamp_max(len(vocab) - 1)
    known = vocab[column] == token_ids
    return column * known, known


@torch.no_grad()
def with_lse(sequences: list[Sequence], head: torch.nn.Module, chunk: int = 256) -> None:
    """The target's log-normaliser at every answer position of each sequence, once: afterwards a step
    needs the target's logits over the draft vocabulary only (its whole head over every block was most
    of a step). Labels are answer tokens, so prompt positions are never needed: NaN there."""
    weight = head.weight
    for seq in sequences:
        if seq.lse is None:
            rows = seq.last[seq.prompt_len :].split(chunk)
            answer = [torch.logsumexp(head(r.to(weight.device, weight.dtype)).float(), -1).cpu() for r in rows]
            seq.lse = torch.cat([torch.full((seq.prompt_len,), float("nan"))] + answer)


def block_hidden(drafter: DSparkDrafter, features: torch.Tensor, block_ids: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The backbone over many blocks at once, in the drafter's own modules.

    features [S, C, m*d]: context features of S sequences; block_ids [S, A, g] ([anchor, mask, ...]);
    anchors [S, A]: each block's anchor position. A block sees context positions before its anchor and
    its own block, nothing else (DeepSpec's create_dspark_attention_mask), as in inference, where the
    context holds exactly the positions before the anchor. Returns the final hidden states [S, A, g, d].
    """
    S, A, g = block_ids.shape
    C, n = features.shape[1], A * g
    x = drafter.embed_tokens(block_ids.reshape(S, n)).to(drafter.dtype)
    context = drafter.hidden_norm(drafter.fc(features.to(x.dtype)))
    ctx_pos = torch.arange(C, device=x.device)
    blk_pos = (anchors[..., None] + torch.arange(g, device=x.device)).reshape(S, n)
    ctx_cos, ctx_sin = drafter.rotary_emb(x, ctx_pos[None])
    cos, sin = drafter.rotary_emb(x, blk_pos)
    block_of = torch.arange(n, device=x.device) // g
    see_context = ctx_pos[None, None, :] < anchors.repeat_interleave(g, 1)[..., None]  # [S, n, C]
    see_block = (block_of[:, None] == block_of[None, :]).expand(S, n, n)
    mask = torch.cat([see_context, see_block], -1)[:, None]

    def heads(t, count, norm=None):
        t = t.view(t.shape[0], t.shape[1], count, -1)
        return (norm(t) if norm is not None else t).transpose(1, 2)

    def rope(t, c, s):
        return t * c[:, None] + _rotate_half(t) * s[:, None]

    for layer in drafter.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = rope(heads(attn.q_proj(h), attn.heads, attn.q_norm), cos, sin)
        k = torch.cat([rope(heads(attn.k_proj(context), attn.kv_heads, attn.k_norm), ctx_cos, ctx_sin),
                       rope(heads(attn.k_proj(h), attn.kv_heads, attn.k_norm), cos, sin)], 2)
        v = torch.cat([heads(attn.v_proj(context), attn.kv_heads), heads(attn.v_proj(h), attn.kv_heads)], 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=attn.heads != attn.kv_heads)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(S, n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.norm(x).view(S, A, g, -1)


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, -1)
    return torch.cat([-b, a], -1)


@dataclass
class Batch:
    features: torch.Tensor  # [S, C, m*d]
    block_ids: torch.Tensor  # [S, A, g]
    anchors: torch.Tensor  # [S, A]
    labels: torch.Tensor  # [S, A, g]: the token each block position must predict
    valid: torch.Tensor  # [S, A, g]: label inside the answer, and every label before it too
    last: torch.Tensor  # [S, A, g, d]: the target's final hidden state that predicted each label
    lse: torch.Tensor  # [S, A, g]: the log-sum-exp of the target's logits there (zeros when not asked for)


def make_batch(sequences: list[Sequence], anchors: list[list[int]], block_size: int, mask_token_id: int, device,
               head: torch.nn.Module | None = None) -> Batch:
    """Blocks at the given anchor positions (each in the answer, before its last token); with the
    target's head, also the log-normalisers of its distributions (for the loss)."""
    if head is not None:
        with_lse(sequences, head)
    S, A, g = len(sequences), max(len(a) for a in anchors), block_size
    C = max(s.features.shape[0] for s in sequences)
    features = torch.zeros(S, C, sequences[0].features.shape[1], dtype=torch.bfloat16)
    last = torch.zeros(S, A, g, sequences[0].last.shape[1], dtype=torch.bfloat16)
    lse = torch.zeros(S, A, g)
    block_ids = torch.full((S, A, g), mask_token_id, dtype=torch.long)
    labels = torch.zeros(S, A, g, dtype=torch.long)
    valid = torch.zeros(S, A, g, dtype=torch.bool)
    positions = torch.zeros(S, A, dtype=torch.long)
    for s, (seq, chosen) in enumerate(zip(sequences, anchors)):
        L = seq.ids.shape[0]
        features[s, : L - 1] = seq.features
        for a, anchor in enumerate(chosen):
            positions[s, a] = anchor
            block_ids[s, a, 0] = seq.ids[anchor]
            span = torch.arange(anchor + 1, min(anchor + 1 + g, L))
            labels[s, a, : len(span)] = seq.ids[span]
            valid[s, a, : len(span)] = True
            last[s, a, : len(span)] = seq.last[span - 1]
            if seq.lse is not None:
                lse[s, a, : len(span)] = seq.lse[span - 1]
    return Batch(features.to(device), block_ids.to(device), positions.to(device), labels.to(device), valid.to(device),
                 last.to(device), lse.to(device))


def draft_outputs(drafter: DSparkDrafter, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced draft logits [S, A, g, V] (the Markov head sees the true previous token) and
    confidence logits [S, A, g]. With a draft vocabulary, V is its size and column j is its j-th token."""
    hidden = block_hidden(drafter, batch.features, batch.block_ids, batch.anchors)
    logits = drafter.logits(hidden)
    prev = torch.cat([batch.block_ids[..., :1], batch.labels[..., :-1]], -1)
    head = drafter.markov_head
    if head is not None:
        weights = head.weights(drafter.draft_vocab)
        if head.kind == "rnn":  # a recurrent state: one position after another
            state, biases = None, []
            for k in range(prev.shape[-1]):
                bias, state = markov_bias(head.kind, weights, prev[..., k], hidden[..., k, :], state)
                biases.append(bias)
            logits = logits + torch.stack(biases, -2)
        else:
            logits = logits + markov_bias(head.kind, weights, prev, hidden, None)[0]
    confidence = None
    if drafter.confidence_head is not None:
        feats = hidden
        if drafter.confidence_with_markov:
            feats = torch.cat([hidden, head.markov_w1(prev).to(hidden.dtype)], -1)
        confidence = drafter.confidence_head.proj(feats).squeeze(-1)
    return logits, confidence


def dspark_loss(drafter: DSparkDrafter, batch: Batch) -> tuple[torch.Tensor, dict]:
    """The batch must carry the log-normalisers (make_batch with the target's head)."""
    logits, confidence = draft_outputs(drafter, batch)
    with torch.no_grad():  # the target's distribution over the draft vocabulary (the drafter shares its head rows)
        target_probs = torch.exp(drafter.logits(batch.last.to(logits.dtype)).float() - batch.lse[..., None])
    weights = batch.valid.cumprod(-1).float() * torch.exp(-torch.arange(logits.shape[2], device=logits.device) / DECAY)
    total = weights.sum().clamp_min(1e-6)
    logp = torch.log_softmax(logits.float(), -1)
    column, known = in_draft_vocab(drafter, batch.labels)
    ce = -logp.gather(-1, column[..., None]).squeeze(-1) * known  # a label outside the draft vocabulary cannot be drafted
    # DeepSpec's "l1" term is sum |p - q| = 2 TV; the confidence target is 1 - TV, the chance of acceptance.
    # The draft's q is 0 outside the draft vocabulary, so there |p - q| adds up to the target's mass left over.
    l1 = (logp.exp() - target_probs).abs().sum(-1) + (1 - target_probs.sum(-1)).clamp_min(0)
    accept = (1 - 0.5 * l1.detach()).clamp(0, 1)
    terms = {"ce": (ce * weights).sum() / total, "l1": (l1 * weights).sum() / total}
    loss = CE_WEIGHT * terms["ce"] + L1_WEIGHT * terms["l1"]
    if confidence is not None:
        terms["conf"] = (F.binary_cross_entropy_with_logits(confidence.float(), accept, reduction="none") * weights).sum() / total
        loss = loss + CONFIDENCE_WEIGHT * terms["conf"]
    return loss, {k: v.item() for k, v in terms.items()}


def anchor_candidates(seq: Sequence, block_size: int, full: bool) -> range:
    """Anchors are answer tokens with at least one answer token after them (DeepSpec's rule); `full`
    keeps only those whose whole block lies in the answer (for unbiased acceptance estimates)."""
    end = seq.ids.shape[0] - (block_size if full else 1)
    return range(seq.prompt_len, max(end, seq.prompt_len))


@torch.no_grad()
def evaluate(drafter: DSparkDrafter, sequences: list[Sequence], anchors_per_seq: int = 16, seed: int = 0, batch: int = 8) -> dict:
    """Greedy acceptance on held-out text, exactly as the decode loop would see it when the drafter
    drafts its block greedily: with the Markov head teacher-forced, position k's argmax is the real draft
    as long as positions before it matched the target's token, and the round ends at the first mismatch.
    Returns tau (tokens per round, bonus included), per-position match flags and confidence logits."""
    g = drafter.block_size
    rng = random.Random(seed)
    picks = []
    for seq in sequences:
        cands = anchor_candidates(seq, g, full=True)
        if len(cands):
            picks.append((seq, sorted(rng.sample(cands, min(anchors_per_seq, len(cands))))))
    matches, confidences = [], []
    for i in range(0, len(picks), batch):
        chunk = picks[i : i + batch]
        b = make_batch([s for s, _ in chunk], [a for _, a in chunk], g, drafter.mask_token_id, drafter.device)
        logits, confidence = draft_outputs(drafter, b)
        keep = b.valid.all(-1)  # rows padded for sequences with fewer anchors are dropped
        drafts = logits.argmax(-1) if drafter.draft_vocab is None else drafter.draft_vocab[logits.argmax(-1)]
        matches.append((drafts == b.labels)[keep])
        if confidence is not None:
            confidences.append(confidence.float()[keep])
    if not matches:
        raise ValueError("no held-out blocks: too few or too short held-out answers")
    match = torch.cat(matches).cpu()
    accepted = match.long().cumprod(-1).sum(-1).float()
    return {"tau": 1 + float(accepted.mean()), "blocks": int(match.shape[0]), "match": match,
            "confidence": torch.cat(confidences).cpu() if confidences else None}


# --- checkpoints ---------------------------------------------------------------------------------------
def save_checkpoint(folder: Path, drafter, optimizer, step: int, history: dict, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # each file is written whole, then renamed: a run killed mid-save keeps the previous checkpoint readable
    save_file({n: p.detach().cpu().contiguous() for n, p in trainable(drafter).items()}, folder / "drafter.safetensors.tmp")
    (folder / "drafter.safetensors.tmp").replace(folder / "drafter.safetensors")
    torch.save(optimizer.state_dict(), folder / "optimizer.pt.tmp")
    (folder / "optimizer.pt.tmp").replace(folder / "optimizer.pt")
    vocab = None if drafter.draft_vocab is None else drafter.draft_vocab.tolist()
    (folder / "state.json.tmp").write_text(json.dumps({"step": step, "history": history, "config": config, "draft_vocab": vocab}))
    (folder / "state.json.tmp").replace(folder / "state.json")


def load_checkpoint(folder: Path, drafter, optimizer) -> dict:
    with safe_open(folder / "drafter.safetensors", "pt") as f:
        params = trainable(drafter)
        with torch.no_grad():
            for name in f.keys():
                params[name].copy_(f.get_tensor(name))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return json.loads((folder / "state.json").read_text())


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 4% of the steps (DeepSpec's ratio), then cosine decay to a tenth."""
    warm = max(1, int(0.04 * steps))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


# --- the run -------------------------------------------------------------------------------------------
def train(options, log=print) -> dict:
    threads = torch.get_num_threads()
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        return _train(options, log)
    finally:
        torch.set_num_threads(threads)


def _train(options, log) -> dict:
    from tqdm import tqdm

    from .loading import cache_dir, load_target, target_repo

    out = Path(options.out)
    target = load_target(options.target, options.dtype, options.device)
    for p in target.model.parameters():
        p.requires_grad_(False)
    init_config, init = starting_drafter(options.init, target, options.anchors) if options.init else (None, None)
    resolve_architecture(options, init_config)
    layers = options.target_layers or default_layers(target.num_layers)
    if any(not -1 <= i < target.num_layers - 1 for i in layers):
        raise ValueError(f"--target-layers must be in -1..{target.num_layers - 2} (the last layer's hidden state is post-norm)")
    groups = [read_prompts(files) for files in options.prompts]
    root = Path(options.cache_dir) if options.cache_dir else cache_dir() / "train"
    caches = [root / data_key(target, prompts, layers, options) for prompts in groups]
    corpus = [seq for prompts, cache in zip(groups, caches) for seq in build_corpus(target, prompts, tuple(layers), options, cache, log)]
    if options.data_only:
        log(f"{len(corpus)} answers cached in {', '.join(map(str, caches))}")
        return {"answers": len(corpus), "caches": [str(c) for c in caches]}
    held = [s for s in corpus if s.holdout]
    pool = [s for s in corpus if not s.holdout and len(anchor_candidates(s, options.block_size, False))]
    if not held or not pool:
        raise ValueError(f"{len(corpus)} answers are too few to hold every {HOLDOUT_EVERY}th out and train on the rest")
    log(f"data: {len(pool)} training and {len(held)} held-out answers, "
        f"{sum(s.ids.shape[0] - s.prompt_len for s in pool)} training answer tokens")

    if init_config is None:
        config = drafter_config(target, options, layers)
    else:
        config = reshaped(init_config, options.layers, options.intermediate_size)
    drafter = new_drafter(config, target, options.seed)
    if init is not None:
        carry_over(init, drafter)
    if options.draft_vocab is None and init is not None:
        vocab = None if init.draft_vocab is None else init.draft_vocab.cpu()
        source = "of the --init drafter"
    else:
        vocab, source = choose_draft_vocab(pool, options.draft_vocab or 0, target.vocab_size, target.stop_ids), "the answers use most"
    coverage = {"train": vocab_coverage(vocab, pool), "held_out": vocab_coverage(vocab, held)}
    if vocab is not None:
        drafter.use_draft_vocab(vocab)
        log(f"draft vocabulary: the {len(vocab)} tokens {source} cover {coverage['train']:.2%} of the "
            f"training answers' tokens and {coverage['held_out']:.2%} of the held-out answers'")
    params = trainable(drafter)
    optimizer = torch.optim.AdamW(params.values(), lr=options.lr, weight_decay=0.0)
    checkpoint = out / "checkpoint"
    step, history = 0, {"eval": []}
    if (checkpoint / "state.json").is_file():
        saved = json.loads((checkpoint / "state.json").read_text())
        if "config" not in saved:  # a checkpoint of an earlier version, whose DeepSpec-layout config.json was the record
            saved["config"] = {k: v for k, v in json.loads((out / "config.json").read_text()).items() if k in config}
        if saved["config"] != config:
            raise ValueError(f"{out} holds a run with another configuration: choose another --out or delete {checkpoint}")
        state = load_checkpoint(checkpoint, drafter, optimizer)
        step, history = int(state["step"]), state["history"]
        log(f"resuming at step {step} from {checkpoint}")
        # The draft vocabulary selects rows of full-vocabulary weights, so the data (and with it the
        # vocabulary) may change between runs: training goes on with the new rows.
        saved_vocab = state.get("draft_vocab")
        if vocab is not None and saved_vocab is not None and saved_vocab != vocab.tolist():
            kept = set(saved_vocab) & set(vocab.tolist())
            log(f"the draft vocabulary changed with the data: {len(vocab) - len(kept)} tokens in, {len(saved_vocab) - len(kept)} out")
    save_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[options.save_dtype]
    head = target.model.get_output_embeddings()
    verifier = target_repo(target) or options.target
    noted = set()

    def save_drafter():
        for note in export.write(drafter, config, out, options.format, save_dtype, target, verifier, not options.omit_embeddings):
            if note not in noted:
                noted.add(note)
                log(f"note: {note}")

    def held_out() -> float:
        drafter.eval()
        result = evaluate(drafter, held, seed=options.seed)
        drafter.train()
        history["eval"].append({"step": step, "tau": result["tau"]})
        return result["tau"]

    if step == 0:
        tau = held_out()
        log(f"held-out tau before training: {tau:.3f}")
    tau = history["eval"][-1]["tau"]
    started = time.time()
    bar = tqdm(total=options.steps, initial=step, desc="train", file=sys.stderr, mininterval=5, dynamic_ncols=True)
    drafter.train()
    while step < options.steps:
        rng = random.Random(options.seed * 1_000_003 + step)  # a function of the step: resuming draws the same batches
        chosen = rng.sample(pool, min(options.batch, len(pool)))
        anchors = []
        for seq in chosen:
            cands = anchor_candidates(seq, options.block_size, full=False)
            anchors.append(sorted(rng.sample(cands, min(options.anchors, len(cands)))))
        batch = make_batch(chosen, anchors, options.block_size, drafter.mask_token_id, drafter.device, head)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, options.steps, options.lr)
        loss, terms = dspark_loss(drafter, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        step += 1
        history.setdefault("loss", []).append(round(loss.item(), 4))
        if step % options.eval_every == 0 or step == options.steps:
            tau = held_out()
        bar.set_postfix(loss=f"{loss.item():.3f}", ce=f"{terms['ce']:.2f}", tau=f"{tau:.2f}", refresh=False)
        bar.update(1)
        if step % options.eval_every == 0:
            log(f"step {step}/{options.steps} loss {loss.item():.4f} {' '.join(f'{k} {v:.3f}' for k, v in terms.items())} "
                f"held-out tau {tau:.3f} ({time.time() - started:.0f}s)")
        if step % options.save_every == 0 or step == options.steps:
            save_checkpoint(checkpoint, drafter, optimizer, step, history, config)
            save_drafter()
    bar.close()
    if not (out / "model.safetensors").is_file():
        save_drafter()

    drafter.eval()
    result = evaluate(drafter, held, anchors_per_seq=64, seed=options.seed + 1)
    report = calibrate.fit_and_write(result["confidence"], result["match"], out / "calibration.json")
    summary = {"step": step, "init": options.init, "tau_before": history["eval"][0]["tau"], "tau_after": result["tau"],
               "held_out_blocks": result["blocks"], "seconds": round(time.time() - started, 1),
               "draft_vocab": None if vocab is None else len(vocab), "draft_vocab_coverage": coverage, **report}
    (out / "training.json").write_text(json.dumps(summary | {"history": history}, indent=1))
    log(f"done: step {step}, held-out tau {summary['tau_before']:.3f} -> {summary['tau_after']:.3f}; "
        f"calibration ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}; wrote {out}")
    return summary


def main(args) -> int:
    train(args, log=lambda message: print(message, file=sys.stderr, flush=True))
    return 0
