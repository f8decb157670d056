"""Make the speculators-format reference drafters and what speculators' own model code proposes with them.

Run with the speculators package installed (README.md here says how), never by the test suite:

    python tests/data/speculators_reference/make_reference.py [VARIANT ...]

Named variants are made again and replaced in expected.json; with none, everything is made afresh.

speculators has no decoding loop of its own (vLLM and llama.cpp run its checkpoints), so the rounds are
driven here, with DeepSpec's semantics (tests/data/deepspec_reference/README.md): greedy, every draft
verified, the target recomputed from scratch each round. Everything the drafter computes comes from the
speculators model object: its `_backbone_forward` (embeddings, fc, hidden_norm, rotary, decoder layers
with its own attention mask, norm) for the block's hidden states, its `lm_head`, its
`markov_head.block_bias` for the sequential bias, its `confidence_head`, and its `d2t` buffer.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
# The verifiers, by the names the drafters give them: resolved offline from a Hub cache made here.
TARGETS = {"acme/tiny": HERE.parent / "deepspec_reference" / "target",
           "acme/tiny-gemma4": HERE.parent / "deepspec_reference_gemma4" / "target"}
PROMPTS = json.loads((HERE.parent / "deepspec_reference" / "expected.json").read_text())["prompts"]
MAX_NEW_TOKENS = 40
FORCED_SCHEDULE = [3, 7, 0, 5, 1, 6, 2, 4]

# name -> how the drafter is built (speculators' from_training_args keywords and the decoder config)
VARIANTS = {
    # DSpark as DeepSpec drafts: from the anchor, vanilla Markov head, confidence head on [h; W1[prev]],
    # a pruned draft vocabulary of 256 of the 512 tokens
    "dspark_anchor_vanilla_pruned": dict(kind="dspark", sample_from_anchor=True, block_size=7, markov_head_type="vanilla",
                                         enable_confidence_head=True, confidence_head_with_markov=True, draft_vocab=256,
                                         layer_ids=[1, 3]),
    # DSpark in the 1+N layout (the anchor slot drafts nothing), the recurrent head, confidence on h alone
    "dspark_bonus_rnn": dict(kind="dspark", sample_from_anchor=False, block_size=8, markov_head_type="rnn",
                             enable_confidence_head=True, confidence_head_with_markov=False, draft_vocab=None,
                             layer_ids=[1, 2, 3]),
    # the gated head with no confidence head, pruned vocabulary, from the anchor
    "dspark_anchor_gated_noconf": dict(kind="dspark", sample_from_anchor=True, block_size=5, markov_head_type="gated",
                                       enable_confidence_head=False, confidence_head_with_markov=False, draft_vocab=200,
                                       layer_ids=[2, 3], seed=2),
    # the recurrent head from the anchor, full vocabulary
    "dspark_anchor_rnn": dict(kind="dspark", sample_from_anchor=True, block_size=6, markov_head_type="rnn",
                              enable_confidence_head=True, confidence_head_with_markov=True, draft_vocab=None,
                              layer_ids=[1, 3]),
    # 1+N layout, vanilla head, a sliding-window first layer (speculators' default draft attention:
    # window over the context before the anchor, causal inside the block) and a full-attention second
    "dspark_bonus_window": dict(kind="dspark", sample_from_anchor=False, block_size=7, markov_head_type="vanilla",
                                enable_confidence_head=True, confidence_head_with_markov=True, draft_vocab=300,
                                layer_ids=[1, 3], sliding_window=6, full_attention_indices=[1]),
    # DFlash as speculators trains it by default (1+N), pruned vocabulary
    "dflash_bonus_pruned": dict(kind="dflash", sample_from_anchor=False, block_size=8, draft_vocab=256, layer_ids=[1, 3],
                                seed=2),
    # DFlash drafting from the anchor, both layers sliding-window with the block attending both ways
    "dflash_anchor_window": dict(kind="dflash", sample_from_anchor=True, block_size=6, draft_vocab=None, layer_ids=[1, 2],
                                 sliding_window=5, full_attention_indices=[], sliding_window_non_causal=True),
    # For a Gemma 4 verifier, as speculators trains by default: every draft layer sliding-window, causal inside
    # the block; its Qwen3-style layers read the verifier's embedding table unscaled
    "dspark_gemma4_target": dict(kind="dspark", sample_from_anchor=True, block_size=7, markov_head_type="vanilla",
                                 enable_confidence_head=True, confidence_head_with_markov=True, draft_vocab=256,
                                 layer_ids=[1, 3], sliding_window=4, full_attention_indices=[], verifier="acme/tiny-gemma4",
                                 seed=4),
}


def hub_cache(root: Path) -> None:
    """The tiny targets laid out as Hub cache entries, so speculators resolves the verifier names offline."""
    for name, folder in TARGETS.items():
        repo = root / "hub" / ("models--" + name.replace("/", "--"))
        (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
        for file in folder.iterdir():
            shutil.copy(file, repo / "snapshots" / ("0" * 40) / file.name)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)


def decoder_config(target_config, spec: dict):
    """The draft decoder config as speculators' scripts/train.py (create_transformer_layer_config) builds it from
    the verifier's text config with --draft-arch qwen3 and --num-layers 2: the verifier's widths and activation,
    and a per-layer-type RoPE collapsed to the sliding layers' (without partial rotation)."""
    from transformers import Qwen3Config

    # The text config's global values, as the dict holds them: transformers 5.19 refuses to read Gemma 4's
    # per-layer-variable fields (num_key_value_heads, head_dim) as attributes.
    text = SimpleNamespace(**target_config.get_text_config().to_dict())
    layers = 2
    full = spec.get("full_attention_indices", list(range(layers)))
    layer_types = ["full_attention" if i in full else "sliding_attention" for i in range(layers)]
    rope = dict(text.rope_parameters)
    if "rope_theta" not in rope:
        rope = dict(rope.get("sliding_attention") or rope.get("full_attention"))
        rope.setdefault("rope_type", "default")
    rope.pop("partial_rotary_factor", None)
    return Qwen3Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
        hidden_act=getattr(text, "hidden_act", None) or text.hidden_activation, max_position_embeddings=text.max_position_embeddings,
        initializer_range=text.initializer_range, rms_norm_eps=text.rms_norm_eps, head_dim=text.head_dim,
        tie_word_embeddings=False, sliding_window=spec.get("sliding_window", 2048),
        use_sliding_window="sliding_attention" in layer_types, layer_types=layer_types, rope_parameters=rope,
    )


