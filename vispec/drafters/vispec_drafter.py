"""ViSpec drafter: an EAGLE head plus a vision adaptor that compresses each image.

For every image in the prompt, ``num_q`` learnable queries attend (one non-causal
multi-head cross-attention, no norm / MLP / residual) over the image's projected
vision features, i.e. the embeddings the target placed at the image positions. The
first ``num_q - 1`` outputs replace the image in the drafter's sequence; the last is
the image's **global feature** g. Each text position's target feature f becomes
``img_fc([f ; g])`` (initialised to return f) before the usual ``fc([e ; f])``, in
the prefill and in every draft step, g being the feature of the latest image before
it (zero before the first image).

Sequence construction (drafter position i pairs the target feature at i with the
embedding of token i+1, as EAGLE): position i is an image position iff token i+1 is
an image token; image positions are dropped, the compressed tokens go in raw
(bypassing fc) at the last ``num_q - 1`` of them and keep those original position
ids, so later text keeps counting over the uncompressed sequence. Unlike the
original code, any number of images per prompt and batches of any size work, and a
video is compressed frame by frame (its global feature is the frames' average).
Parameter names follow the official ViSpec checkpoints (``imadpt.*``, ``img_fc``).

On the EAGLE-3 base (``generation=3``) the same pieces sit where that head reads its
inputs: g enters as ``img_fc([fc(f_low, f_mid, f_high) ; g])`` and a compressed token
takes the embedding's half of the layer input ``[e ; f]``, the other half being the
fused target feature at its position (the layer has no H-wide input to put it raw).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import PrefillInputs
from ..seq import compact, image_blocks
from .eagle import DrafterConfig, EagleDrafter


class VisionAdaptor(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.c = c
        heads, hd = c.num_attention_heads, c.head_dim
        self.q = nn.Parameter(torch.randn(c.num_q, heads, hd) * hd**-0.5)
        self.k_proj = nn.Linear(c.hidden_size, heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, heads * hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(heads * hd, c.hidden_size, bias=False)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (n, H) vision embeddings of one image -> (num_q, H)."""
        c = self.c
        n = feats.shape[0]
        k = self.k_proj(feats).view(1, n, c.num_attention_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(feats).view(1, n, c.num_attention_heads, c.head_dim).transpose(1, 2)
        q = self.q.to(feats.dtype).unsqueeze(0).transpose(1, 2)  # (1, heads, num_q, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # every query sees the whole image
        return self.o_proj(out.transpose(1, 2).reshape(c.num_q, -1))


class ViSpecDrafter(EagleDrafter):
    def __init__(self, config: DrafterConfig, embed_tokens, lm_head):
        if config.num_q < 1:
            raise ValueError(f"num_q must be >= 1 (num_q - 1 compressed tokens + 1 global feature), got {config.num_q}")
        super().__init__(config, embed_tokens, lm_head)
        h = config.hidden_size
        self.imadpt = VisionAdaptor(config)
        if config.global_feature:
            self.img_fc = nn.Linear(2 * h, h, bias=config.fc_bias)
            self._identity_img_fc()

    @classmethod
    def drafter_type(cls) -> str:
        return "vispec"

    def _identity_img_fc(self):
        h = self.config.hidden_size
        with torch.no_grad():
            self.img_fc.weight.zero_()
            self.img_fc.weight[:, :h] = torch.eye(h)
            if self.img_fc.bias is not None:
                self.img_fc.bias.zero_()

    def _init_weights(self):
        super()._init_weights()
        if self.config.global_feature:
            self._identity_img_fc()  # img_fc([f ; g]) = f at the start: a stage-1 EAGLE head loads unchanged
        with torch.no_grad():
            self.imadpt.q.normal_(0.0, self.config.head_dim**-0.5)

    def begin(self, batch_size, max_len, device, tree=None):
        super().begin(batch_size, max_len, device, tree)
        self.state.glob = torch.zeros(batch_size, self.config.hidden_size, dtype=self.fc.weight.dtype, device=device)

    def condition(self, f, glob=None, step=0):
        """img_fc([f ; g]) with g the row's latest global feature, (B, H), or one per position (B, T, H)."""
        if not self.config.global_feature:
            return f
        g = self.state.glob if glob is None else glob
        if g.dim() == 2:
            g = g.unsqueeze(1).expand(-1, f.shape[1], -1)
        return self.img_fc(torch.cat([f, g.to(f.dtype)], -1))

    def prefill_sequence(self, inputs: PrefillInputs):
        b, p, h = inputs.inputs_embeds.shape
        dev = inputs.inputs_embeds.device
        nq = self.config.num_q
        emb = self.shifted_embeds(inputs)
        glob_pos = torch.zeros(b, p, h, dtype=emb.dtype, device=dev)  # g seen by each text position
        row_glob = torch.zeros(b, h, dtype=emb.dtype, device=dev)
        keep = torch.ones(b, p, dtype=torch.bool, device=dev)
        compressed = []  # (row, drafter position, vector)
        image_mask = inputs.image_mask
        for r in range(b):
            n = int(inputs.lengths[r])
            if image_mask is None or not bool(image_mask[r, :n].any()):
                continue
            frames = inputs.frame_tokens[r] if inputs.frame_tokens is not None else None
            for bi, (start, end) in enumerate(image_blocks(image_mask[r, :n])):
                # Drafter positions start-1 .. end-1 pair with image tokens: dropped.
                lo = max(start - 1, 0)
                keep[r, lo:end] = False
                size = frames[bi] if frames is not None and bi < len(frames) else end - start + 1
                if size < 1 or (end - start + 1) % size:
                    raise ValueError(f"row {r}: a block of {end - start + 1} visual tokens does not split into frames of {size}")
                globs = []
                for fs in range(start, end + 1, size):  # one adaptor pass per frame (an image is one frame)
                    fe = fs + size - 1
                    out = self.imadpt(inputs.inputs_embeds[r, fs : fe + 1])  # (num_q, H)
                    for j in range(nq - 1):  # compressed tokens at the frame's last num_q-1 dropped positions
                        pos = fe - (nq - 1) + j
                        if pos >= max(fs - 1, lo):
                            compressed.append((r, pos, out[j]))
                    globs.append(out[-1])
                g = torch.stack(globs).mean(0)  # a video's global feature: the frames' average
                glob_pos[r, end:] = g  # text after this block sees its global feature
                row_glob[r] = g
        is_comp = torch.zeros(b, p, dtype=torch.bool, device=dev)
        if self.config.generation == 3:  # EAGLE-3: a compressed token takes the embedding's half of the input
            emb = emb.clone()
            for r, pos, vec in compressed:
                emb[r, pos] = vec.to(emb.dtype)
        x_all = self.fuse(emb, inputs.features, glob=glob_pos)  # (B, P, H or 2H) text inputs
        for r, pos, vec in compressed:
            if self.config.generation == 2:
                x_all[r, pos] = vec.to(x_all.dtype)  # raw: bypasses fc and img_fc (as the official ViSpec)
            is_comp[r, pos] = True
        valid = torch.arange(p, device=dev).unsqueeze(0) < inputs.lengths.unsqueeze(1)
        take = (keep | is_comp) & valid
        self.state.glob = row_glob
        x, positions, counts = compact(x_all, take)
        self.state.glob_seq = torch.gather(glob_pos, 1, positions.unsqueeze(-1).expand(-1, -1, h))
        return x, positions, counts

