"""Prompt lookup: a model-free drafter that copies what followed the latest earlier occurrence of
the last few tokens. It pays off on code edits, quoting and summaries, where answers repeat the prompt."""

from __future__ import annotations

import torch

from .sampling import Proposal, Sampling


class PromptLookupDrafter:
    feature_layers: tuple[int, ...] = ()

    def __init__(self, block_size: int = 10, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.block_size, self.max_ngram, self.min_ngram = block_size, max_ngram, min_ngram

    def rewind(self, length: int) -> int:
        """Nothing to forget: the committed ids are the whole state, and the loop passes them in."""
        return length

    def observe(self, features) -> None:
        """Reads no target features."""

    def propose(self, ids: torch.Tensor, limit: int, sampling: Sampling, generator=None) -> Proposal:
        n = min(limit, self.block_size)
        if n <= 0:
            return Proposal.empty(ids.device)
        for size in range(min(self.max_ngram, ids.shape[0] - 1), self.min_ngram - 1, -1):
            windows = ids.unfold(0, size, 1)[:-1]  # every earlier n-gram, excluding the suffix itself
            hits = (windows == ids[-size:]).all(-1).nonzero()
            if len(hits):
                follow = int(hits[-1]) + size
                tokens = ids[follow : follow + n]
                if len(tokens):
                    # A deterministic proposal: each draft had probability 1 under the drafter.
                    return Proposal(tokens, None)
        return Proposal.empty(ids.device)
