"""Hybrid targets (recurrent or convolution layers beside attention): speculation only where the cache rolls
back exactly, and then the target's own greedy text."""

from __future__ import annotations

import pytest
import torch

from dspark_chat.engine.decode import decode
from dspark_chat.engine.engine import Engine
from dspark_chat.engine.loading import LoadError, load_drafter, load_target
from dspark_chat.engine.prompt_lookup import PromptLookupDrafter
from dspark_chat.engine.sampling import Sampling

from . import hybrids
from .conftest import REFERENCE, Forcing

RECURRENT = [f for f in hybrids.FAMILIES if f != "lfm2"]


@pytest.fixture(scope="session")
def hybrid_dir(tmp_path_factory, tokenizer):
    """family -> a saved tiny target of that family, made once per session."""
    folders = {}

    def get(family: str):
        if family not in folders:
            folders[family] = hybrids.save(family, tmp_path_factory.mktemp(family), tokenizer)
        return folders[family]

    return get


@pytest.fixture(scope="session")
def hybrid_target(hybrid_dir):
    targets = {}

    def get(family: str):
        if family not in targets:
            targets[family] = load_target(str(hybrid_dir(family)), "float32", "cpu")
        return targets[family]

    return get


def prompts() -> list[list[int]]:
    """A random prompt, and one that repeats itself so that prompt lookup drafts."""
    g = torch.Generator().manual_seed(7)
    return [torch.randint(4, 512, (9,), generator=g).tolist(), torch.randint(4, 512, (6,), generator=g).tolist() * 3]


def generated(target, drafter, prompt, max_new_tokens=40):
    target.rewind(0)
    if drafter is not None:
        drafter.rewind(0)
    return [t for s in decode(target, drafter, prompt, Sampling(), max_new_tokens) for t in s.token_ids]


@pytest.mark.parametrize("family", RECURRENT)
def test_speculation_is_refused_where_a_layer_keeps_a_recurrent_state(family, hybrid_dir, hybrid_target):
    folder = str(hybrid_dir(family))
    for asked in (dict(prompt_lookup=True), dict(drafter=str(REFERENCE / "dspark"))):
        with pytest.raises(LoadError, match="recurrent state.*--no-spec"):
            Engine.load(folder, dtype="float32", device="cpu", scheduler="off", **asked)
    target = hybrid_target(family)
    with pytest.raises(ValueError, match="cannot be rolled back exactly"):
        generated(target, PromptLookupDrafter(), prompts()[1])
    # Plain decoding still runs, with no drafter by default.
    engine = Engine.load(folder, dtype="float32", device="cpu", scheduler="off")
    assert engine.drafter is None
    assert [t for s in engine.generate(prompts()[0], max_new_tokens=8) for t in s.token_ids] == generated(target, None, prompts()[0], 8)


def test_convolution_layers_roll_back_exactly(hybrid_target):
    """LFM2's layers keep convolution states only: cropping their recorded inputs is exact."""
    target = hybrid_target("lfm2")
    assert target.speculation_refusal is None
    drafter = load_drafter(str(REFERENCE / "dspark"), target)
    for prompt in prompts():
        baseline = generated(target, None, prompt)
        assert len(set(baseline)) > 10  # greedy text that varies, so that a wrong cache shows
        assert generated(target, PromptLookupDrafter(), prompt) == baseline
        forcing = Forcing(drafter, len(prompt), baseline + [0] * 8, [3, 7, 0, 5, 1, 6, 2, 4])
        assert generated(target, forcing, prompt) == baseline
