"""The fit planner on described machines (no GPU needed), the accelerate placement on the meta device,
and the from_pretrained arguments each plan gives the loader."""

from __future__ import annotations

import dataclasses
import pytest
import torch
from transformers import Qwen3Config

from dspark_chat.engine.catalog import load_catalog
from dspark_chat.engine.hardware import (
    DEVICE_OVERHEAD, GiB, Gpu, Hardware, PlanError, detect, estimate, parse_max_memory, place, plan_pair,
)

RTX_4090 = dict(name="NVIDIA GeForce RTX 4090", total=24 * GiB, free=int(23.5 * GiB))
MACHINES = {
    "dgx-spark": Hardware((Gpu("NVIDIA GB10", 128 * GiB, 119 * GiB, 0, unified=True),), 128 * GiB, 119 * GiB),
    "one-24gb": Hardware((Gpu(index=0, **RTX_4090),), 64 * GiB, 58 * GiB),
    "two-24gb": Hardware((Gpu(index=0, **RTX_4090), Gpu(index=1, **RTX_4090)), 64 * GiB, 58 * GiB),
    "laptop-8gb": Hardware((Gpu("NVIDIA GeForce RTX 4060 Laptop GPU", 8 * GiB, int(7.6 * GiB), 0),), 16 * GiB, 12 * GiB),
    "cpu-16gb": Hardware((), 16 * GiB, 14 * GiB),
    "cpu-32gb": Hardware((), 32 * GiB, 29 * GiB),
}
# (placement, dtype or quantisation) per machine and pair; None: refused. Every row was checked by hand
# against the sizes (e.g. Qwen3-14B in bf16 is 27.5 GiB of weights: two 24 GB cards, or 8-bit on one; Qwen3.6-27B
# in 4-bit is 17.5 GiB of weights, 24.2 GiB with its drafter, 19 copies of its 148 MiB of recurrent state and its
# KV cache: more than one 24 GB card holds).
SMALL = ("gpu", "bfloat16")
HYBRIDS = {"lfm25-1-2b-lookup": SMALL, "qwen36-27b-dspark": None, "qwen36-35b-a3b-dspark": None}
EXPECTED = {
    "dgx-spark": {name: SMALL for name in load_catalog().pairs},
    "one-24gb": {"smollm2": SMALL, "qwen3-4b-dspark": SMALL, "qwen3-4b-dflash": SMALL, "qwen3-8b-dspark": SMALL,
                 "qwen3-8b-dflash": SMALL, "qwen3-14b-dspark": ("gpu", "8bit"), "qwen3-14b-dflash": ("gpu", "8bit"),
                 "gemma4-12b-dspark": ("gpu", "8bit"), "gemma4-12b-dflash": ("gpu", "8bit")} | HYBRIDS,
    "two-24gb": {"smollm2": SMALL, "qwen3-4b-dspark": SMALL, "qwen3-4b-dflash": SMALL, "qwen3-8b-dspark": SMALL,
                 "qwen3-8b-dflash": SMALL, "qwen3-14b-dspark": ("sharded", "bfloat16"),
                 "qwen3-14b-dflash": ("sharded", "bfloat16"), "gemma4-12b-dspark": ("sharded", "bfloat16"),
                 "gemma4-12b-dflash": ("sharded", "bfloat16"), "lfm25-1-2b-lookup": SMALL,
                 "qwen36-27b-dspark": ("sharded", "8bit"), "qwen36-35b-a3b-dspark": ("sharded", "8bit")},
    "laptop-8gb": {"smollm2": SMALL, "qwen3-4b-dspark": ("gpu", "4bit"), "qwen3-4b-dflash": ("gpu", "4bit"),
                   "qwen3-8b-dspark": None, "qwen3-8b-dflash": None, "qwen3-14b-dspark": None,
                   "qwen3-14b-dflash": None, "gemma4-12b-dspark": None, "gemma4-12b-dflash": None} | HYBRIDS,
    "cpu-16gb": {"smollm2": ("cpu", "float32"), "qwen3-4b-dspark": ("cpu", "bfloat16"),
                 "qwen3-4b-dflash": ("cpu", "bfloat16"), "qwen3-8b-dspark": None, "qwen3-8b-dflash": None,
                 "qwen3-14b-dspark": None, "qwen3-14b-dflash": None, "gemma4-12b-dspark": None,
                 "gemma4-12b-dflash": None} | HYBRIDS | {"lfm25-1-2b-lookup": ("cpu", "float32")},
    "cpu-32gb": {"smollm2": ("cpu", "float32"), "qwen3-4b-dspark": ("cpu", "float32"),
                 "qwen3-4b-dflash": ("cpu", "float32"), "qwen3-8b-dspark": ("cpu", "bfloat16"),
                 "qwen3-8b-dflash": ("cpu", "bfloat16"), "qwen3-14b-dspark": None, "qwen3-14b-dflash": None,
                 "gemma4-12b-dspark": None, "gemma4-12b-dflash": None} | HYBRIDS | {"lfm25-1-2b-lookup": ("cpu", "float32")},
}
# The speculators-format pairs (every number estimated, see models.toml).
SPECULATORS_PLANS = {
    "one-24gb": {"qwen3-8b-speculators-dspark": SMALL, "gemma4-31b-dspark": None, "gemma4-31b-dflash": None,
                 "gemma4-26b-a4b-dspark": ("gpu", "4bit")},
    "two-24gb": {"qwen3-8b-speculators-dspark": SMALL, "gemma4-31b-dspark": ("sharded", "8bit"),
                 "gemma4-31b-dflash": ("sharded", "8bit"), "gemma4-26b-a4b-dspark": ("sharded", "8bit")},
    "laptop-8gb": dict.fromkeys(["qwen3-8b-speculators-dspark", "gemma4-31b-dspark", "gemma4-31b-dflash", "gemma4-26b-a4b-dspark"]),
    "cpu-16gb": dict.fromkeys(["qwen3-8b-speculators-dspark", "gemma4-31b-dspark", "gemma4-31b-dflash", "gemma4-26b-a4b-dspark"]),
    "cpu-32gb": {"qwen3-8b-speculators-dspark": ("cpu", "bfloat16"), "gemma4-31b-dspark": None, "gemma4-31b-dflash": None,
                 "gemma4-26b-a4b-dspark": None},
}
for machine, plans in SPECULATORS_PLANS.items():
    EXPECTED[machine] |= plans
