"""Sampling keeps the target's distribution with speculators-format drafters in both block layouts: the
1+N block with the recurrent head (its state warmed on the anchor's slot), a sliding-window layer and a
pruned draft vocabulary; and the anchor-first block with the gated head and no confidence head. The
chi-square tests of tests/test_lossless.py, on a four-token target enumerated exactly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config

from dspark_chat.engine import export
from dspark_chat.engine.dspark import DSparkDrafter
from dspark_chat.engine.loading import load_drafter, load_target
from dspark_chat.engine.sampling import Sampling
from .conftest import make_tiny_pair
from .test_lossless import RUNS, chi_square_pvalue, exact_distribution, sampled_counts

LAYOUTS = {
    "bonus-rnn-window": dict(sample_from_anchor=False, block_size=5, markov_head_type="rnn", enable_confidence_head=True,
                             confidence_head_with_markov=False, sliding_windows=[2, None], window_causal=True),
    "anchor-gated-noconf": dict(sample_from_anchor=True, block_size=4, markov_head_type="gated", enable_confidence_head=False,
                                confidence_head_with_markov=False),
}

# Runs per layout. Each must catch a broken acceptance rule (tests/test_lossless.py's broken_rule): its effect with
# these drafters, measured over 300 runs, is w² = 0.25 (1+N, recurrent head) and 0.16 (anchor-first, gated head;
# the chi-square statistic minus its degrees of freedom, per run). At p < 1e-3 with 7 degrees of freedom the chance
# of missing it is below 3e-8 with 400 runs (RUNS) for the first, below 1e-8 with 650 for the second.
LAYOUT_RUNS = {"bonus-rnn-window": RUNS, "anchor-gated-noconf": 650}


def speculators_drafter(folder, target, layout: dict, vocab: list[int]):
    """A random drafter of this layout for the target, written in the speculators format and loaded back."""
    torch.manual_seed(3)
    config = json.loads(json.dumps(target.model.config.to_dict())) | dict(
        architectures=["Qwen3DSparkModel"], model_type="qwen3", num_hidden_layers=2, layer_types=["full_attention"] * 2,
        target_layer_ids=[0, 1], mask_token_id=3, markov_rank=4, **layout)
    model = target.model
    drafter = DSparkDrafter(Qwen3Config(**config), model.get_input_embeddings(), model.get_output_embeddings())
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if not name.startswith(("embed_tokens.", "lm_head.")):
                p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.8)
    drafter.use_draft_vocab(torch.tensor(vocab))
    export.write(drafter, config, folder, "speculators", torch.float32, target, "acme/tiny4")
    return load_drafter(str(folder), target)


@pytest.fixture(scope="module")
def four_token_target(tmp_path_factory, tokenizer):
    target_dir, _ = make_tiny_pair(tmp_path_factory.mktemp("four-tokens"), tokenizer, vocab_size=4, block_size=4,
                                   markov_rank=4, std=0.8)
    target = load_target(str(target_dir), "float32", "cpu")
    target.stop_ids = ()  # with four tokens, the end-of-text id 2 would cut sequences short
    return target


# The 1+N block is sampled nowhere else; the anchor-first block is tests/test_lossless.py's, so this one is slow-set.
@pytest.mark.parametrize("layout", ["bonus-rnn-window", pytest.param("anchor-gated-noconf", marks=pytest.mark.slow)])
def test_sampling_with_speculators_drafters_matches_target_distribution(layout, four_token_target, tmp_path):
    """The drafter never proposes token 1 (its draft vocabulary is 0, 2, 3): the target's share of it must come
    back through rejected rounds."""
    target = four_token_target
    drafter = speculators_drafter(tmp_path / "drafter", target, LAYOUTS[layout], [0, 2, 3])
    assert drafter.layout == "speculators" and drafter.draft_vocab.tolist() == [0, 2, 3] and drafter.markov_head.pruned
    assert drafter.first_slot == (0 if LAYOUTS[layout]["sample_from_anchor"] else 1)
    sampling, prefix, length, runs = Sampling(1.0), [1, 3, 0], 3, LAYOUT_RUNS[layout]
    exact = exact_distribution(target, prefix, length, sampling)
    counts = sampled_counts(target, drafter, prefix, length, sampling, runs)
    assert chi_square_pvalue(counts, exact, runs) > 1e-3
    with_one = sum(p for seq, p in exact.items() if 1 in seq) * runs
    assert with_one > runs / 10 and sum(n for seq, n in counts.items() if 1 in seq) > with_one / 2
