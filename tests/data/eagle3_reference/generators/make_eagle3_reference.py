"""Eagle3 reference data from DeepSpec's own code (Qwen3Eagle3Model / Gemma4Eagle3Model and their evaluator).

Run with /work/venv-eagle-deepspec (torch 2.13.0+cpu, transformers 5.10.2) from /work/scratch-eagle/deepspec,
a `git archive` export of DeepSpec. Writes tiny checkpoints and expected.json to OUT/<family>/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, "/work/scratch-eagle/deepspec")
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from deepspec.eval.eagle3 import Gemma4Eagle3Evaluator, Qwen3Eagle3Evaluator  # noqa: E402

OUT = Path(sys.argv[2])
FAMILY = sys.argv[1]
LAYER_IDS = [0, 1, 2, 3, 4]
TTT = 7
MAX_NEW = 40
SCHEDULE = [3, 7, 0, 5, 1, 6, 2, 4]
PROMPT_LENGTHS = [5, 9, 16, 23]
DRAFT_STD = 0.4
GEMMA4_FC_SCALE = 0.02


def init_random(model, seed, skip=(), std=0.2):
    """Norm weights ~ N(1, 0.2) (so a norm applied in the wrong place shows), biases 0, the rest N(0, std)."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if any(name.startswith(s) for s in skip):
            continue
        with torch.no_grad():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std)


def build_target(folder: Path):
    if FAMILY == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        config._attn_implementation = "sdpa"
        model = Qwen3ForCausalLM(config)
        init_random(model, 0)
    else:
        from transformers import Gemma4Config, Gemma4ForConditionalGeneration

        base = json.loads(Path("/work/eagle/tests/data/deepspec_reference_gemma4/target/config.json").read_text())
        text = base["text_config"]
        text["num_hidden_layers"] = 6
        text["layer_types"] = ["sliding_attention", "full_attention"] * 3
        config = Gemma4Config(**{k: v for k, v in base.items() if k not in ("architectures", "transformers_version")})
        config._attn_implementation = "sdpa"
        model = Gemma4ForConditionalGeneration(config)
        init_random(model, 0)
        torch.manual_seed(5)
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):
                buf.uniform_(0.6, 1.4)
    model.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    return reloaded


def build_drafter(folder: Path, target_folder: Path, target, k_eq_v: bool | None = None):
    model_args = SimpleNamespace(
        target_layer_ids=LAYER_IDS, ttt_length=TTT, step_loss_decay=0.8, draft_num_hidden_layers=1,
        target_model_name_or_path="acme/tiny-eagle3-target",
    )
    target_config = AutoConfig.from_pretrained(target_folder)
    if FAMILY == "qwen3":
        from deepspec.modeling.eagle3.qwen3 import Qwen3Eagle3Model, build_draft_config

        cls = Qwen3Eagle3Model
    else:
        from deepspec.modeling.eagle3.gemma4 import Gemma4Eagle3Model, build_draft_config

        cls = Gemma4Eagle3Model
        target_config.text_config.attention_k_eq_v = k_eq_v
    draft_config = build_draft_config(target_config=target_config, model_args=model_args)
    draft_config._attn_implementation = "sdpa"
    draft = cls(draft_config)
    init_random(draft, 1, skip=("embed_tokens.", "lm_head."), std=DRAFT_STD)
    if FAMILY == "gemma4":
        # Gemma 4's hidden states are large (embeddings times sqrt(d)): a smaller fc keeps the projected
        # features from drowning what the layer adds, so each chain step moves the draft.
        with torch.no_grad():
            draft.fc.weight.mul_(GEMMA4_FC_SCALE)
        torch.manual_seed(6)
        for name, buf in draft.named_buffers():
            if name.endswith("layer_scalar"):
                buf.uniform_(0.6, 1.4)
    draft.initialize_embeddings_and_head(
        embed_tokens=target.get_input_embeddings(), lm_head=target.get_output_embeddings(), freeze=True
    )
    draft.save_pretrained(folder)
    reloaded = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    a, b = draft.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "reload is not bit-identical"
    return reloaded


@torch.no_grad()
def greedy_baseline(target, prompt, n):
    ids = list(prompt)
    out = []
    for _ in range(n):
        logits = target(input_ids=torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2).values
        MARGINS["target"] = min(MARGINS.get("target", 1e9), float(top[0] - top[1]))
        t = int(logits.argmax())
        ids.append(t)
        out.append(t)
    return out


MARGINS: dict[str, float] = {}


