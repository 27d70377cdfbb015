"""What every vision-language family shares: a language model under ``model.model.language_model``,
image / video placeholder tokens in the prompt, and pixel inputs that must match them."""
from __future__ import annotations

import torch

from .base import Adapter


class VisionAdapter(Adapter):
    attn_key = "text_config"
    pixel_inputs: tuple[str, ...] = ("pixel_values",)

    @property
    def language_model(self):
        return self.base.language_model

    def image_token_ids(self) -> list[int]:
        cfg = self.model.config
        ids = [getattr(cfg, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")]
        return sorted({i for i in ids if i is not None})

    def check_inputs(self, input_ids, attention_mask, inputs) -> None:
        super().check_inputs(input_ids, attention_mask, inputs)
        ids = self.image_token_ids()
        real = input_ids[attention_mask.bool()]
        n_tokens = int(torch.isin(real, torch.tensor(ids, device=input_ids.device)).sum()) if ids else 0
        has_pixels = any(inputs.get(k) is not None for k in self.pixel_inputs)
        if n_tokens and not has_pixels:
            raise ValueError(f"the prompt holds {n_tokens} image tokens but no {' / '.join(self.pixel_inputs)} were given")
        if has_pixels and not n_tokens:
            raise ValueError(f"{' / '.join(k for k in self.pixel_inputs if inputs.get(k) is not None)} were given "
                             "but the prompt holds no image token")
