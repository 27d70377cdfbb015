"""HiViS drafter (Xie et al., "HiViS: Hiding Visual Tokens from the Drafter for Speculative Decoding in
Vision-Language Models", arXiv 2509.23928, v1 and the revised v2): an EAGLE head whose input holds no
visual token at all. The release code read for this (the paper's full text was not readable here, only
the abstracts of v1 and v2) is the copy vendored in HangerYang/Angel, ``HiViS/hivis/``.

- **Explicit-implicit input decomposition** (v1 abstract and Sec. 3; v2's "semantic fusion" view): the
  target's last hidden states at the text positions already carry the image (through the target's
  attention), so the drafter's prefill is the prompt's text only: the text tokens t_1..t_m in order,
  each pairing the target feature at t_j with the embedding of the next text token (the generated token
  after the last one), at the target's original position ids. The drafter's prefill length is the text
  length (the paper reports 0.7-1.3% of the target's input).
- **Sequential embedding / step-dependent bias-correction residuals** (v1: "sequential embedding
  supervision", e_seq^0 in the drafter's prefill; v2: "time-step-aware aligned training ... guided by
  step-dependent bias-correction residuals"): ``hivis_residuals`` = K learned vectors r_0..r_{K-1} (H
  wide). As in the release (``model/cnets_hivis.py``), an EAGLE-2 head reads ``fc([e ; f ; r_s])`` (3H -> H;
  parameter ``residual``) where s = 0 for the target's features (prefill and every verified token: e_seq^0)
  and s = j at the j-th draft step, clipped to K - 1: a fixed per-step bias correcting the drift of the
  drafter's own features. On an EAGLE-3 head (no H-wide fc after the fused feature) r_s is added to the
  fused feature f instead. K = 0 is the plain text-only drafter (kept for comparison). Stage 2 from a
  K = 1 stage-1 drafter starts every row as row 0 (:meth:`adopt`, as the release's stage 2 does).
- **Multi-step self-feedback training with dynamic data selection** (v1 abstract; release
  ``train/main_mix_topk_dyn_res.py``): ``vispec.train.STAGES["hivis"]`` / ``STAGE_OPTIONS["hivis"]``
  (``TrainConfig(stage="hivis")``): 3 self-fed steps weighted alike, losses 0.1 soft CE + 1.0 feature
  SmoothL1 + 1.0 x the soft CE's terms at the target's top-10 (its probabilities not renormalised), a
  position kept in a later step's loss only while the target's top-1 is in the drafter's top-5; trained
  through the training-time test unroll (step j at position t is the release's self-fed copy j at t + j).
  Where this differs from the release: the selection follows each scored chain's own earlier steps (the
  release's index t at step j belongs to the chain rooted one position later), gradients flow through the
  unroll (the release detaches the fed-back states and steps backward one at a time), and stage 1 takes
  the EAGLE-2 generation's two passes, the same for every kind (the release: one teacher-forced pass).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import PrefillInputs
from ..seq import compact
from .eagle import DrafterConfig, EagleDrafter


class HiViSDrafter(EagleDrafter):
    def __init__(self, config: DrafterConfig, embed_tokens, lm_head):
        if config.hivis_residuals < 0:
            raise ValueError(f"hivis_residuals must be >= 0, got {config.hivis_residuals}")
        super().__init__(config, embed_tokens, lm_head)
        h = config.hidden_size
        self.residual = None
        if config.hivis_residuals:
            self.residual = nn.Parameter(torch.empty(config.hivis_residuals, h))
            nn.init.xavier_uniform_(self.residual)
            if config.generation == 2:  # fc reads [e ; f ; r_s]
                self.fc = nn.Linear(3 * h, h, bias=config.fc_bias)

    @classmethod
    def drafter_type(cls) -> str:
        return "hivis"

    def _init_weights(self):
        super()._init_weights()
        if self.residual is not None:
            nn.init.xavier_uniform_(self.residual.data)

    def _residual(self, step: int) -> torch.Tensor:
        return self.residual[min(step, self.residual.shape[0] - 1)]

    def condition(self, f, glob=None, step=0):
        if self.residual is not None and self.config.generation == 3:
            return f + self._residual(step).to(f.dtype)
        return f

    def fc_extra(self, f, step):
        if self.residual is None:
            return []
        return [self._residual(step).to(f.dtype).expand(*f.shape[:-1], -1)]

    def adopt(self, state: dict) -> dict:
        """From a drafter with another number of residuals (HiViS stage 2 from stage 1: K = 1 -> 3): rows
        beyond the given ones start as its last (as the release initialises them); from one without any,
        an EAGLE-2 fc gets zero columns for r_s, so the head computes what it did."""
        if self.residual is None:
            return state
        k, h = self.residual.shape
        state = dict(state)
        r = state.get("residual")
        if r is not None and r.shape[0] != k:
            state["residual"] = torch.cat([r[:k], r[-1:].expand(max(k - r.shape[0], 0), -1)])
        fc = state.get("fc.weight")
        if r is None and fc is not None and self.config.generation == 2 and fc.shape[1] == 2 * h:
            state["fc.weight"] = torch.cat([fc, fc.new_zeros(h, h)], 1)
        return state

    @classmethod
    def _official_layout(cls, state: dict) -> tuple[dict, dict]:
        """The release's ``residual`` (K, H) (or its legacy name ``adaptive_embedding``) sets hivis_residuals."""
        if "adaptive_embedding" in state and "residual" not in state:
            state = {("residual" if k == "adaptive_embedding" else k): v for k, v in state.items()}
        return ({"hivis_residuals": int(state["residual"].shape[0])} if "residual" in state else {}), state

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
