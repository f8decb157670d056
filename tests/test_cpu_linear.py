"""The transposed and packed CPU products (engine/cpu_linear.py): same numbers as nn.Linear, measured once and cached,
and decoding through it stays lossless."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dspark_chat.engine import cpu_linear
from dspark_chat.engine.decode import decode
from dspark_chat.engine.prompt_lookup import PromptLookupDrafter


@pytest.fixture(autouse=True)
def small_matrices_count(monkeypatch):
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHTS", 0)


def test_each_way_matches_linear_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32, bias=False))
    plain = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32, bias=False))
    plain.load_state_dict(model.state_dict())
    cpu_linear.install(model, {"96x64:float32": {"transposed": list(range(1, 9)), "packed": list(range(9, 18))},
                               "32x96:float32": {"packed": [3, 5]}})
    assert model[0].way_for_rows == {rows: "transposed" if rows < 9 else "packed" for rows in range(1, 18)}
    assert model[1].way_for_rows == {3: "packed", 5: "packed"} and model[1].packed_weight.layout == torch._mkldnn
    for shape in [(1, 64), (2, 64), (1, 3, 64), (5, 64), (1, 9, 64), (17, 64), (1, 40, 64)]:
        for requires_grad in (False, True):  # autograd takes F.linear where the packed product has no backward
            x = torch.randn(shape, requires_grad=requires_grad)
            out = model(x)
            assert out.shape == plain(x).shape and out.is_contiguous()
            torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)
    with torch.profiler.profile() as profile, torch.inference_mode():
        model(torch.randn(1, 9, 64))
    assert sum(event.name == "mkldnn::_linear_pointwise" for event in profile.events()) == 1
    x = torch.randn(3, 64)
    model(x).sum().backward()
    plain(x).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, plain[0].weight.grad, rtol=1e-5, atol=1e-5)


def _products(model, x) -> tuple[int, int]:
    """How many products a call of the model ran packed, and how many transposed (torch.mm, then the bias added)."""
    with torch.profiler.profile() as profile:
        model(x)
    names = [event.name for event in profile.events()]
    return names.count("mkldnn::_linear_pointwise"), names.count("aten::mm")


def test_a_compiled_graph_runs_packed_copies_at_every_row_count_and_measured_ways_elsewhere():
    """Compiled passes are symbolic in their row count, and their products go through one opaque operation that
    chooses per call: a layer with a packed copy runs it at every row count (faster in a compiled pass than the
    measured ways), one without takes the way measured for the call's row count; one graph serves them all without
    compiling again. pack_for_graphs gives every layer a copy, and leaves the eager products their measured ways."""
    import torch._dynamo

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 32))
    plain = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 32))
    plain.load_state_dict(model.state_dict())
    cpu_linear.install(model, {"96x64:float32": {"transposed": list(range(1, 9)), "packed": list(range(9, 18))},
                               "32x96:float32": {"transposed": [2, 3]}})
    assert not hasattr(model[2], "packed_weight")
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    with torch.inference_mode():
        compiled(torch.randn(4, 64))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for rows in (2, 3, 5, 9, 17, 40):  # not 1: torch specialises a size of 1 (compiled.py runs it as 2)
                x = torch.randn(rows, 64)
                torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)
                assert _products(compiled, x) == (1, rows in (2, 3)), rows
            assert cpu_linear.pack_for_graphs(model)
            assert model[2].packed_weight.layout == torch._mkldnn
            for rows in (2, 3, 9):
                x = torch.randn(rows, 64)
                torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-5)
                assert _products(compiled, x) == (2, 0), rows
                assert _products(model, x) == (rows >= 9, (rows < 9) + (rows in (2, 3))), rows  # eagerly: as measured


def test_packing_for_graphs_needs_room_for_the_copies(monkeypatch):
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32))
    monkeypatch.setattr(cpu_linear, "_available_memory", lambda: 2 * (64 * 96 + 96 * 32) * 4)  # copies take half
    assert not cpu_linear.pack_for_graphs(model)
    assert not any(hasattr(layer, "packed_weight") for layer in model)
    monkeypatch.setattr(cpu_linear, "_available_memory", lambda: 2 * (64 * 96 + 96 * 32) * 4 + 8)
    assert cpu_linear.pack_for_graphs(model)
    with torch.inference_mode():
        x = torch.randn(3, 64)
        expected = F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias)
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expected, rtol=1e-5, atol=1e-5)


def test_the_opaque_operation_routes_only_a_live_layers_own_weight():
    """It is handed a weight and finds the layer by the weight's address: a weight the layer no longer holds, or whose
    layer is gone, takes F.linear, never a packed copy made of other numbers."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    cpu_linear.install(layer, {"96x64:float32": {"packed": list(range(1, 18))}})
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(torch.ops.dspark.routed_linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
        old = layer.weight
        layer.packed_weight = cpu_linear._packed(torch.zeros_like(old))  # what a stale route would multiply by
        layer.weight = nn.Parameter(torch.randn(96, 64))
        torch.testing.assert_close(torch.ops.dspark.routed_linear(x, old, layer.bias), F.linear(x, old, layer.bias))
        del layer
        torch.testing.assert_close(torch.ops.dspark.routed_linear(x, old, None), F.linear(x, old))
        unrouted = torch.randn(32, 64)
        torch.testing.assert_close(torch.ops.dspark.routed_linear(x, unrouted, None), F.linear(x, unrouted))


def test_choice_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    calls = []
    ways = {"transposed": [2], "packed": [4]}
    monkeypatch.setattr(cpu_linear, "measure", lambda weights, *a, **k: calls.append([tuple(w.shape) for w in weights]) or ways)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 16))
    announced = []
    choice = cpu_linear.speed_up(model, tmp_path, measuring=lambda: announced.append(len(calls)))
    assert choice == {"16x8:float32": ways, "8x16:float32": ways}
    assert announced == [0]  # once, before measuring
    # One measurement per shape, not per layer, over every layer of that shape (as a pass reads them).
    assert sorted(calls) == [[(8, 16)], [(16, 8), (16, 8)]]
    assert model[3].way_for_rows == {2: "transposed", 4: "packed"}
    [cached] = (tmp_path / "cpu-linear").glob("*.json")
    assert json.loads(cached.read_text())["ways"] == choice

    calls.clear()
    again = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 16))
    assert cpu_linear.speed_up(again, tmp_path, measuring=lambda: announced.append(len(calls))) == choice
    assert calls == [] and announced == [0]

    cached.write_text("{not json")  # a damaged cache is measured again, and rewritten
    assert cpu_linear.speed_up(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)), tmp_path) == choice
    assert len(calls) == 2 and json.loads(cached.read_text())["ways"] == choice


