"""Eagle3 drafters in vllm-project/speculators' format, made and run by the speculators package's own classes.

Run with /work/venv-eagle-speculators (torch 2.13.0+cpu, speculators 0.9.0, transformers 5.19.0).
argv: TARGET_DIR OUT_DIR. Writes OUT/<variant>/ checkpoints and OUT/expected.json.

speculators has no inference loop of its own (vLLM runs its drafters); its Eagle3DraftModel.forward is the
training-time-test pass: step 0 drafts, from every row r, the token after x_{r+1}; step j feeds row r the
teacher-forced token x_{r+1+j} and the hidden state step j-1 produced at that row. So a proposal after the
anchor at position `start` is read at row start - 1, with the rows after it holding the chain drafted so
far as the "teacher" tokens: run step 0..k with input ids [x_1..x_start, d_0..d_{k-1}] and take step k's
draft at row start - 1 as d_k. Each proposal is computed from scratch on the whole context.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config  # noqa: E402

from speculators.config import SpeculatorsConfig, VerifierConfig  # noqa: E402
from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig  # noqa: E402
from speculators.proposals.greedy import GreedyTokenProposalConfig  # noqa: E402

TARGET, OUT = Path(sys.argv[1]), Path(sys.argv[2])
SPECULATIVE_TOKENS = 5
VERIFIER_NAME = "acme/tiny-eagle3-target"
SCHEDULE = [3, 5, 0, 4, 1, 2]
PROMPT_LENGTHS = [5, 9, 16, 23]
MAX_NEW = 40
PLAIN_ROUNDS, FORCED_ROUNDS = 12, 9
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)
VARIANTS = {
    # a Llama-style layer (no q/k norms), a pruned draft vocabulary, hidden_norm before the residual and
    # one RMS norm over the concatenated features
    "speculators_llama": dict(layer=LlamaConfig(**COMMON, num_hidden_layers=1, rope_theta=10000.0), draft_vocab=128,
                              aux=[1, 3, 5], flags=dict(norm_before_residual=True, norm_before_fc=True)),
    # two Qwen3 layers (the second a plain decoder layer), the whole vocabulary, one norm per feature
    # layer, and the normed hidden state fed back between steps (Eagle 3.1's norm_output)
    "speculators_qwen3": dict(layer=Qwen3Config(**COMMON, num_hidden_layers=2, rope_theta=10000.0), draft_vocab=512,
                              aux=[2, 4, 5], flags=dict(fc_norm=True, norm_output=True)),
}


def init_random(model, seed):
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith(("embed_tokens.", "verifier_")):
            continue
        with torch.no_grad():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.4 if not name.startswith("lm_head") else 0.2)


def build(name, spec, target):
    layer_config = spec["layer"]
    layer_config._attn_implementation = "sdpa"  # speculators' dense-mask path; flex attention is for GPUs
    config = Eagle3SpeculatorConfig(
        transformer_layer_config=layer_config, draft_vocab_size=spec["draft_vocab"],
        eagle_aux_hidden_state_layer_ids=spec["aux"], **spec["flags"],
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3",
            proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=SPECULATIVE_TOKENS)],
            default_proposal_method="greedy",
            verifier=VerifierConfig(name_or_path=str(TARGET), architectures=["Qwen3ForCausalLM"]),
        ),
    )
    model = Eagle3DraftModel(config)
    init_random(model, 2)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(target.get_input_embeddings().weight)
        model.verifier_lm_head.weight.zero_()  # training-only, never saved
    if spec["draft_vocab"] < 512:
        g = torch.Generator().manual_seed(9)
        vocab = torch.randperm(512, generator=g)[: spec["draft_vocab"]].sort().values
        d2t = vocab - torch.arange(len(vocab))
        t2d = torch.zeros(512, dtype=torch.bool)
        t2d[vocab] = True
        model.load_vocab_mappings(t2d, d2t)
    folder = OUT / name
    model.save_pretrained(folder)
    saved = Eagle3SpeculatorConfig.from_pretrained(folder)
    saved.transformer_layer_config._attn_implementation = "sdpa"  # not saved; speculators defaults to flex attention
    reloaded = Eagle3DraftModel.from_pretrained(folder, config=saved).eval()
    a, b = model.state_dict(), reloaded.state_dict()
    for k in a:
        if not k.startswith("verifier_"):
            assert torch.equal(a[k], b[k]), k
    return reloaded


@torch.no_grad()
def features(target, ids, aux):
    hs = target(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([hs[i][0] for i in aux], -1)


@torch.no_grad()
def propose(model, target, ids, margins, name):
    """The chain after the anchor ids[-1], drafted by speculators' own forward as the module doc says."""
    start = len(ids) - 1
    feats = features(target, ids[:start], model.config.eagle_aux_hidden_state_layer_ids)
    captured = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: captured.append(o[0, start - 1].clone()))
    chain = []
    for k in range(SPECULATIVE_TOKENS):
        captured.clear()
        rows = torch.cat([feats, feats.new_zeros(k, feats.shape[1])])
        input_ids = torch.tensor([ids[1 : start + 1] + chain])
        drafts = model(hidden_states=rows[None], input_ids=input_ids, document_ids=torch.zeros_like(input_ids),
                       ttt_steps=k + 1)
        token = int(drafts[k][0, start - 1])
        top = torch.topk(captured[k], 2).values
        margins[name] = min(margins.get(name, 1e9), float(top[0] - top[1]))
        chain.append(token + (int(model.d2t[token]) if model.d2t is not None else 0))
    hook.remove()
    return chain


