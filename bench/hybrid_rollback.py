"""How much an exact rollback of a hybrid target's recurrent states costs a verify round, three ways side by side.

    python bench/hybrid_rollback.py FAMILY SIZE [REPEATS]     (FAMILY: qwen3_5_text or nemotron_h; SIZE: tiny or
                                                               realistic, 4 layers at hidden 2048, vocabulary 32000)

One round: a verify pass over 8 tokens (an anchor and 7 drafts) after a 64-token prompt, then the rollback to the
anchor and the first `accepted` drafts. Ways, timed interleaved in one process as CPU time on one thread (steadier
than wall time on a shared machine):
- crop only: what main did, wrong for recurrent states; the floor.
- per-position (engine/hybrid.py): the scans run one position at a time and the kept position's state is put back.
- snapshot + mixers: the states copied before the pass; on a rejection put back, and only the recurrent layers'
  mixers rerun over the kept tokens (their inputs kept by forward hooks).
- snapshot + full pass: the same, rerunning the whole model over the kept tokens.
Each way's states after the round are checked against a fresh cache fed only the kept tokens first."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dspark_chat.engine.hybrid import HybridStates, stateful_layers  # noqa: E402
from tests.hybrids import COMMON, FAMILIES  # noqa: E402

REALISTIC = {
    "qwen3_5_text": dict(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=4, intermediate_size=6144, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, layer_types=["linear_attention"] * 3 + ["full_attention"],
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128),
    "nemotron_h": dict(
        vocab_size=32000, hidden_size=2048, layers_block_type=["linear_attention", "mlp", "linear_attention", "full_attention"],
        intermediate_size=8192, num_attention_heads=16, num_key_value_heads=2, head_dim=128, mamba_num_heads=64,
        mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4, expand=2, chunk_size=128),
}
WAYS = ("crop only (wrong)", "per-position", "snapshot + mixers", "snapshot + full pass")
PASS, PROMPT = 8, 64


def build(family: str, size: str):
    fields = COMMON | FAMILIES[family] if size == "tiny" else REALISTIC[family] | dict(tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **fields), dtype=torch.float32).eval()


def run(model, cache, ids, start):
    return model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                 position_ids=torch.arange(start, start + len(ids))[None], logits_to_keep=len(ids)).logits


def crop_keys(cache, drop):
    for layer in cache.layers:
        if isinstance(layer, DynamicLayer) and drop:
            DynamicLayer.crop(layer, -drop)


class Way:
    def __init__(self, name, model, prompt):
        self.name, self.model = name, model
        self.cache = DynamicCache(config=model.config)
        self.cache.activate_past_recording()
        self.states = HybridStates(model, self.cache)
        self.inputs = {}
        if name == "snapshot + mixers":
            stateful = {i for i, layer in enumerate(self.cache.layers) if layer in stateful_layers(self.cache)}
            self.mixers = [m for m in model.modules()
                           if getattr(m, "layer_idx", None) in stateful and any(isinstance(c, nn.Conv1d) for c in m.children())]
            for m in self.mixers:
                m.register_forward_pre_hook(self.keep_input, with_kwargs=True)
        run(model, self.cache, prompt, 0)
        self.states.passed(len(prompt))

    def keep_input(self, module, args, kwargs):
        self.inputs[module] = kwargs.get("hidden_states", args[0] if args else None)

    def snapshot(self):
        return [({i: s.clone() for i, s in layer.conv_states.items()}, {i: s.clone() for i, s in layer.recurrent_states.items()})
                for layer in self.states.layers]

    def restore(self, saved):
        for layer, (conv, recurrent) in zip(self.states.layers, saved):
            layer.conv_states.update(conv)
            for i, s in recurrent.items():
                layer.recurrent_states[i].copy_(s)

    def round(self, ids, start, accepted):
        drop = PASS - accepted - 1
        if self.name == "per-position":
            with self.states.per_position(True):
                run(self.model, self.cache, ids, start)
            self.states.passed(PASS)
            crop_keys(self.cache, drop)
            self.states.drop(drop)
            return
        saved = self.snapshot() if self.name.startswith("snapshot") else None
        run(self.model, self.cache, ids, start)
        self.states.passed(PASS)
        if drop and self.name == "crop only (wrong)":
            crop_keys(self.cache, drop)
        elif drop:
            crop_keys(self.cache, PASS if self.name == "snapshot + full pass" else drop)
            self.restore(saved)
            if self.name == "snapshot + full pass":
                run(self.model, self.cache, ids[: accepted + 1], start)
            else:
                for mixer in self.mixers:
                    mixer(hidden_states=self.inputs[mixer][:, : accepted + 1], cache=self.cache)
            self.states.passed(accepted + 1)

    def back_to(self, length):
        held = next(layer.keys.shape[-2] for layer in self.cache.layers if isinstance(layer, DynamicLayer) and layer.is_initialized)
        crop_keys(self.cache, held - length)


@torch.inference_mode()
def main(family: str, size: str, repeats: int = 5) -> None:
    torch.set_num_threads(1)
    model = build(family, size)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(4, vocab, (PROMPT,), generator=g).tolist()
    rounds = [torch.randint(4, vocab, (PASS,), generator=g).tolist() for _ in range(3)]
    accepted = (0, 3, 7)
    # Exactness first: after a round, the next token's logits against a cache fed only the kept tokens.
    for a, ids in zip(accepted, rounds):
        truth = Way("crop only (wrong)", model, prompt)
        run(model, truth.cache, ids[: a + 1], PROMPT)
        want = run(model, truth.cache, [5], PROMPT + a + 1)
        errors = []
        for name in WAYS:
            way = Way(name, model, prompt)
            way.round(ids, PROMPT, a)
            errors.append(f"{name} {(run(model, way.cache, [5], PROMPT + a + 1) - want).abs().max():.0e}")
        print(f"accepted {a}: next-token logits off by " + ", ".join(errors))
    ways = [Way(name, model, prompt) for name in WAYS]
    times = {(w.name, a): [] for w in ways for a in accepted}
    for repeat in range(repeats + 1):  # the first sweep warms up
        for a, ids in zip(accepted, rounds):
            for way in ways:
                start = time.process_time()
                way.round(ids, PROMPT, a)
                if repeat:
                    times[(way.name, a)].append((time.process_time() - start) * 1000)
                way.back_to(PROMPT)  # the states run on; only their cost matters from here
    print(f"\n{family} {size}: a verify round of {PASS} tokens after {PROMPT}, CPU ms on one thread, median of {repeats}")
    print(f"{'':<22}" + "".join(f"{'accepted ' + str(a):>14}" for a in accepted))
    for way in ways:
        print(f"{way.name:<22}" + "".join(f"{statistics.median(times[(way.name, a)]):>14.1f}" for a in accepted))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(x) for x in sys.argv[3:]))
