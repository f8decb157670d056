"""The lossless acceptance step of speculative decoding.

The target verified the anchor and n draft tokens in one pass, giving n + 1 next-token
distributions. Draft k is accepted with probability min(1, p(x_k) / q(x_k)), left to right; at the
first rejection one token is drawn from norm(max(0, p - q)); if all n are accepted, a bonus token is
drawn from the last distribution. The committed tokens then follow the target's distribution exactly.
"""

import torch

from .sampling import sample


def accept_greedy(target_logits: torch.Tensor, draft_ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Greedy rule: a draft is accepted while it equals the target's argmax.

    target_logits: [n + 1, V]; draft_ids: [n]. Returns (accepted count, next token id as a 0-d tensor).
    """
    best = target_logits.argmax(-1)
    n = draft_ids.shape[0]
    accepted = int((draft_ids == best[:n]).cumprod(0).sum()) if n else 0
    return accepted, best[accepted]


def accept_sampled(
    target_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[int, torch.Tensor]:
    """Rejection-sampling rule.

    target_probs: [n + 1, V] processed target distributions; draft_ids: [n]; draft_probs: [n, V]
    distributions the drafts were drawn from, or None for a deterministic drafter (each draft had
    probability 1, as with prompt lookup). Returns (accepted count, next token id as a 0-d tensor).
    """
    n = draft_ids.shape[0]
    if n == 0:
        return 0, sample(target_probs[0], generator)
    p = target_probs[:n].gather(-1, draft_ids[:, None]).squeeze(-1)
    q = torch.ones_like(p) if draft_probs is None else draft_probs.gather(-1, draft_ids[:, None]).squeeze(-1)
    u = torch.rand(n, generator=generator, device=p.device)
    # u < p / q, written without the division so that q = 0 cannot produce nan.
    accepted = int((u * q < p).cumprod(0).sum())
    if accepted == n:
        return n, sample(target_probs[n], generator)
    if draft_probs is None:
        rejected = torch.zeros_like(target_probs[accepted]).scatter_(0, draft_ids[accepted : accepted + 1], 1.0)
    else:
        rejected = draft_probs[accepted]
    residual = (target_probs[accepted] - rejected).clamp_min(0)
    # A rejection implies p(x) < q(x), so some other token has p > q and the residual has mass;
    # only rounding can empty it, and then the target row itself is the right fallback.
    mass = residual.sum()
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_probs[accepted])
    return accepted, sample(residual, generator)
