"""The package's own errors.

Every failure the package can foresee is raised as a subclass of `ViTError`, with a
message that names the file, key, field or shape at fault, what was expected, what
was found, and what to do next. They also subclass `ValueError`, so code written
against transformers' exceptions keeps working.
"""

from __future__ import annotations


class ViTError(ValueError):
    """Base class of every error this package raises on purpose."""


class ConfigError(ViTError):
    """A configuration field is missing, invalid, or contradicts another field."""


class CheckpointError(ViTError):
    """A weight file cannot be read, or is not a ViT checkpoint this package understands."""


class LayoutError(CheckpointError):
    """Weights are readable but their keys or shapes disagree with the canonical layout."""


class ImageError(ViTError):
    """An image (or pixel array) cannot be turned into model input."""


class InputError(ViTError):
    """A model was called with input it cannot process (wrong size, channels, or rank)."""