def simulate(model, target, prompt, greedy, schedule, rounds, margins, name):
    """dspark-chat's greedy decode loop with every draft verified, first drafts forced by schedule."""
    ids = prompt + greedy[:1]
    out = []
    for r in range(rounds):
        start = len(ids) - 1
        own = propose(model, target, ids, margins, name)
        done = start + 1 - len(prompt)
        n = schedule[r % len(schedule)]
        drafts = greedy[done : done + n] + own[n:]
        truth = greedy[done : done + len(drafts)]
        accepted = next((i for i, (a, b) in enumerate(zip(drafts, truth)) if a != b), len(drafts))
        committed = drafts[:accepted] + [greedy[done + accepted]]
        out.append(dict(round=r, start=start, draft_ids=own, n_forced=n, accepted=accepted, committed=committed))
        ids += committed
    return out


@torch.no_grad()
def greedy_baseline(target, prompt, n, margins):
    ids = list(prompt)
    for _ in range(n):
        logits = target(input_ids=torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2).values
        margins["target"] = min(margins.get("target", 1e9), float(top[0] - top[1]))
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def main():
    import importlib.metadata
    import transformers

    target = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(123)
    prompts = [torch.randint(4, 512, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    margins: dict[str, float] = {}
    greedy = [greedy_baseline(target, p, MAX_NEW + 48, margins) for p in prompts]
    runs, forced_runs, keys = {}, {}, {}
    for name, spec in VARIANTS.items():
        model = build(name, spec, target)
        keys[name] = {k: list(v.shape) for k, v in model.state_dict().items() if not k.startswith("verifier_")}
        runs[name] = [dict(prompt_index=i, rounds=simulate(model, target, p, greedy[i], [0], PLAIN_ROUNDS, margins, name))
                      for i, p in enumerate(prompts)]
        forced_runs[name] = [dict(prompt_index=i, rounds=simulate(model, target, p, greedy[i], SCHEDULE, FORCED_ROUNDS,
                                                                  margins, name)) for i, p in enumerate(prompts)]
    expected = dict(
        description="speculators Eagle3 reference proposals, see README.md",
        speculators_version=importlib.metadata.version("speculators"), torch_version=torch.__version__,
        transformers_version=transformers.__version__, dtype="float32", attn_implementation="sdpa",
        speculative_tokens=SPECULATIVE_TOKENS, prompt_seed=123, prompts=prompts, greedy_output_ids=greedy,
        forced_run_schedule=SCHEDULE, min_top1_top2_margins=margins, runs=runs, forced_runs=forced_runs,
        safetensors_keys=keys,
    )
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1))
    # The verifier is named by this machine's path while the models run (speculators loads its embeddings
    # from there); the files name it as a Hub id, as a published drafter does.
    for name in VARIANTS:
        path = OUT / name / "config.json"
        path.write_text(path.read_text().replace(json.dumps(str(TARGET)), json.dumps(VERIFIER_NAME)))


main()
