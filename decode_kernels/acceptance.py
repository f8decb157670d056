"""The lossless acceptance step of speculative decoding.

The target verified the anchor and n draft tokens in one pass, giving n + 1 next-token
distributions. Draft k is accepted with probability min(1, p(x_k) / q(x_k)), left to right; at the
first rejection one token is drawn from norm(max(0, p - q)); if all n are accepted, a bonus token is
drawn from the last distribution. The committed tokens then follow the target's distribution exactly.

Both rules stay on the device: they return tensors and never branch on a value, so a round reads
its outcome once, after the rule, instead of waiting for the device inside it.
"""

import torch

from .sampling import sample


def accept_greedy(target_logits: torch.Tensor, draft_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rule: a draft is accepted while it equals the target's argmax.

    target_logits: [n + 1, V]; draft_ids: [n]. Returns (accepted count, next token id), 0-d tensors.
    """
    best = target_logits.argmax(-1)
    n = draft_ids.shape[0]
    accepted = (draft_ids == best[:n]).cumprod(0).sum()
    # Indexed by a one-element tensor: a 0-d one would be read back as a Python int, waiting for the device.
    return accepted, best[accepted.view(1)].view(())


def accept_sampled(
    target_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection-sampling rule.

    target_probs: [n + 1, V] processed target distributions; draft_ids: [n]; draft_probs: [n, V]
    distributions the drafts were drawn from, or None for a deterministic drafter (each draft had
    probability 1, as with prompt lookup). Returns (accepted count, next token id), 0-d tensors.
    """
    n = draft_ids.shape[0]
    p = target_probs[:n].gather(-1, draft_ids[:, None]).squeeze(-1)
    q = torch.ones_like(p) if draft_probs is None else draft_probs.gather(-1, draft_ids[:, None]).squeeze(-1)
    u = torch.rand(n, generator=generator, device=p.device)
    # u < p / q, written without the division so that q = 0 cannot produce nan.
    accepted = (u * q < p).cumprod(0).sum()
    # Row k of `drafted` is what the drafter proposed at position k; the row after the last draft is
    # zero, so when every draft is accepted the residual below is the target's own last row.
    drafted = torch.zeros_like(target_probs)
    if draft_probs is None:
        drafted[:n].scatter_(1, draft_ids[:, None], 1.0)
    else:
        drafted[:n] = draft_probs
    row = accepted.view(1)
    target_row = target_probs.index_select(0, row)[0]
    residual = (target_row - drafted.index_select(0, row)[0]).clamp_min(0)
    # A rejection implies p(x) < q(x), so some other token has p > q and the residual has mass;
    # only rounding can empty it, and then the target row itself is the right fallback.
    mass = residual.sum()
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_row)
    return accepted, sample(residual, generator)
