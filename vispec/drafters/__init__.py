"""Drafters: the interface the engine drives, and the shipped implementations."""
from pathlib import Path

from .base import DraftTree, Drafter, PrefillInputs, TreeConfig
from .eagle import CONFIG_NAME, DrafterConfig, EagleDrafter
from .hivis import HiViSDrafter
from .oracle import OracleDrafter
from .vispec_drafter import ViSpecDrafter

DRAFTERS = {cls.drafter_type(): cls for cls in (EagleDrafter, ViSpecDrafter, HiViSDrafter)}


def load_drafter(path, model):
    """Loads any drafter saved with ``save_pretrained`` (its config.json names the type) for ``model``."""
    import json

    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} not found: not a vispec drafter directory")
    kind = json.loads(cfg.read_text()).get("drafter_type")
    if kind is None:
        raise ValueError(f"{path} is not a vispec drafter directory ({cfg} names no drafter_type); official EAGLE / "
                         "ViSpec releases load with EagleDrafter.from_official / ViSpecDrafter.from_official")
    if kind not in DRAFTERS:
        raise ValueError(f"{path}: unknown drafter type {kind!r}; known: {', '.join(DRAFTERS)}")
    return DRAFTERS[kind].from_pretrained(path, model)


__all__ = [
    "Drafter", "DraftTree", "DrafterConfig", "EagleDrafter", "HiViSDrafter", "OracleDrafter", "PrefillInputs",
    "TreeConfig", "ViSpecDrafter", "load_drafter", "DRAFTERS",
]
