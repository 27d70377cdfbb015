"""Tree attention inside unmodified transformers models, through their attention registry.

``register()`` adds an attention function named ``"vispec"`` to transformers'
``AttentionInterface`` (and SDPA's mask builder under the same name to
``AttentionMaskInterface``). The function runs ``vispec.ops.tree_attention`` when the
forward call carries a ``vispec_tree=TreeStep(...)`` keyword (transformers passes
extra keywords down to the attention function), and plain SDPA otherwise, so the
prefill, the vision tower and any ordinary call behave exactly as with ``"sdpa"``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops

ATTN_NAME = "vispec"


@dataclass
class TreeStep:
    """What one tree-verification forward needs besides the tokens."""

    cache_lens: torch.Tensor  # (B,) int64: committed length of each row's cache
    tree_mask: torch.Tensor  # (B or 1, N, ceil(N/32)) int32, packed ancestor-or-self mask

    def on(self, device: torch.device) -> "TreeStep":
        """This step's tensors on ``device`` (layers of a model spread over devices), copied once per device."""
        if self.cache_lens.device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            copies[device] = TreeStep(self.cache_lens.to(device), self.tree_mask.to(device))
        return copies[device]


def vispec_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, vispec_tree=None, **kwargs):
    if vispec_tree is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    # query (B, Hq, N, D) from the model; key/value are the cache's whole (B, Hkv, S_max, D) buffers.
    q = query.transpose(1, 2)  # (B, N, Hq, D), a view: the op takes its strides
    step = vispec_tree.on(query.device)
    # Sliding-window layers (Mistral, Gemma-3's local layers, ...) pass their window; full ones None.
    window = kwargs.get("sliding_window") or 0
    out = ops.tree_attention(q, key, value, step.cache_lens, step.tree_mask, scale=scaling, window=window)
    return out, None  # (B, N, Hq, D), as every transformers attention function returns


_registered = False


def register() -> str:
    """Registers the ``"vispec"`` attention implementation (idempotent); returns its name."""
    global _registered
    if not _registered:
        AttentionInterface.register(ATTN_NAME, vispec_attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _registered = True
    return ATTN_NAME
