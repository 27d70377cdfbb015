"""Decoder-only text LMs: the base adapter as it is."""
from .base import Adapter, register


@register
class TextAdapter(Adapter):
    classes = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


@register
class Gemma3TextAdapter(Adapter):
    """Gemma-3 text models: local (sliding-window) layers interleaved with global ones (each layer passes its
    window to the attention function), embeddings scaled inside the embedding module."""

    classes = ("Gemma3ForCausalLM",)
