"""Qwen2-VL and Qwen2.5-VL: M-RoPE (3 position sections), images and videos, per-request rope deltas."""
from __future__ import annotations

import torch

from ..seq import image_blocks
from .base import register
from .vision import VisionAdapter


@register
class QwenVLAdapter(VisionAdapter):
    classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    inputs = frozenset({"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                        "second_per_grid_ts", "mm_token_type_ids"})
    token_inputs = frozenset({"mm_token_type_ids"})
    pixel_inputs = ("pixel_values", "pixel_values_videos")
    GRIDS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")

    def positions(self, input_ids, attention_mask, inputs):
        """M-RoPE positions (3, B, P), and per section and row the offset (3, B) of the next position from
        the sequence length. After text the offset is the same in all sections (the model's rope delta);
        after a visual token each section continues from its own last position, as ``generate`` does."""
        if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
            pos, _ = super().positions(input_ids, attention_mask, inputs)
            pos = pos.unsqueeze(0).expand(3, -1, -1)
        elif inputs.get("mm_token_type_ids") is None:
            raise ValueError("image_grid_thw / video_grid_thw were given without mm_token_type_ids (the processor returns it)")
        else:
            grids = {k: inputs[k] for k in self.GRIDS if inputs.get(k) is not None}
            pos, _ = self.base.get_rope_index(input_ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                              attention_mask=attention_mask, **grids)
        m = attention_mask.bool()
        last = m.shape[1] - 1 - torch.argmax(m.flip(1).int(), 1)  # (B,) each row's last real token
        last_pos = torch.gather(pos, 2, last.view(1, -1, 1).expand(3, -1, 1)).squeeze(2)  # (3, B)
        return pos, last_pos + 1 - m.sum(1)

    def tree_positions(self, state, lens, depth):
        return (lens.unsqueeze(1) + depth).unsqueeze(0) + state.to(lens.device).unsqueeze(2)  # (3, B, N)

    def frame_tokens(self, input_ids, image_mask, inputs):
        """Videos hold grid_t frames of (h * w / merge^2) tokens each; an image is one frame."""
        grid = inputs.get("video_grid_thw")
        video_id = getattr(self.model.config, "video_token_id", None)
        if grid is None or video_id is None:
            return None
        merge = self.model.config.vision_config.spatial_merge_size
        per_video = [int(h * w) // (merge * merge) for _, h, w in grid.tolist()]
        k, out = 0, []
        for r in range(input_ids.shape[0]):
            row = []
            for start, end in image_blocks(image_mask[r]):
                if int(input_ids[r, start]) == video_id and k < len(per_video):
                    row.append(per_video[k])
                    k += 1
                else:
                    row.append(end - start + 1)
            out.append(row)
        return out


@register
class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: interleaved M-RoPE (inside the model's rotary embedding) and DeepStack, which adds visual
    features to the first decoder layers' hidden states at image positions: both happen inside the
    prefill forward; tree forwards hold text only. A video's frames are separate blocks (each after its
    timestamp tokens), so each block is one frame."""

    classes = ("Qwen3VLForConditionalGeneration",)
    inputs = QwenVLAdapter.inputs - {"second_per_grid_ts"}
    GRIDS = ("image_grid_thw", "video_grid_thw")

    def frame_tokens(self, input_ids, image_mask, inputs):
        return None