# Eagle3 pairs plan as their DSpark counterparts (their drafters are smaller), except that on the 8 GB laptop
# Qwen3-4B's 1.9 GB Eagle3 drafter leaves room for the target in 8-bit, where DSpark's 2.8 GB needs 4-bit.
EAGLE3_PAIRS = [name for name in load_catalog().pairs if name.endswith("-eagle3")]
for machine, plans in EXPECTED.items():
    if machine != "dgx-spark":
        plans.update({name: plans[name.removesuffix("-eagle3") + "-dspark"] for name in EAGLE3_PAIRS})
EXPECTED["laptop-8gb"]["qwen3-4b-eagle3"] = ("gpu", "8bit")


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_every_machine_gets_a_sensible_plan_for_every_pair(catalog):
    assert set(EXPECTED["one-24gb"]) == set(catalog.pairs)
    for machine, hardware in MACHINES.items():
        for name, expected in EXPECTED[machine].items():
            pair = catalog.pairs[name]
            if expected is None:
                with pytest.raises(PlanError, match=f"{name} does not fit this machine"):
                    plan_pair(pair, hardware)
                continue
            plan = plan_pair(pair, hardware)
            assert (plan.placement, plan.quant or plan.dtype) == expected, (machine, name, plan.explain())
            assert plan.fits and plan.need.total <= plan.usable
            # the plan only uses devices the machine has, and holds within what they offer
            gpus = {f"cuda:{g.index}": g for g in hardware.gpus}
            assert set(plan.devices) <= set(gpus) | {"cpu"}
            for device in plan.devices:
                room = gpus[device].free if device in gpus else hardware.ram_free
                assert room >= DEVICE_OVERHEAD
            if plan.placement == "sharded":
                assert sum(plan.max_memory.values()) >= plan.need.weights
                assert all(plan.max_memory[g.index] + DEVICE_OVERHEAD < g.free for g in hardware.gpus if f"cuda:{g.index}" in plan.devices)
            assert plan.drafter_device == plan.devices[-1]
            assert name in plan.explain() and "plan:" in plan.explain()


def test_the_plan_prefers_the_fastest_arrangement_that_fits(catalog):
    """Quantisation only when bf16 fits no GPU and no set of GPUs; the notes say what was tried first."""
    plan = plan_pair(catalog.pairs["qwen3-14b-dspark"], MACHINES["one-24gb"])
    assert plan.notes == (f"bfloat16 on one GPU (cuda:0, {plan.usable / GiB:.1f} GiB usable) needs 32.4 GiB: too much",)
    laptop = plan_pair(catalog.pairs["qwen3-4b-dspark"], MACHINES["laptop-8gb"])
    assert [n.split(" on ")[0] for n in laptop.notes] == ["bfloat16", "8-bit"]
    cpu = plan_pair(catalog.pairs["qwen3-4b-dspark"], MACHINES["cpu-16gb"])
    assert any("runs on the CPU" in w for w in cpu.warnings) and any("float32 does not fit" in w for w in cpu.warnings)