def build(name: str, spec: dict, target_config, out: Path) -> None:
    from speculators.models.dflash import DFlashDraftModel
    from speculators.models.dspark import DSparkDraftModel

    torch.manual_seed(spec.get("seed", 1))
    vocab = target_config.get_text_config().vocab_size
    t2d = d2t = None
    if spec["draft_vocab"]:
        kept = torch.randperm(vocab, generator=torch.Generator().manual_seed(5))[: spec["draft_vocab"]].sort().values
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[kept] = True
        d2t = kept - torch.arange(len(kept))
    args = dict(draft_vocab_size=spec["draft_vocab"] or vocab, block_size=spec["block_size"],
                verifier_name_or_path=spec.get("verifier", "acme/tiny"),
                target_layer_ids=spec["layer_ids"], mask_token_id=3, sample_from_anchor=spec["sample_from_anchor"],
                sliding_window_non_causal=spec.get("sliding_window_non_causal", False), draft_attn_impl="sdpa")
    config = decoder_config(target_config, spec)
    if spec["kind"] == "dspark":
        model = DSparkDraftModel.from_training_args(
            config, t2d=t2d, d2t=d2t, markov_rank=16, markov_head_type=spec["markov_head_type"],
            enable_confidence_head=spec["enable_confidence_head"],
            confidence_head_with_markov=spec["confidence_head_with_markov"], **args)
    else:
        model = DFlashDraftModel.from_training_args(config, t2d=t2d, d2t=d2t, **args)
    # Random trainable weights, as the DeepSpec reference's (RMSNorm weights 1, biases 0, the rest N(0, 0.2));
    # the frozen embeddings and heads stay the verifier's, as from_training_args loaded them.
    frozen = ("embed_tokens.", "lm_head.", "verifier_lm_head.", "verifier_norm.")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.startswith(frozen):
                continue
            if "norm" in pname:
                p.fill_(1.0)
            elif pname.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(out))
    # save_pretrained copies speculators' config class source beside config.json (config.py, named by
    # auto_map) for transformers' remote-code loading; dspark-chat never runs it and this repository holds
    # no fetched code, so it is left out. The weights file is written owner-only; make it readable.
    (out / "config.py").unlink()
    (out / "model.safetensors").chmod(0o644)
    print(name, sorted(json.loads((out / "config.json").read_text())), file=sys.stderr)


