"""LLaVA and LLaVA-NeXT: image features replace the placeholders; 1-D positions."""
from .base import register
from .vision import VisionAdapter


@register
class LlavaAdapter(VisionAdapter):
    classes = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
    inputs = frozenset({"pixel_values", "image_sizes"})


@register
class LlavaOnevisionAdapter(VisionAdapter):
    """LLaVA-OneVision: anyres images (tiles + newlines) and videos (pooled frames, one newline at the
    end of each video); every visual block is one frame for the drafters."""

    classes = ("LlavaOnevisionForConditionalGeneration",)
    inputs = frozenset({"pixel_values", "image_sizes", "pixel_values_videos", "image_sizes_videos", "batch_num_images"})
    pixel_inputs = ("pixel_values", "pixel_values_videos")
