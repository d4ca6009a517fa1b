"""The package's own errors.

Every failure the package can foresee is raised as a subclass of `ViTError`, with a
message that names the file, key, field or shape at fault, what was expected, what
was found, and what to do next. They also subclass `ValueError`, so code written
against transformers' exceptions keeps working. The command lines print the message
as one `error: ...` line and exit with status 2 (see docs/errors.md).

    ViTError (ValueError)
    ├── ConfigError        a config field is missing, invalid or contradicts another
    ├── CheckpointError    a weight file cannot be read or is not a ViT checkpoint
    │   ├── LayoutError    readable weights whose keys, shapes or dtypes do not fit
    │   └── NotCachedError a Hugging Face repo id that the local cache does not hold
    ├── ImageError         an image or pixel array cannot become model input
    ├── InputError         a model called with input it cannot process
    └── WriteError (also OSError)  a model folder could not be written; nothing changed
        └── OutputExistsError      the output exists and replacing it was not asked for
"""

from __future__ import annotations


class ViTError(ValueError):
    """Base class of every error this package raises on purpose."""


class ConfigError(ViTError):
    """A configuration field is missing, invalid, or contradicts another field."""


class CheckpointError(ViTError):
    """A weight file cannot be read, or is not a ViT checkpoint this package understands."""


class LayoutError(CheckpointError):
    """Weights are readable but their keys, shapes or dtypes disagree with the canonical
    layout."""


class NotCachedError(CheckpointError):
    """A Hugging Face repo id (at the revision asked for) is not in the local cache, which
    is the only place this package looks: nothing is ever downloaded (`vit_core.hub`)."""


class ImageError(ViTError):
    """An image (or pixel array) cannot be turned into model input."""


class InputError(ViTError):
    """A model was called with input it cannot process (wrong size, channels, or rank)."""


class WriteError(ViTError, OSError):
    """A model folder could not be written (permissions, disk full, a failed rename).

    Writes are staged, so the target is left as it was. It is also an `OSError`, so code
    that catches file-system errors keeps catching it.
    """


class OutputExistsError(WriteError):
    """The output exists and replacing it was not asked for (`--force`)."""
