"""Drafters: the interface the engine drives, and the shipped implementations."""
from .base import DraftTree, Drafter, PrefillInputs, TreeConfig
from .eagle import DrafterConfig, EagleDrafter
from .oracle import OracleDrafter

__all__ = ["Drafter", "DraftTree", "DrafterConfig", "EagleDrafter", "OracleDrafter", "PrefillInputs", "TreeConfig"]
