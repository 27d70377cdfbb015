"""Idefics3 and SmolVLM: the language model is ``model.model.text_model``; images arrive as
(batch, images, 3, H, W) tiles with a pixel mask and become pixel-shuffled token blocks."""
from .base import register
from .vision import VisionAdapter


@register
class Idefics3Adapter(VisionAdapter):
    classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    inputs = frozenset({"pixel_values", "pixel_attention_mask"})

    @property
    def language_model(self):
        return self.base.text_model
