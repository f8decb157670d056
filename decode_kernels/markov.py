"""The sequential stage of a DSpark drafter: the Markov head turns the backbone's parallel logits
into a left-to-right proposal, each token conditioned on the one before it.

Head kinds (DeepSpec's markov_head_type), with e = W1[x_{k-1}] and h_k the backbone output:
  vanilla: bias_k = W2 e
  gated:   bias_k = W2 (sigmoid(G [h_k; e] + g) * e)
  rnn:     s_k = a s_{k-1} + (1 - a) tanh(c), bias_k = W2 tanh(o), [a; c; o] = J [s_{k-1}; e; h_k] + j
"""

import torch
import torch.nn.functional as F

from .sampling import sample, to_probs

HEAD_KINDS = ("vanilla", "gated", "rnn")


def markov_bias(
    kind: str, weights: dict[str, torch.Tensor], prev_ids: torch.Tensor, hidden: torch.Tensor, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logit bias for one step. prev_ids [...], hidden [..., d]; returns (bias [..., V], new state)."""
    e = F.embedding(prev_ids, weights["w1"]).to(hidden.dtype)
    if kind == "vanilla":
        return F.linear(e, weights["w2"]), state
    if kind == "gated":
        gate = torch.sigmoid(F.linear(torch.cat([hidden, e], -1), weights["gate_w"], weights["gate_b"]))
        return F.linear(gate * e, weights["w2"]), state
    if kind == "rnn":
        if state is None:
            state = torch.zeros_like(e)
        a, c, o = F.linear(torch.cat([state, e, hidden], -1), weights["joint_w"], weights["joint_b"]).chunk(3, -1)
        a = torch.sigmoid(a)
        state = a * state + (1 - a) * torch.tanh(c)
        return F.linear(torch.tanh(o), weights["w2"]), state
    raise ValueError(f"unknown Markov head kind {kind!r}")


def markov_draft(
    base_logits: torch.Tensor,
    hidden: torch.Tensor,
    anchor: torch.Tensor,
    kind: str,
    weights: dict[str, torch.Tensor],
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    vocab: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Draft len(base_logits) tokens left to right.

    base_logits [n, V], hidden [n, d], anchor: 0-d token id. Greedy when temperature is 0. With a draft
    vocabulary, column j of the logits (and of W2's output) is token vocab[j]. state: the rnn head's state
    before the first of these positions (zeros when None).
    Returns (tokens [n], corrected logits [n, V], draft probabilities [n, V] or None when greedy).
    """
    prev = anchor.reshape(())
    tokens, logits, probs = [], [], []
    for k in range(base_logits.shape[0]):
        bias, state = markov_bias(kind, weights, prev, hidden[k], state)
        step_logits = base_logits[k] + bias
        if temperature > 0:
            step_probs = to_probs(step_logits, temperature, top_k, top_p)
            prev = sample(step_probs, generator)
            probs.append(step_probs)
        else:
            prev = step_logits.argmax(-1)
        if vocab is not None:
            prev = vocab[prev.view(1)].view(())  # a tensor index, not a Python int: no read of the token
        tokens.append(prev)
        logits.append(step_logits)
    return torch.stack(tokens), torch.stack(logits), torch.stack(probs) if probs else None