def run(evaluator_cls, target, draft, prompt, name, forced_greedy=None):
    ev = evaluator_cls.__new__(evaluator_cls)
    ev.args = SimpleNamespace(temperature=0.0, max_new_tokens=MAX_NEW, confidence_threshold=0.0)
    ev.target_model, ev.draft_model = target, draft
    rounds = []
    propose, update, compute_logits = ev._propose, ev._update, draft.compute_logits
    state = {}

    def recording_logits(hidden):
        logits = compute_logits(hidden)
        top = torch.topk(logits[0, -1], 2).values
        MARGINS[name] = min(MARGINS.get(name, 1e9), float(top[0] - top[1]))
        return logits

    def recording_propose(*, context, output_ids, position_ids, start, stop_token_ids=None):
        before = context.draft_cache.get_seq_length()
        proposal = propose(context=context, output_ids=output_ids, position_ids=position_ids, start=start,
                           stop_token_ids=stop_token_ids)
        own = proposal.verify_input_ids[0, 1:].tolist()
        record = dict(round=len(rounds), start=start, current_token=int(output_ids[0, start]),
                      draft_cache_len_before=before, draft_cache_len_after_propose=context.draft_cache.get_seq_length(),
                      draft_ids=own)
        if forced_greedy is not None:
            n = SCHEDULE[len(rounds) % len(SCHEDULE)]
            done = start + 1 - len(prompt)  # the drafts stand at positions start + 1 ...
            forced = torch.tensor(forced_greedy[done : done + n])
            proposal.verify_input_ids[0, 1 : 1 + n] = forced
            record["n_forced"] = n
            record["verify_ids"] = proposal.verify_input_ids[0, 1:].tolist()
        rounds.append(record)
        state["record"] = record
        return proposal

    def recording_update(context, verification):
        update(context, verification)
        record = state["record"]
        record["accepted"] = int(verification.accepted_draft_tokens)
        record["committed"] = verification.committed_tokens[0].tolist()
        record["draft_cache_len_after"] = context.draft_cache.get_seq_length()

    ev._propose, ev._update = recording_propose, recording_update
    draft.compute_logits = recording_logits
    torch.manual_seed(0)
    result = ev.generate_one_sample(input_ids=torch.tensor([prompt]), stop_token_ids=None)
    draft.compute_logits = compute_logits
    for r in rounds:  # the last round ends the loop before _update: record its outcome from the output
        r.setdefault("accepted", None)
    out = result.output_ids[0, len(prompt):].tolist()
    return dict(output_ids=out, acceptance_lengths=result.acceptance_lengths, rounds=rounds)


def main():
    family_out = OUT / FAMILY
    target = build_target(family_out / "target")
    g = torch.Generator().manual_seed(123)
    prompts = [torch.randint(4, 512, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    baseline = [greedy_baseline(target, p, MAX_NEW + 8) for p in prompts]
    evaluator = Qwen3Eagle3Evaluator if FAMILY == "qwen3" else Gemma4Eagle3Evaluator
    variants = {"eagle3": None} if FAMILY == "qwen3" else {"eagle3": True, "eagle3_kv": False}
    runs, forced_runs, keys = {}, {}, {}
    for variant, k_eq_v in variants.items():
        draft = build_drafter(family_out / variant, family_out / "target", target, k_eq_v)
        keys[variant] = {k: list(v.shape) for k, v in draft.state_dict().items()}
        runs[variant], forced_runs[variant] = [], []
        for i, prompt in enumerate(prompts):
            plain = run(evaluator, target, draft, prompt, variant)
            assert plain["output_ids"] == baseline[i][:MAX_NEW], (variant, i)
            forced = run(evaluator, target, draft, prompt, variant, forced_greedy=baseline[i])
            assert forced["output_ids"] == baseline[i][:MAX_NEW], (variant, i, "forced")
            runs[variant].append(dict(prompt_index=i, **plain))
            forced_runs[variant].append(dict(prompt_index=i, **forced))
    import transformers

    expected = dict(
        description="DeepSpec Eagle3 reference outputs, see README.md",
        deepspec_commit="afdfa7c9382a3341a3e6f17756dd816da79f132c",
        torch_version=torch.__version__, transformers_version=transformers.__version__, dtype="float32",
        attn_implementation="sdpa", temperature=0.0, ttt_length=TTT, max_new_tokens=MAX_NEW, target_layer_ids=LAYER_IDS,
        prompt_seed=123, prompts=prompts, baseline_output_ids_extended=baseline, forced_run_schedule=SCHEDULE,
        min_top1_top2_margins=MARGINS, runs=runs, forced_runs=forced_runs, safetensors_keys=keys,
    )
    (family_out / "expected.json").write_text(json.dumps(expected, indent=1))


main()
