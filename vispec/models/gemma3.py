"""Gemma-3 with images: its language model's local layers use a sliding window (passed to tree attention
per layer), and image tokens attend to each other bidirectionally in the prefill (transformers builds
that mask from ``token_type_ids``; tree forwards hold text only, causal)."""
from .base import register
from .vision import VisionAdapter


@register
class Gemma3Adapter(VisionAdapter):
    classes = ("Gemma3ForConditionalGeneration",)
    inputs = frozenset({"pixel_values", "token_type_ids"})
    token_inputs = frozenset({"token_type_ids"})