def load(folder: Path):
    from speculators.model import SpeculatorModel

    model = SpeculatorModel.from_pretrained(str(folder))
    model.eval()
    return model


class Proposer:
    """The speculators drafter's proposal for an anchor, computed statelessly by its own modules."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        self.block = model.block_size
        self.first = 0 if self.config.sample_from_anchor else 1  # the 1+N layout's anchor slot drafts nothing
        self.layer_ids = list(self.config.aux_hidden_state_layer_ids)

    @torch.no_grad()
    def __call__(self, ids: list[int], hidden_states) -> dict:
        start = len(ids) - 1  # the anchor's position; the context is every position before it
        total = start + self.block + 1  # select_anchors never anchors in the last block_size positions
        features = torch.cat([hidden_states[i][0, :start] for i in self.layer_ids], -1)
        features = torch.cat([features, features.new_zeros(total - start, features.shape[-1])])  # never attended
        input_ids = torch.tensor([ids + [0] * (total - len(ids))])
        loss_mask = torch.zeros(1, total, dtype=torch.long)
        loss_mask[0, start] = 1  # so select_anchors picks the anchor
        d = self.model.hidden_size
        hidden, logits, _, _, _ = self.model._backbone_forward(
            features[None], input_ids, loss_mask, torch.zeros(1, total, d), torch.zeros(1, total, dtype=torch.long),
            max_anchors=1)
        hidden, logits = hidden[0], logits[0]  # [block, d], [block, draft vocab]
        head = getattr(self.model, "markov_head", None)
        prev = torch.full((1, self.block), ids[-1], dtype=torch.long)  # slot k's previous token, filled as drafted
        drafts, corrected = [], []
        for k in range(self.first, self.block):
            step = logits[k]
            if head is not None:
                step = step + head.block_bias(prev_token_ids=prev, hidden_states=hidden[None])[0, k]
            top2 = step.topk(2).values
            corrected.append(float(top2[0] - top2[1]))
            draft = int(step.argmax())
            if self.model.d2t is not None:
                draft += int(self.model.d2t[draft])
            drafts.append(draft)
            # sample_from_anchor: slot k predicts the token at start + k + 1, the previous token of slot k + 1;
            # 1+N: slot k predicts the token at start + k, the previous token of slot k + 1 as well
            if k + 1 < self.block:
                prev[0, k + 1] = draft
        confidence = None
        conf_head = getattr(self.model, "confidence_head", None)
        if conf_head is not None:
            features = hidden
            if self.config.confidence_head_with_markov:
                features = torch.cat([hidden, head.prev_embeddings(prev)[0].to(hidden.dtype)], -1)
            confidence = conf_head(features)[self.first :].tolist()
        return {"draft_ids": drafts, "confidence_logits": confidence, "min_margin": min(corrected)}


@torch.no_grad()
def run(target, proposer: Proposer, prompt: list[int], greedy: list[int] | None, schedule: list[int] | None) -> dict:
    """Greedy speculative decoding, every draft verified; with a schedule, the first n drafts of round r are
    replaced by the target's greedy tokens (n = schedule[r % len]), the drafter's own proposal recorded."""
    ids = list(prompt)
    out = target(torch.tensor([ids]), output_hidden_states=True)
    ids.append(int(out.logits[0, -1].argmax()))
    rounds = []
    while len(ids) - len(prompt) < MAX_NEW_TOKENS:
        proposal = proposer(ids, out.hidden_states)
        verify = list(proposal["draft_ids"])
        if schedule is not None:
            forced = min(schedule[len(rounds) % len(schedule)], len(verify))
            done = len(ids) - len(prompt)
            verify[:forced] = greedy[done : done + forced]
        check = target(torch.tensor([ids + verify])).logits[0, len(ids) - 1 :].argmax(-1).tolist()
        accepted = next((i for i, (d, t) in enumerate(zip(verify, check)) if d != t), len(verify))
        committed = verify[:accepted] + [check[accepted]]
        rounds.append({"round": len(rounds), "start": len(ids) - 1, **proposal, "accepted": accepted,
                       "committed": committed} | ({"verify_ids": verify} if schedule is not None else {}))
        ids += committed
        out = target(torch.tensor([ids]), output_hidden_states=True)
    return {"output_ids": ids[len(prompt) : len(prompt) + MAX_NEW_TOKENS], "rounds": rounds}


def main() -> None:
    import importlib.metadata as metadata
    import tempfile

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp())
    hub_cache(scratch)
    os.environ["HF_HOME"] = str(scratch)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    targets, baselines = {}, {}
    for name in TARGETS:
        target = targets[name] = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, attn_implementation="sdpa").eval()
        baselines[name] = []
        with torch.no_grad():
            for prompt in PROMPTS:
                ids = list(prompt)
                for _ in range(MAX_NEW_TOKENS + 8):
                    ids.append(int(target(torch.tensor([ids])).logits[0, -1].argmax()))
                baselines[name].append(ids[len(prompt) :])
    expected = {
        "speculators_version": metadata.version("speculators"), "torch_version": torch.__version__,
        "transformers_version": metadata.version("transformers"), "dtype": "float32",
        "max_new_tokens": MAX_NEW_TOKENS, "prompts": PROMPTS, "forced_run_schedule": FORCED_SCHEDULE, "variants": {},
    }
    names = sys.argv[1:] or list(VARIANTS)
    if sys.argv[1:]:
        expected["variants"] = json.loads((HERE / "expected.json").read_text())["variants"]
    for name in names:
        spec = VARIANTS[name]
        verifier = spec.get("verifier", "acme/tiny")
        target, baseline = targets[verifier], baselines[verifier]
        folder = HERE / name
        shutil.rmtree(folder, ignore_errors=True)
        build(name, spec, target.config, folder)
        proposer = Proposer(load(folder))
        runs = [run(target, proposer, p, None, None) for p in PROMPTS]
        forced = [run(target, proposer, p, b, FORCED_SCHEDULE) for p, b in zip(PROMPTS, baseline)]
        for r, b in zip(runs + forced, baseline + baseline):
            assert r["output_ids"] == b[:MAX_NEW_TOKENS], f"{name}: speculative output differs from plain greedy"
        margin = min(rd["min_margin"] for r in runs + forced for rd in r["rounds"])
        expected["variants"][name] = {"spec": spec, "verifier": verifier, "attn_implementation": proposer.model._attn_impl,
                                      "baseline_output_ids": baseline,
                                      "min_draft_margin": margin, "runs": runs, "forced_runs": forced}
        print(f"{name}: smallest top-1/top-2 draft logit margin {margin:.2e}", file=sys.stderr)
    (HERE / "expected.json").write_text(json.dumps(expected, indent=None, separators=(",", ":")))
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
