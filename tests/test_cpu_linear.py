"""The transposed CPU product (engine/cpu_linear.py): same numbers as nn.Linear, measured once and cached,
and decoding through it stays lossless."""

import json

import pytest
import torch
from torch import nn

from dspark_chat.engine import cpu_linear
from dspark_chat.engine.decode import decode
from dspark_chat.engine.prompt_lookup import PromptLookupDrafter


@pytest.fixture(autouse=True)
def small_matrices_count(monkeypatch):
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHTS", 0)


def test_transposed_product_matches_linear_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32, bias=False))
    plain = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32, bias=False))
    plain.load_state_dict(model.state_dict())
    cpu_linear.install(model, {"96x64:float32": list(range(1, 18)), "32x96:float32": [3, 5]})
    assert model[0].transposed_rows == frozenset(range(1, 18)) and model[1].transposed_rows == {3, 5}
    for shape in [(1, 64), (2, 64), (1, 3, 64), (5, 64), (17, 64), (1, 40, 64)]:
        x = torch.randn(shape, requires_grad=True)
        out = model(x)
        assert out.shape == plain(x).shape and out.is_contiguous()
        torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 64)
    model(x).sum().backward()
    plain(x).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, plain[0].weight.grad, rtol=1e-5, atol=1e-5)


def test_choice_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_linear, "measure", lambda weights, *a, **k: calls.append([tuple(w.shape) for w in weights]) or [2, 4])
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 16))
    choice = cpu_linear.speed_up(model, tmp_path)
    assert choice == {"16x8:float32": [2, 4], "8x16:float32": [2, 4]}
    # One measurement per shape, not per layer, over every layer of that shape (as a pass reads them).
    assert sorted(calls) == [[(8, 16)], [(16, 8), (16, 8)]]
    assert model[3].transposed_rows == {2, 4}
    [cached] = (tmp_path / "cpu-linear").glob("*.json")
    assert json.loads(cached.read_text())["transposed_rows"] == choice

    calls.clear()
    again = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 16))
    assert cpu_linear.speed_up(again, tmp_path) == choice and calls == []

    cached.write_text("{not json")  # a damaged cache is measured again, and rewritten
    assert cpu_linear.speed_up(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)), tmp_path) == choice
    assert len(calls) == 2 and json.loads(cached.read_text())["transposed_rows"] == choice


def test_a_shape_is_measured_over_its_layers_up_to_the_streamed_bytes(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(cpu_linear, "measure", lambda weights, *a, **k: measured.append(len(weights)) or [2])
    monkeypatch.setattr(cpu_linear, "STREAMED_BYTES", 3 * 16 * 8 * 4)  # three 16 x 8 float32 matrices
    model = nn.Sequential(*[nn.Linear(8, 16) for _ in range(5)])
    cpu_linear.speed_up(model, tmp_path)
    assert measured == [3]
    assert all(m.transposed_rows == {2} for m in model)  # every layer takes the choice, measured or not


def test_quantised_and_offloaded_layers_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_linear, "measure", lambda weights, *a, **k: [2])

    class PackedLinear(nn.Linear):  # as bitsandbytes' Linear4bit: a subclass holding packed weights
        pass

    with torch.device("meta"):
        offloaded = nn.Linear(8, 8)
    dispatched = nn.Linear(8, 8)
    dispatched._hf_hook = object()  # accelerate's hook replaced its forward
    model = nn.Sequential(PackedLinear(8, 8), offloaded, dispatched)
    assert cpu_linear.speed_up(model, tmp_path) == {}
    assert not any(hasattr(m, "transposed_rows") for m in model)
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHTS", 65)  # too small to be worth measuring: 8 x 8 is
    assert cpu_linear.speed_up(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 16)), tmp_path) == {"16x8:float32": [2]}


def test_measure_reports_row_counts_in_range():
    rows = cpu_linear.measure([torch.randn(64, 32), torch.randn(64, 32)], max_rows=5, repeats=3)
    assert set(rows) <= {1, 2, 3, 4, 5}


@pytest.mark.parametrize("transposed", [range(2, 18), [1]], ids=["verify-passes", "one-row-steps"])
@pytest.mark.parametrize("prompt", ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                                    "List three prime numbers and explain why each one is prime."])
def test_greedy_decoding_through_the_transposed_product_is_lossless(smollm2, prompt, transposed):
    """Either every verify pass of prompt lookup (2..11 rows) goes the transposed way and the baseline's
    one-row steps do not, or the other way round. Greedy output must still be the baseline's token for token."""
    saved = {m: {k: m.__dict__[k] for k in ("forward", "transposed_rows") if k in m.__dict__}
             for m in smollm2.model.modules() if type(m) is nn.Linear}
    choice = {cpu_linear._key(m.weight.shape, m.weight.dtype): list(transposed) for m in saved}
    cpu_linear.install(smollm2.model, choice)
    try:
        ids = smollm2.tokenizer(prompt)["input_ids"]
        base = [t for s in decode(smollm2, None, ids, max_new_tokens=48) for t in s.token_ids]
        spec = [t for s in decode(smollm2, PromptLookupDrafter(), ids, max_new_tokens=48) for t in s.token_ids]
        assert spec == base
    finally:
        for m, attributes in saved.items():
            m.__dict__.pop("forward", None)
            m.__dict__.pop("transposed_rows", None)
            m.__dict__.update(attributes)
