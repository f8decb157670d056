"""The decode loop: one loop for every drafter, and for no drafter at all (the baseline).

Per round: the drafter proposes after the anchor (the last committed token), the scheduler picks how
many drafts to verify, the target runs once over [anchor, drafts], the lossless rule accepts a prefix
and adds one token of the target's own, both caches are rolled back to what was committed, and one
Step event reports the round. Without a drafter every round verifies zero drafts: plain decoding.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol

import torch

from dspark_chat.kernels.acceptance import accept_greedy, accept_sampled

from .sampling import Proposal, Sampling
from .scheduler import Scheduler
from .target import Target


class Drafter(Protocol):
    block_size: int
    feature_layers: tuple[int, ...]  # target layers whose hidden states the drafter reads

    def rewind(self, length: int) -> int:
        """Forget context from position `length` on; returns how many positions it still holds."""
    def observe(self, features: torch.Tensor | None) -> None: ...
    def propose(self, ids: torch.Tensor, limit: int, sampling: Sampling, generator=None) -> Proposal: ...


class ContextLengthError(ValueError):
    pass


@dataclass
class Step:
    """One round of the loop (the first one is the prefill, which commits the first token)."""

    token_ids: list[int]  # committed this round
    text: str  # the text those tokens add (may lag a token behind inside a multi-byte character)
    draft_ids: list[int]  # everything the drafter proposed
    verified: int  # how many of draft_ids the target checked
    accepted: int  # how many of those it accepted
    origins: list[str]  # per committed token: "draft" (an accepted draft) or "target"
    draft_ms: float
    verify_ms: float
    elapsed_ms: float  # since the request started, when this step was emitted
    prefill: bool = False
    confidences: list[float] | None = None  # calibrated per drafted position, if the drafter has a confidence head
    finish_reason: str | None = None  # "stop" or "length" on the last step

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TextStream:
    """Incremental detokenisation: decodes a short window so each round costs the same, and holds
    text back while it ends inside a multi-byte character."""

    tokenizer: object
    ids: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        text = decode(self.ids[self.prefix :], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@torch.inference_mode()
def decode(
    target: Target,
    drafter: Drafter | None,
    prompt_ids: list[int],
    sampling: Sampling = Sampling(),
    max_new_tokens: int = 256,
    scheduler: Scheduler | None = None,
    max_draft: int | None = None,
) -> Iterator[Step]:
    """Generate after prompt_ids, yielding one Step per round. Reuses the target's cache (and the
    drafter's context) for the longest prefix the prompt shares with the previous request."""
    started = time.perf_counter()
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if drafter is not None and target.speculation_refusal:
        raise ValueError(target.speculation_refusal)
    room = target.max_length - len(prompt_ids)
    if room <= 0:
        raise ContextLengthError(f"the prompt has {len(prompt_ids)} tokens; the model's context holds {target.max_length}")
    budget = min(max_new_tokens, room)
    if budget <= 0:
        raise ValueError("max_new_tokens must be at least 1")
    scheduler = scheduler or Scheduler(mode="off")
    layers = drafter.feature_layers if drafter else ()
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=target.output_device).manual_seed(sampling.seed)
    stream = TextStream(target.tokenizer)

    # Prefill what the cache does not hold yet; always run the last prompt token, for its logits.
    reuse = common_prefix(target.cached_ids, prompt_ids[:-1])
    if drafter is not None:
        # The drafter may hold less context than the target (the last request ran without it).
        reuse = drafter.rewind(reuse)
    target.rewind(reuse)
    t = time.perf_counter()
    logits, features = target.forward(prompt_ids[reuse:], layers, last_only=True)
    if drafter is not None and layers:
        drafter.observe(features)
    anchor, _ = sampling.pick(logits[-1:], generator)  # [1] on the device: where the next pass starts
    first = anchor.tolist()
    ids = list(prompt_ids) + first
    generated = 1
    finish = _finish(ids[-1:], target.stop_ids, generated, budget)
    yield Step(first, stream.push(first) + (stream.flush() if finish else ""), [], 0, 0, ["target"],
               0.0, _ms(t), _ms(started), prefill=True, finish_reason=finish)

    while finish is None:
        # Propose. Never draft past the budget: the round commits one more token than it accepts.
        t = time.perf_counter()
        limit = budget - generated - 1
        if max_draft is not None:
            limit = min(limit, max_draft)
        proposal = (
            drafter.propose(torch.tensor(ids), limit, sampling, generator) if drafter is not None and limit > 0
            else Proposal.empty(target.device)
        )
        drafted = proposal.tokens.shape[0]
        certainty = None if proposal.confidence_logits is None else scheduler.calibrated(proposal.confidence_logits)
        # The pass's width is chosen on the host, so a scheduler that weighs confidences reads them now.
        confidences = certainty.tolist() if certainty is not None and scheduler.weighs_confidences else None
        # Decided before the target sees the drafts, from the proposal and past rounds only: lossless.
        n = scheduler.verify_count(drafted, confidences, proposal.match)
        draft_ms = _ms(t)

        # Verify: one target pass over the anchor and n drafts, then the lossless rule, on the device.
        t = time.perf_counter()
        drafts = proposal.tokens.to(target.device, non_blocking=True)
        logits, features = target.forward(torch.cat([anchor.to(target.device), drafts[:n]]), layers)
        checked = drafts[:n].to(logits.device)
        if sampling.greedy:
            accepted, bonus = accept_greedy(logits, checked)
        else:
            draft_probs = None if proposal.probs is None else proposal.probs[:n].to(logits.device)
            accepted, bonus = accept_sampled(sampling.probs(logits), checked, draft_probs, generator)
        anchor = bonus.view(1)
        # The round's one read: how many drafts were accepted, the target's token after them, and what
        # the event reports (the drafts, and their confidences if the scheduler did not read them).
        unread = certainty if confidences is None else None
        accepted, bonus, draft_ids, read_confidences = _read(accepted, bonus, drafts, unread)
        accepted, bonus, draft_ids = int(accepted[0]), int(bonus[0]), [int(i) for i in draft_ids]
        confidences = confidences if unread is None else read_confidences
        scheduler.observe(confidences, proposal.match, n, accepted)
        committed = draft_ids[:accepted] + [bonus]
        origins = ["draft"] * accepted + ["target"]
        # The cache now holds the anchor and n drafts: keep the anchor and the accepted ones.
        target.rewind(len(ids) + accepted)
        if drafter is not None and layers:
            drafter.observe(features[: accepted + 1])
        verify_ms = _ms(t)

        for i, token in enumerate(committed):
            generated += 1
            finish = _finish([token], target.stop_ids, generated, budget)
            if finish:
                committed, origins = committed[: i + 1], origins[: i + 1]
                break
        ids += committed
        if finish:
            # A stop inside the accepted drafts: forget what the caches hold past it.
            target.rewind(len(ids) - 1)
            if drafter is not None:
                drafter.rewind(len(ids) - 1)
        text = stream.push(committed) + (stream.flush() if finish else "")
        yield Step(committed, text, draft_ids, n, min(accepted, len(committed)), origins, draft_ms, verify_ms,
                   _ms(started), confidences=confidences, finish_reason=finish)


def _read(*tensors: torch.Tensor | None) -> list[list[float] | None]:
    """Several device tensors in one transfer to the host (None stays None). Token ids travel as float32,
    exact below 2**24: vocabularies hold at most a few hundred thousand tokens."""
    present = [t for t in tensors if t is not None]
    values = torch.cat([t.reshape(-1).float().to(present[0].device) for t in present]).tolist()
    out = []
    for t in tensors:
        out.append(None if t is None else values[: t.numel()])
        values = values[0 if t is None else t.numel():]
    return out


def _finish(tokens: list[int], stop_ids: tuple[int, ...], generated: int, budget: int) -> str | None:
    if tokens[-1] in stop_ids:
        return "stop"
    return "length" if generated >= budget else None


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000
