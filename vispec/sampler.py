"""How the next token is chosen: greedy, or sampled from the target's processed distribution.

One object serves the first token after the prompt and the verification of every tree, so
both use exactly the same distribution (temperature, then top-k with ties kept, then top-p,
as ``model.generate(do_sample=True)`` processes it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ops
from .drafters.base import DraftTree


@dataclass(frozen=True)
class Sampler:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None  # None or 0: no top-k
    top_p: float | None = None  # None or 1: no top-p
    generator: torch.Generator | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"top_k must be a non-negative int or None, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")

    @classmethod
    def create(cls, temperature=0.0, top_k=None, top_p=None, *, seed=None, generator=None, device="cpu") -> "Sampler":
        """A sampler with its own generator when sampling (seeded by ``seed``, else from the OS)."""
        s = cls(temperature, top_k, top_p, generator)  # validates before a generator is made
        if s.greedy or generator is not None:
            return s
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()
        return cls(temperature, top_k, top_p, generator)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def first(self, logits: torch.Tensor) -> torch.Tensor:
        """The token after the prompt from its last position's logits (B, V): (B,)."""
        if self.greedy:
            return logits.float().argmax(-1)
        zeros = torch.zeros(logits.shape[0], 1, dtype=torch.int64, device=logits.device)
        # A one-node tree: nothing to accept, the bonus is a plain sample from the processed distribution.
        return self.verify(logits.unsqueeze(1).contiguous(), DraftTree(zeros, zeros - 1, zeros), 0)[2]

    def verify(self, logits: torch.Tensor, tree: DraftTree, max_accept: int):
        """(accepted path (B, max_accept + 1), accepted length (B,), bonus token (B,)) of a verified tree."""
        if self.greedy:
            return ops.verify_greedy(logits, tree.tokens, tree.parents, max_accept)
        return ops.verify_sampling(logits, tree.tokens, tree.parents, float(self.temperature), self.top_k,
                                   self.top_p, generator=self.generator, max_accept=max_accept)
