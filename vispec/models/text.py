"""Decoder-only text LMs: the base adapter as it is."""
from .base import Adapter, register


@register
class TextAdapter(Adapter):
    classes = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
