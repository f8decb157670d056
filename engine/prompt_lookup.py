"""Prompt lookup: a model-free drafter that copies what followed an earlier occurrence of the context's
last tokens. It pays off on code edits, quoting and summaries, where answers repeat the prompt."""

from __future__ import annotations

import torch

from .sampling import Proposal, Sampling


class PromptLookupDrafter:
    feature_layers: tuple[int, ...] = ()

    def __init__(self, block_size: int = 10, max_match: int = 32, min_match: int = 1):
        if not 1 <= min_match <= max_match:
            raise ValueError("need 1 <= min_match <= max_match")
        self.block_size, self.max_match, self.min_match = block_size, max_match, min_match

    def rewind(self, length: int) -> int:
        """Nothing to forget: the committed ids are the whole state, and the loop passes them in."""
        return length

    def observe(self, features) -> None:
        """Reads no target features."""

    def propose(self, ids: torch.Tensor, limit: int, sampling: Sampling, generator=None) -> Proposal:
        """Copies after the earlier occurrence whose preceding tokens match the context's end longest
        (up to max_match). Among equally long matches it takes the latest one that still has n tokens
        after it, else the earliest: the latest may sit just before the end of the context (inside a
        repetition) and offer only a token or two, which are then repeated. The match length goes with
        the proposal, because it predicts acceptance (the auto scheduler learns by it)."""
        n = min(limit, self.block_size)
        if n <= 0 or ids.shape[0] < 2:
            return Proposal.empty(ids.device)
        hits = (ids[:-1] == ids[-1]).nonzero().squeeze(1)  # earlier positions holding the last token
        if not len(hits):
            return Proposal.empty(ids.device)
        # How far back each hit keeps matching the context's end: compare up to max_match tokens at once.
        back = hits[:, None] - torch.arange(min(self.max_match, ids.shape[0] - 1), device=ids.device)
        same = (back >= 0) & (ids[back.clamp_min(0)] == ids.flip(0)[: back.shape[1]])
        lengths = same.cumprod(1).sum(1)
        match = int(lengths.max())
        if match < self.min_match:
            return Proposal.empty(ids.device)
        hits = hits[lengths == match]
        full = hits[hits + n < ids.shape[0]]
        start = int(full[-1] if len(full) else hits[0]) + 1
        tokens = ids[start : start + n]
        if len(tokens) < n:
            # The source runs into the context's end: the match says the text repeats with period
            # len(ids) - start, so the copy goes on with that repetition.
            tokens = tokens.repeat(-(-n // len(tokens)))[:n]
        # A deterministic proposal: each draft had probability 1 under the drafter.
        return Proposal(tokens, None, match=match)


class LookupOrDraft:
    """Prompt lookup where the context's end repeats an earlier stretch by at least MIN_MATCH tokens,
    the model drafter everywhere else. A long match is the surest draft there is (SmolLM2 accepts about
    90% of copies after an 8-token match, against the trained drafter's 35-60% first drafts), costs no
    model pass, and may run past the drafter's block; a one-token match is a guess. Which of the two
    drafts is decided from the context alone, before the target sees either: lossless."""

    # On SmolLM2 (3 HumanEval and 3 GSM8K prompts) a 2-token match beat 1, 3 and 5: 1.63x and 2.61x the
    # baseline, against 1.51x and 2.69x, 1.56x and 2.29x, 1.50x and 2.02x.
    MIN_MATCH = 2

    def __init__(self, drafter, lookup: PromptLookupDrafter | None = None):
        self.drafter = drafter
        self.lookup = lookup or PromptLookupDrafter(min_match=self.MIN_MATCH)
        self.feature_layers = drafter.feature_layers
        self.block_size = max(drafter.block_size, self.lookup.block_size)

    def rewind(self, length: int) -> int:
        return self.drafter.rewind(length)

    def observe(self, features) -> None:
        self.drafter.observe(features)

    def propose(self, ids: torch.Tensor, limit: int, sampling: Sampling, generator=None) -> Proposal:
        copy = self.lookup.propose(ids, limit, sampling, generator)  # empty when no match is long enough
        return copy if len(copy.tokens) else self.drafter.propose(ids, limit, sampling, generator)
