"""vispec: vision-aware speculative decoding for Hugging Face VLMs, lossless, C++/CUDA accelerated."""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
