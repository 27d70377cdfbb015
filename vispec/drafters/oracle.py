"""A drafter that knows the answer: for tests and for measuring engine overhead.

It proposes the target's known continuation (for instance its greedy output) as a
chain of ``depth`` tokens, hidden among ``width - 1`` wrong siblings per level in a
random slot, and keeps each correct token with probability ``acceptance`` (once one
is left out, the rest of the chain is wrong too). With acceptance 1 every draft of a
greedy continuation is accepted; lower values control tau exactly, so the engine's
efficiency can be measured as speedup / (tau + 1).
"""
from __future__ import annotations

import torch

from .base import DraftTree, PrefillInputs, TreeConfig


class OracleDrafter:
    feature_layers = None  # reads the target's last hidden states (and ignores them)

    def __init__(self, continuations: torch.Tensor, vocab_size: int, acceptance: float = 1.0, width: int = 3, seed: int = 0):
        """continuations (B, T): row b's expected new tokens, the first one included."""
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.cont = continuations.detach().cpu().long()
        self.vocab = vocab_size
        self.acceptance = acceptance
        self.width = width
        self.gen = torch.Generator().manual_seed(seed)
        self.ptr = None

    def check_target(self, model) -> None:
        vocab = model.get_input_embeddings().weight.shape[0]
        if vocab != self.vocab:
            raise ValueError(f"oracle drafter vocabulary {self.vocab} does not match the target's {vocab}")

    def check_tree(self, tree: TreeConfig) -> None:
        if 1 + tree.depth * self.width > tree.num_nodes:
            raise ValueError(f"the oracle drafts {1 + tree.depth * self.width} nodes (depth {tree.depth} x width "
                             f"{self.width} + root), more than tree.total_tokens + 1 = {tree.num_nodes}")

    def begin(self, batch_size, max_len, device, tree=None):
        if batch_size != self.cont.shape[0]:
            raise ValueError(f"oracle drafter holds {self.cont.shape[0]} continuations, the batch has {batch_size} rows")
        self.device = device
        self.ptr = torch.zeros(batch_size, dtype=torch.long)
        self.roots = torch.zeros(batch_size, dtype=torch.long)

    def prefill(self, inputs: PrefillInputs) -> None:
        self.ptr.zero_()
        self.roots = inputs.next_tokens.detach().cpu()

    def extend(self, tokens, features, n_valid) -> None:
        n = n_valid.detach().cpu()
        self.ptr += n
        self.roots = tokens.detach().cpu()[torch.arange(len(n)), n - 1]

    def _next(self, b: int, i: int) -> int:
        j = int(self.ptr[b]) + i
        return int(self.cont[b, j]) if j < self.cont.shape[1] else 0

    def propose(self, tree: TreeConfig) -> DraftTree:
        bsz, depth, w = len(self.ptr), tree.depth, self.width
        n = 1 + depth * w
        tokens = torch.zeros(bsz, n, dtype=torch.long)
        parents = torch.full((bsz, n), -1, dtype=torch.long)
        depths = torch.zeros(bsz, n, dtype=torch.long)
        for b in range(bsz):
            tokens[b, 0] = self.roots[b]
            chain_parent, on_track = 0, True
            for d in range(1, depth + 1):
                base = 1 + (d - 1) * w
                right = self._next(b, d)
                on_track = on_track and bool(torch.rand(1, generator=self.gen) < self.acceptance)
                slot = int(torch.randint(0, w, (1,), generator=self.gen))
                for s in range(w):
                    tok = int(torch.randint(0, self.vocab, (1,), generator=self.gen))
                    while tok == right:  # wrong siblings must be wrong
                        tok = (tok + 1) % self.vocab
                    tokens[b, base + s] = right if (s == slot and on_track) else tok
                    parents[b, base + s] = chain_parent
                    depths[b, base + s] = d
                chain_parent = base + slot
        return DraftTree(tokens=tokens.to(self.device), parents=parents.to(self.device), depth=depths.to(self.device))