def test_a_pair_that_fits_nowhere_is_refused_with_what_it_needs(catalog):
    small = Hardware((Gpu("NVIDIA GeForce RTX 3070 Laptop GPU", 8 * GiB, int(7.6 * GiB), 0),), 8 * GiB, 6 * GiB)
    with pytest.raises(PlanError) as refused:
        plan_pair(catalog.pairs["qwen3-14b-dspark"], small)
    message = str(refused.value)
    assert "qwen3-14b-dspark does not fit this machine" in message
    assert "15.7 GiB on a CUDA GPU (4-bit)" in message and "33.4 GiB of RAM (bfloat16)" in message
    assert "RTX 3070" in message and "4-bit NF4 on one GPU" in message


def test_memory_estimate_follows_the_architecture(catalog):
    pair = catalog.pairs["qwen3-8b-dspark"]
    need = estimate(pair, "bfloat16", None, 8192)
    assert need.weights == 8_190_735_360 * 2
    assert need.kv == 2 * 36 * 8 * 128 * 2 * 8192  # keys and values, every layer, every KV head
    shared = 2 * 151_936 * 4096  # embed_tokens and lm_head: the target's, shared
    assert need.drafter == (2_371_081_729 - shared) * 2 + 2 * 5 * 8 * 128 * 2 * 8192
    q4 = estimate(pair, "bfloat16", "4bit", 8192)
    assert q4.weights == int(shared * 2 + (8_190_735_360 - shared) * 0.5625)
    assert estimate(pair, "bfloat16", None, 32768).kv == 4 * need.kv
    assert estimate(catalog.pairs["smollm2"]).drafter == 0
    # the context is capped at what the model supports
    assert plan_pair(catalog.pairs["smollm2"], MACHINES["cpu-32gb"], context=100_000).context == 8192


def test_a_hybrid_counts_keys_and_values_of_its_attention_layers_and_a_fixed_recurrent_state(catalog):
    pair = catalog.pairs["qwen36-27b-dspark"]
    need = estimate(pair, "bfloat16", None, 8192)
    assert need.kv == 2 * 16 * 4 * 256 * 2 * 8192  # 16 of its 64 layers keep keys and values
    # live, after the prefill, past recording's copy through a pass, and each position of a 15-draft verify pass
    assert need.state == 154_927_104 * (3 + 16) == estimate(pair, "bfloat16", None, 65536).state
    lookup = catalog.pairs["lfm25-1-2b-lookup"]
    assert estimate(lookup).state == 122_880 * (3 + 11)
    # plain decoding runs no verify pass: the live states, the checkpoint and past recording's copy only
    assert estimate(dataclasses.replace(lookup, kind="none")).state == 122_880 * 3
    assert "recurrent state" in plan_pair(pair, MACHINES["dgx-spark"]).explain()
    assert "recurrent state" not in plan_pair(catalog.pairs["qwen3-8b-dspark"], MACHINES["dgx-spark"]).explain()


def test_overrides(catalog):
    pair = catalog.pairs["qwen3-4b-dspark"]
    spark = MACHINES["dgx-spark"]
    assert plan_pair(pair, spark, quant="4bit").quant == "4bit"
    cpu = plan_pair(pair, spark, device_map="cpu")
    assert cpu.placement == "cpu" and cpu.dtype == "float32"
    assert plan_pair(pair, spark, dtype="float16").dtype == "float16"
    second = plan_pair(pair, MACHINES["two-24gb"], device_map="cuda:1")
    assert second.devices == ("cuda:1",)
    split = plan_pair(pair, MACHINES["two-24gb"], device_map="auto")
    assert split.placement == "sharded" and split.devices == ("cuda:0", "cuda:1")
    # an explicit budget that is too small still gives the requested plan, with a warning
    squeezed = plan_pair(pair, spark, max_memory={0: 4 * GiB}, device_map="cuda:0", quant="none")
    assert not squeezed.fits and (squeezed.placement, squeezed.quant) == ("gpu", None)
    # without a device map the planner looks further: 4-bit does not fit 4 GiB either, the CPU does
    assert plan_pair(pair, spark, max_memory={0: 4 * GiB}).placement == "cpu"
    assert any("likely run out of memory" in w for w in squeezed.warnings)
    assert parse_max_memory("0=20GiB, cuda:1=22GiB,cpu=48GB") == {0: 20 * GiB, 1: 22 * GiB, "cpu": 48 * 10**9}
    with pytest.raises(PlanError, match="DEVICE=SIZE"):
        parse_max_memory("gpu0=20")
    with pytest.raises(PlanError, match="no device matches"):
        plan_pair(pair, MACHINES["cpu-16gb"], quant="8bit")
    apple = Hardware((), 36 * GiB, 20 * GiB, mps_memory=27 * GiB)
    mps = plan_pair(pair, apple)
    assert (mps.placement, mps.dtype, mps.devices) == ("mps", "float16", ("mps",))


