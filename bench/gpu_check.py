"""What the compiled path does on a GPU, in one command, without downloads: random-weight targets at the real
shapes of Qwen3-8B and Qwen3-4B (bfloat16) and a DSpark drafter at the released shape (5 layers, block 7, a
rank-256 Markov head and a confidence head), each run eagerly and compiled (CUDA graphs):

- a target pass over B = 1..8 tokens after a 512-token context, and the drafter's block;
- plain decoding, and decoding where each round's first k drafts (k = 0..7) are the target's own tokens,
  so exactly k are accepted (the drafter's own drafts after them are random, so rejected): tok/s;
- weight bytes x one-token passes per second against the device's bandwidth, measured by a copy;
- the device-to-host reads in a decode round (torch's sync debug mode counts them).

    python bench/gpu_check.py                        # both shapes on cuda, about 5-8 minutes on one GPU
    python bench/gpu_check.py --small --device cpu   # tiny shapes on a CPU: the whole path, for a test

The issue's goals for Qwen3-8B: a compiled one-token pass within 1.3x the weight-read time, an 8-token pass
within 1.2x a one-token pass. Random weights change no pass time: the same products run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from dspark_chat.engine.compiled import CompiledTarget, compile_drafter
from dspark_chat.engine.decode import decode
from dspark_chat.engine.dspark import DSparkDrafter
from dspark_chat.engine.loading import cache_dir
from dspark_chat.engine.sampling import Proposal, Sampling
from dspark_chat.engine.scheduler import Scheduler
from dspark_chat.engine.target import Target

SHAPES = {
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "small": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False),
}
# The released drafters' shape (DeepSpec's dspark_qwen3_*_block7); the small one for a CPU test.
DRAFTER = dict(block_size=7, num_hidden_layers=5, target_layer_ids=[1, 9, 17, 25, 33], markov_rank=256)
SMALL_DRAFTER = dict(block_size=7, num_hidden_layers=2, target_layer_ids=[0, 2], markov_rank=8)
CONTEXT = 512


class NoText:
    """The loop's text events need a tokenizer; random weights have no text to show."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


class Forced:
    """Drafts with the DSpark drafter, its first k drafts replaced by the target's own greedy tokens: each
    round accepts k (the drafter's random drafts after them are rejected)."""

    def __init__(self, drafter, k: int, prompt_length: int, greedy: list[int]):
        self.drafter, self.k, self.prompt_length, self.greedy = drafter, k, prompt_length, greedy
        self.block_size, self.feature_layers = drafter.block_size, drafter.feature_layers

    def rewind(self, length):
        return self.drafter.rewind(length)

    def observe(self, features):
        self.drafter.observe(features)

    def propose(self, ids, limit, sampling, generator=None):
        proposal = self.drafter.propose(ids, limit, sampling, generator)
        done = len(ids) - self.prompt_length
        own = self.greedy[done : done + min(self.k, len(proposal.tokens))]
        tokens = torch.cat([torch.tensor(own, dtype=torch.long).to(proposal.tokens.device, non_blocking=True),
                            proposal.tokens[len(own):]])
        return Proposal(tokens, None, proposal.confidence_logits)


def build(shape: str, dtype: torch.dtype, device: torch.device):
    small = shape == "small"
    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=40960, rope_theta=1_000_000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(config, dtype=dtype).eval()
    target = Target(model, NoText(), shape)
    target.stop_ids = ()  # random weights: never stop early
    target.max_length = 4096
    fields = SMALL_DRAFTER if small else DRAFTER
    drafter_config = Qwen3Config(**(config.to_dict() | fields | dict(
        num_target_layers=config.num_hidden_layers, mask_token_id=0, markov_head_type="vanilla",
        enable_confidence_head=True, confidence_head_with_markov=True, layer_types=["full_attention"] * fields["num_hidden_layers"])))
    with torch.device(device):
        drafter = DSparkDrafter(drafter_config, model.get_input_embeddings(), model.get_output_embeddings()).to(dtype).eval()
    drafter.rotary_emb = type(drafter.rotary_emb)(drafter_config).to(device)
    return target, drafter


def synced(device: torch.device, run) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def pass_ms(target, width: int, repeats: int) -> float:
    ids = [(i * 7919) % target.vocab_size for i in range(CONTEXT + width)]
    target.rewind(0)
    target.forward(ids[:CONTEXT], last_only=True)
    times = []
    for _ in range(repeats + 1):
        times.append(synced(target.device, lambda: target.forward(ids[CONTEXT:])))
        target.rewind(CONTEXT)
    return statistics.median(times[1:]) * 1000


