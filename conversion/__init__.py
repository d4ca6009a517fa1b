"""Checkpoint conversion: timm, original-JAX/big_vision and Hugging Face ViT checkpoints
-> the canonical folder (model.safetensors + config.json + preprocessor_config.json).

`convert(src, out, ...)` from Python, `python -m conversion SRC -o OUT` from a shell.
"""

from __future__ import annotations

from conversion.convert import ConversionResult, convert
from vit_core import __version__

__all__ = ["ConversionResult", "__version__", "convert"]
