"""What every source reader hands to the writer.

A reader turns one source checkpoint (timm, original JAX / big_vision `.npz`, Hugging
Face) into canonical tensors (numpy, Hugging Face ViT key names, PyTorch orientation,
`vit.` prefix when there is a classifier) plus the config fields the source determines.
Everything after that (overrides, resampling, dtype, checks, atomic write) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass
class SourceWeights:
    """One source checkpoint, in canonical form.

    `config` holds `ViTConfig` fields read from the weights (sizes) or implied by the
    source (numerics: layer_norm_eps, hidden_act, pooling); `assumed` says, in words a
    user can act on, every field that was neither (e.g. head count of a timm file).
    `processor` holds `ViTImageProcessor` fields right for the source (mean/std, size);
    `fixed` names fields the weights determine that other sources leave open.
    """

    tensors: dict[str, np.ndarray]
    config: dict[str, Any]
    source_format: str
    assumed: list[str] = field(default_factory=list)
    processor: dict[str, Any] = field(default_factory=dict)
    # Config fields this source's weights fix beyond the sizes every source fixes (e.g. the
    # head count, from JAX attention kernels (D, heads, head_dim)): a hint may not change them.
    fixed: frozenset[str] = frozenset()


class SourceReader(Protocol):
    """Each `conversion/sources/<kind>.py` module offers these two functions."""

    def detect(self, path: Path) -> bool:
        """Whether `path` holds this kind of checkpoint, judged from the file itself."""
        ...

    def read(self, path: Path, hints: dict[str, Any]) -> SourceWeights:
        """Read `path`; `hints` are config fields the user gave (preset, --config, --set)
        for what the weights cannot tell (they never override what the weights say)."""
        ...
