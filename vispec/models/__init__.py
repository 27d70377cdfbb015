"""Target model families: one adapter per family, in a registry keyed by the model class.

    adapter = adapter_for(model)   # TypeError naming the supported classes otherwise

Where things go: a new family is one module here (an ``Adapter`` subclass under ``@register``),
imported below, plus a tiny config in ``tests/tiny_models.py``.
"""
from .base import Adapter, Prefill, adapter_for, register, supported_classes
from . import gemma3, idefics3, llava, qwen_vl, text  # noqa: F401  (each registers its adapter)

__all__ = ["Adapter", "Prefill", "adapter_for", "register", "supported_classes"]
