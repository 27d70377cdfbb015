"""vispec: vision-aware speculative decoding for Hugging Face VLMs, lossless, C++/CUDA accelerated."""
from . import ops
from .drafters import DraftTree, Drafter, EagleDrafter, HiViSDrafter, PrefillInputs, TreeConfig, ViSpecDrafter, load_drafter
from .accelerate import Accelerated, accelerate
from .engine import GenerateOutput, GenerationStats, generate

__version__ = "0.1.0"
__all__ = [
    "ops",
    "generate",
    "accelerate",
    "Accelerated",
    "GenerateOutput",
    "GenerationStats",
    "Drafter",
    "DraftTree",
    "EagleDrafter",
    "ViSpecDrafter",
    "HiViSDrafter",
    "load_drafter",
    "PrefillInputs",
    "TreeConfig",
    "__version__",
]