def test_the_cache_is_kept_per_processor_not_per_processor_name(tmp_path, monkeypatch):
    # Two hosts a cloud VM ran on here, both named "AMD EPYC": an AVX2 one and an AVX-512 one.
    avx2 = "processor\t: 0\ncpu family\t: 25\nmodel\t: 1\nstepping\t: 1\nmodel name\t: AMD EPYC\nflags\t: fpu avx2\n"
    avx512 = avx2.replace(": 25", ": 26").replace("avx2", "avx2 avx512f avx512_bf16")
    cpuinfo = tmp_path / "cpuinfo"
    real_path = cpu_linear.Path
    monkeypatch.setattr(cpu_linear, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    identities = []
    for text in (avx2, avx512, avx2 + "\nprocessor\t: 1\nflags\t: fpu\n"):
        cpuinfo.write_text(text)
        identities.append(cpu_linear.cpu_identity())
    assert identities[0] != identities[1] and identities[0] == identities[2]  # the first processor's fields
    assert "AMD EPYC 25/1/1" in identities[0]

    measured = []
    monkeypatch.setattr(cpu_linear, "measure", lambda weights, *a, **k: measured.append(1) or {"transposed": [2]})
    for identity in ("host A", "host B", "host A"):
        monkeypatch.setattr(cpu_linear, "cpu_identity", lambda: identity)
        cpu_linear.speed_up(nn.Sequential(nn.Linear(8, 16)), tmp_path / "cache")
    assert len(measured) == 2 and len(list((tmp_path / "cache" / "cpu-linear").glob("*.json"))) == 2


def test_no_packed_copies_without_the_memory_for_them(tmp_path, monkeypatch):
    packs = []
    monkeypatch.setattr(cpu_linear, "measure", lambda weights, *a, pack, **k: packs.append(pack) or {"transposed": [2]})
    monkeypatch.setattr(cpu_linear, "_available_memory", lambda: 2 * 2 * 128 * 4 + 1)  # just over twice the weights' bytes
    cpu_linear.speed_up(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)), tmp_path)
    monkeypatch.setattr(cpu_linear, "_available_memory", lambda: 2 * 2 * 128 * 4)
    cpu_linear.speed_up(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)), tmp_path)
    assert packs == [True, True, False, False]  # and the two choices are cached apart
    assert len(list((tmp_path / "cpu-linear").glob("*.json"))) == 2