def test_load_kwargs_for_each_machine(catalog):
    def kwargs(machine, name, config=None):
        return plan_pair(catalog.pairs[name], MACHINES[machine]).load_kwargs(config)

    assert kwargs("dgx-spark", "qwen3-14b-dspark") == {"dtype": torch.bfloat16, "device_map": {"": "cuda:0"}}
    assert kwargs("cpu-32gb", "qwen3-4b-dspark") == {"dtype": torch.float32, "device_map": {"": "cpu"}}
    assert kwargs("cpu-16gb", "qwen3-4b-dspark") == {"dtype": torch.bfloat16, "device_map": {"": "cpu"}}
    eight = kwargs("one-24gb", "qwen3-14b-dspark")
    assert eight["device_map"] == {"": "cuda:0"} and eight["dtype"] == torch.bfloat16
    assert eight["quantization_config"].load_in_8bit and not eight["quantization_config"].load_in_4bit
    assert eight["quantization_config"].llm_int8_threshold == 0.0  # batch-independent, so verification stays exact
    four = kwargs("laptop-8gb", "qwen3-4b-dspark")["quantization_config"]
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_compute_dtype == torch.bfloat16
    split = plan_pair(catalog.pairs["qwen3-14b-dspark"], MACHINES["two-24gb"])
    loose = split.load_kwargs()
    assert loose["device_map"] == "sequential" and loose["max_memory"] == split.max_memory
    assert set(loose["max_memory"]) == {0, 1} and all(v < int(23.5 * GiB) for v in loose["max_memory"].values())
    # the drafter's room is kept on the GPU that ends up with the last layers
    assert loose["max_memory"][1] < loose["max_memory"][0] - split.need.drafter * 0.9


def qwen3_14b_config(**changes) -> Qwen3Config:
    return Qwen3Config(**{**dict(vocab_size=151_936, hidden_size=5120, intermediate_size=17_408, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
                          **changes})


def test_accelerate_splits_the_layers_over_two_gpus_on_the_meta_device(catalog):
    config = qwen3_14b_config()
    plan = plan_pair(catalog.pairs["qwen3-14b-dspark"], MACHINES["two-24gb"])
    device_map = plan.load_kwargs(config)["device_map"]
    layers = [device_map[f"model.layers.{i}"] for i in range(40)]
    assert set(layers) == {0, 1} and layers == sorted(layers)  # in order: the first layers on GPU 0
    assert device_map["lm_head"] == device_map["model.norm"] == layers[-1] == 1
    assert device_map["model.embed_tokens"] == 0
    # what lands on each GPU stays within its max_memory
    per_layer = 2 * (5120 * (5120 + 2 * 1024) + 5120 * 5120 + 3 * 5120 * 17_408)
    assert layers.count(0) * per_layer <= plan.max_memory[0]


def test_tied_embeddings_move_with_the_lm_head_to_the_last_gpu():
    config = qwen3_14b_config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                              tie_word_embeddings=True)
    device_map = place(config, {0: 5 * GiB, 1: 5 * GiB})
    layers = [device_map[f"model.layers.{i}"] for i in range(36)]
    assert set(layers) == {0, 1}
    # the LM head is the embedding matrix: both go where the last layer is, not where the first one is
    assert device_map["lm_head"] == device_map["model.embed_tokens"] == device_map["model.norm"] == 1
    with pytest.raises(PlanError, match="does not fit in max_memory"):
        place(config, {0: 1 * GiB, 1: 1 * GiB})


def test_detect_this_machine():
    hardware = detect()
    assert 0 < hardware.ram_free <= hardware.ram_total
    assert len(hardware.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert "RAM" in hardware.describe()
