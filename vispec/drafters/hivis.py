"""HiViS drafter: an EAGLE head whose input holds no visual token at all.

The target's last hidden states at the text positions already carry the image
(through the target's attention), so the drafter's prefill is the prompt's text
only: the text tokens t_1..t_m in order, each pairing the target feature at t_j with
the embedding of the next text token (the generated token after the last one), at
the target's original position ids. The drafter's prefill length is the text length.
"""
from __future__ import annotations

import torch

from .base import PrefillInputs
from ..seq import compact
from .eagle import EagleDrafter


class HiViSDrafter(EagleDrafter):
    @classmethod
    def drafter_type(cls) -> str:
        return "hivis"

    def prefill_sequence(self, inputs: PrefillInputs):
        b, p, _ = inputs.inputs_embeds.shape
        dev = inputs.inputs_embeds.device
        valid = torch.arange(p, device=dev).unsqueeze(0) < inputs.lengths.unsqueeze(1)
        text = valid if inputs.image_mask is None else valid & ~inputs.image_mask
        # Text positions left-aligned, then each pairs with the NEXT text token's embedding.
        emb_text, pos, counts = compact(inputs.inputs_embeds, text)
        feats = torch.gather(inputs.features, 1, pos.unsqueeze(-1).expand(-1, -1, inputs.features.shape[-1]))
        nxt = torch.cat([emb_text[:, 1:], emb_text[:, :1]], 1).clone()
        rows = torch.arange(b, device=dev)
        nxt[rows, (counts - 1).clamp(min=0)] = self.embed_tokens(inputs.next_tokens).to(nxt.dtype)
        return self.fuse(nxt, feats), pos, counts