def test_a_shape_is_measured_over_its_layers_up_to_the_streamed_bytes(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(cpu_linear, "measure", lambda weights, *a, **k: measured.append(len(weights)) or {"transposed": [2]})
    monkeypatch.setattr(cpu_linear, "STREAMED_BYTES", 3 * 16 * 8 * 4)  # three 16 x 8 float32 matrices
    model = nn.Sequential(*[nn.Linear(8, 16) for _ in range(5)])
    cpu_linear.speed_up(model, tmp_path)
    assert measured == [3]
    assert all(m.way_for_rows == {2: "transposed"} for m in model)  # every layer takes the choice, measured or not


def test_quantised_and_offloaded_layers_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_linear, "measure", lambda weights, *a, **k: {"transposed": [2]})

    class PackedLinear(nn.Linear):  # as bitsandbytes' Linear4bit: a subclass holding packed weights
        pass

    with torch.device("meta"):
        offloaded = nn.Linear(8, 8)
    dispatched = nn.Linear(8, 8)
    dispatched._hf_hook = object()  # accelerate's hook replaced its forward
    model = nn.Sequential(PackedLinear(8, 8), offloaded, dispatched)
    assert cpu_linear.speed_up(model, tmp_path) == {}
    assert not any(hasattr(m, "way_for_rows") for m in model)
    shared = nn.Linear(8, 16)  # routed with one model, then met again in another (a drafter sharing the LM head)
    cpu_linear.speed_up(nn.Sequential(shared), tmp_path)
    assert cpu_linear.speed_up(nn.Sequential(shared, nn.Linear(16, 8)), tmp_path) == {"8x16:float32": {"transposed": [2]}}
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHTS", 65)  # too small to be worth measuring: 8 x 8 is
    assert cpu_linear.speed_up(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 16)), tmp_path) == {"16x8:float32": {"transposed": [2]}}


def test_measure_gives_each_row_count_at_most_one_way():
    ways = cpu_linear.measure([torch.randn(64, 32), torch.randn(64, 32)], max_rows=5, repeats=3)
    assert set(ways) == {"transposed", "packed"}
    rows = ways["transposed"] + ways["packed"]
    assert set(rows) <= {1, 2, 3, 4, 5} and len(rows) == len(set(rows))
    assert set(cpu_linear.measure([torch.randn(64, 32)], max_rows=2, repeats=1, pack=False)) == {"transposed"}


@pytest.mark.slow
@pytest.mark.parametrize("ways", [{"transposed": range(2, 18)}, {"transposed": [1]}, {"packed": range(2, 18)}, {"packed": [1]}],
                         ids=["transposed-verify-passes", "transposed-one-row-steps", "packed-verify-passes", "packed-one-row-steps"])
@pytest.mark.parametrize("prompt", ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                                    "List three prime numbers and explain why each one is prime."])
def test_greedy_decoding_through_the_other_products_is_lossless(smollm2, prompt, ways):
    """Either every verify pass of prompt lookup (2..11 rows) goes the other way and the baseline's
    one-row steps do not, or the other way round. Greedy output must still be the baseline's token for token."""
    kept = ("forward", "way_for_rows", "packed_weight")
    saved = {m: {k: m.__dict__[k] for k in kept if k in m.__dict__}
             for m in smollm2.model.modules() if type(m) is nn.Linear}
    choice = {cpu_linear._key(m.weight.shape, m.weight.dtype): {way: list(rows) for way, rows in ways.items()} for m in saved}
    try:
        for m in saved:
            for k in kept:
                m.__dict__.pop(k, None)
        cpu_linear.install(smollm2.model, choice)
        assert all(m.way_for_rows == {rows: way for way, counts in ways.items() for rows in counts} for m in saved)
        ids = smollm2.tokenizer(prompt)["input_ids"]
        base = [t for s in decode(smollm2, None, ids, max_new_tokens=48) for t in s.token_ids]
        spec = [t for s in decode(smollm2, PromptLookupDrafter(), ids, max_new_tokens=48) for t in s.token_ids]
        assert spec == base
    finally:
        for m, attributes in saved.items():
            for k in kept:
                m.__dict__.pop(k, None)
            m.__dict__.update(attributes)
