"""What a request asks for (greedy or sampled) and what a drafter hands to the decode loop."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspark_chat.kernels.sampling import sample, to_probs


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return to_probs(logits, self.temperature, self.top_k, self.top_p)

    def pick(self, logits: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens for each row of logits, and the distributions they came from (None when greedy)."""
        if self.greedy:
            return logits.argmax(-1), None
        probs = self.probs(logits)
        return sample(probs, generator), probs


@dataclass
class Proposal:
    tokens: torch.Tensor  # [n] draft token ids
    probs: torch.Tensor | None  # [n, V] distributions they were drawn from; None: greedy or deterministic
    confidence_logits: torch.Tensor | None = None  # [n], logit of P(accepted | all before accepted)
    # Prompt lookup: how many of the context's last tokens the copied source matched. It predicts
    # acceptance, and the auto scheduler keys what it learns on it.
    match: int | None = None

    @classmethod
    def empty(cls, device) -> "Proposal":
        return cls(torch.empty(0, dtype=torch.long, device=device), None)
