"""Framework-neutral core of the twin ViT package: config, image processor, the canonical
weight layout, position-embedding resampling, and `load`.

Importing it imports neither PyTorch nor JAX; a backend's framework is imported only
when `load(..., backend=...)` asks for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vit_core.config import ViTConfig
from vit_core.errors import (
    CheckpointError,
    ConfigError,
    ImageError,
    InputError,
    LayoutError,
    NotCachedError,
    ViTError,
)
from vit_core.loading import load
from vit_core.names import list_models

__version__ = "0.1.0"

if TYPE_CHECKING:
    from vit_core.processing import ViTFeatureExtractor, ViTImageProcessor


def __getattr__(name: str) -> Any:
    # The processor imports PIL; load it on first use so `import vit_core` stays light.
    if name in ("ViTImageProcessor", "ViTFeatureExtractor"):
        from vit_core import processing

        return getattr(processing, name)
    raise AttributeError(f"module 'vit_core' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "ImageError",
    "InputError",
    "LayoutError",
    "NotCachedError",
    "ViTConfig",
    "ViTError",
    "ViTFeatureExtractor",
    "ViTImageProcessor",
    "list_models",
    "load",
]
