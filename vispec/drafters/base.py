"""The drafter interface the engine drives, and the tree a drafter proposes.

A drafter keeps its own state for a batch of requests. The engine calls, per request:

1. ``check_target(model)`` and ``check_tree(tree)`` before any work (ValueError naming the problem);
   ``begin(batch_size, max_len, device, tree)`` to allocate that state (``max_len`` target
   positions; the drafter adds what its own tree drafting needs);
2. ``prefill(PrefillInputs)`` once, with the target's view of the prompt;
3. then, each step, ``propose(tree_config)`` to get a tree rooted at the last
   accepted token, and ``extend(tokens, features, n_valid)`` with what the target
   accepted.

Feature/token pairing (EAGLE): the drafter input at a position pairs the target's
last hidden state ``f_i`` with the embedding of the token that FOLLOWS it
(``x_{i+1}``); its output predicts the token after that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class TreeConfig:
    """EAGLE-2 dynamic tree: ``top_k`` children per expanded node, ``depth`` levels, ``total_tokens`` drafts kept.

    The verified tree has ``total_tokens + 1`` nodes (the root, the last accepted token, included).
    """

    total_tokens: int = 30
    depth: int = 3
    top_k: int = 8

    def __post_init__(self):
        for name in ("total_tokens", "depth", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TreeConfig.{name} must be a positive int, got {v!r}")
        pool = self.top_k + (self.depth - 1) * self.top_k * self.top_k
        if self.total_tokens > pool:
            raise ValueError(
                f"TreeConfig.total_tokens={self.total_tokens} exceeds the {pool} candidates that depth={self.depth} "
                f"and top_k={self.top_k} produce"
            )

    @property
    def num_nodes(self) -> int:
        return self.total_tokens + 1


@dataclass
class DraftTree:
    """A batch of trees in topological order (parents before children); node 0 is the root."""

    tokens: torch.Tensor  # (B, N) int64; tokens[:, 0] is the root token
    parents: torch.Tensor  # (B, N) int64; parents[:, 0] = -1, parents[:, i] < i
    depth: torch.Tensor  # (B, N) int64; depth[:, 0] = 0


@dataclass
class PrefillInputs:
    """The target's view of the prompt, rows left-aligned (row b is valid for j < lengths[b])."""

    input_ids: torch.Tensor  # (B, P) prompt tokens
    inputs_embeds: torch.Tensor  # (B, P, H) the target's input embeddings (image features at image positions)
    features: torch.Tensor  # (B, P, H) the target's last hidden states (after the final norm), or (B, P, n * H)
    # the inputs of the drafter's ``feature_layers``, concatenated
    lengths: torch.Tensor  # (B,) int64
    next_tokens: torch.Tensor  # (B,) the token generated after the prompt: the first tree root
    image_mask: torch.Tensor | None = None  # (B, P) bool: positions holding image (or video) features
    # Per row, per image/video block in order: tokens of one frame (a video block holds several frames,
    # an image is one frame). None: every block is a single frame.
    frame_tokens: list[list[int]] | None = None


@runtime_checkable
class Drafter(Protocol):
    """What the engine needs from a drafter (see the module docstring for the call order)."""

    # The target hidden states the drafter reads, as indices of transformers' ``hidden_states`` (the
    # inputs of those decoder layers, concatenated: EAGLE-3); None (or absent): the last hidden state.
    feature_layers: list[int] | None

    def check_target(self, model) -> None:
        """Raises ValueError naming the mismatch if this drafter was not built for ``model``."""

    def check_tree(self, tree: TreeConfig) -> None:
        """Raises ValueError if this drafter cannot draft trees of that shape."""

    def begin(self, batch_size: int, max_len: int, device: torch.device, tree: TreeConfig | None = None) -> None: ...

    def prefill(self, inputs: PrefillInputs) -> None: ...

    def extend(self, tokens: torch.Tensor, features: torch.Tensor, n_valid: torch.Tensor) -> None:
        """tokens (B, K), features (B, K, H): row b's first ``n_valid[b]`` pairs were accepted."""

    def propose(self, tree: TreeConfig) -> DraftTree: ...