def block_ms(target, drafter, repeats: int) -> float:
    ids = [(i * 7919) % target.vocab_size for i in range(CONTEXT)]
    target.rewind(0)
    drafter.rewind(0)
    _, features = target.forward(ids[:-1], drafter.feature_layers, last_only=True)  # the anchor is the last id
    drafter.observe(features)
    context = torch.tensor(ids)
    times = [synced(target.device, lambda: drafter.propose(context, drafter.block_size, Sampling())) for _ in range(repeats + 1)]
    return statistics.median(times[1:]) * 1000


def decoded(target, drafter, prompt: list[int], tokens: int) -> tuple[list[int], float, float]:
    """Tokens, decode tok/s (after the first token) and device-to-host reads per round."""
    target.rewind(0)
    if drafter is not None:
        drafter.rewind(0)
    reads, rounds = 0, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if target.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            steps = list(decode(target, drafter, prompt, Sampling(), tokens, Scheduler(mode="off")))
        finally:
            if target.device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        reads = sum("synchroniz" in str(w.message) for w in caught)
    rounds = len(steps) - 1
    ids = [t for s in steps for t in s.token_ids]
    seconds = (steps[-1].elapsed_ms - steps[0].elapsed_ms) / 1000
    return ids, (len(ids) - 1) / seconds, (reads - 1) / rounds if rounds and target.device.type == "cuda" else float("nan")


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second a device-to-device copy moves (read plus write): what weight reads can reach."""
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = min(synced(device, lambda: target.copy_(source)) for _ in range(5))
    return 2 * nbytes / seconds


def check(shape: str, args, device: torch.device, dtype: torch.dtype) -> None:
    eager, drafter = build(shape, dtype, device)
    model = eager.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:  # the input embedding is read one row per token
        weight_bytes -= model.get_input_embeddings().weight.numel() * dtype.itemsize
    started = time.perf_counter()
    compiled = CompiledTarget(model, NoText(), shape, max_width=drafter.block_size + 1, feature_layers=drafter.feature_layers,
                              max_length=eager.max_length)
    compiled.stop_ids = ()
    compiled.compile()
    twin = copy.copy(drafter)
    compile_drafter(twin, compiled.max_length)
    print(f"{shape}: compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    rows: dict[str, list[str]] = {}
    variants = {"eager": (eager, drafter), "compiled": (compiled, twin)}
    for name, (target, draft) in variants.items():
        rows.setdefault("weight-read bound (ms)", []).append(f"{weight_bytes / args.bandwidth * 1000:.2f}")
        passes = [pass_ms(target, b, args.repeats) for b in range(1, 9)]
        for b, ms in enumerate(passes, 1):
            rows.setdefault(f"pass B={b} (ms)", []).append(f"{ms:.2f}")
        rows.setdefault("B=8 / B=1", []).append(f"{passes[7] / passes[0]:.2f}")
        achieved = weight_bytes / (passes[0] / 1000)
        rows.setdefault("B=1 bandwidth (GB/s, % of copy)", []).append(f"{achieved / 1e9:.0f} ({achieved / args.bandwidth:.0%})")
        rows.setdefault("drafter block (ms)", []).append(f"{block_ms(target, draft, args.repeats):.2f}")
        prompt = [(i * 7919) % target.vocab_size for i in range(CONTEXT)]
        greedy, rate, _ = decoded(target, None, prompt, args.tokens)
        rows.setdefault("plain decode (tok/s)", []).append(f"{rate:.1f}")
        for k in range(drafter.block_size + 1):
            forced = Forced(draft, k, len(prompt), greedy + [0] * 8)
            _, rate, reads = decoded(target, forced, prompt, args.tokens)
            rows.setdefault(f"{k} drafts accepted (tok/s)", []).append(f"{rate:.1f}")
        rows.setdefault("device-to-host reads per round", []).append(f"{reads:.1f}" if reads == reads else "-")
    print(f"\n{shape} shape, {dtype}, {describe(device)}; weights {weight_bytes / 1e6:.1f} MB read per pass")
    print(f"{'':34}{'eager':>12}{'compiled':>12}")
    for label, values in rows.items():
        print(f"{label:34}" + "".join(f"{v:>12}" for v in values))


def describe(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=["qwen3-8b", "qwen3-4b"], choices=[s for s in SHAPES if s != "small"])
    parser.add_argument("--small", action="store_true", help="tiny shapes in float32: the whole path in little time (a CPU test)")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per decode run")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per measurement (their median)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu --small for the CPU run)", file=sys.stderr)
        return 2
    import os

    from dspark_chat.engine.compiled import cache_folder

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_folder(cache_dir(), device) / "inductor"))
    dtype = torch.float32 if args.small else torch.bfloat16
    args.bandwidth = copy_bandwidth(device, 1 << 24 if args.small else 4 << 30)
    print(f"{describe(device)}: a device-to-device copy moves {args.bandwidth / 1e9:.0f} GB/s", file=sys.stderr)
    with torch.inference_mode():
        for shape in ["small"] if args.small else args.shapes:
            check(shape, args, device, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
