"""What every source reader hands to the writer, and the rule table they are written in.

A reader turns one source checkpoint (timm, original JAX / big_vision `.npz`, Hugging
Face) into canonical tensors (numpy, Hugging Face ViT key names, PyTorch orientation,
`vit.` prefix when there is a classifier) plus the config fields the source determines.
Everything after that (overrides, resampling, dtype, checks, atomic write) is shared.

A reader's key mapping is a table of `Rule`s: source key -> canonical key, and the
function that turns the array; one small function per kind of transform.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

QKV = ("query", "key", "value")


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
    """Each `conversion/sources/<kind>.py` module offers these."""

    # `--image-size` resampling mode when none is given: the source library's own.
    DEFAULT_INTERPOLATION: str

    def detect(self, path: Path) -> bool:
        """Whether `path` holds this kind of checkpoint, judged from the file itself."""
        ...

    def read(self, path: Path, hints: dict[str, Any]) -> SourceWeights:
        """Read `path`; `hints` are config fields the user gave (preset, --config, --set)
        for what the weights cannot tell (they never override what the weights say)."""
        ...

    def weight_files(self, path: Path) -> list[Path]:
        """The files whose bytes the conversion depends on (hashed into the metadata)."""
        ...


# ------------------------------------------------------------------ rule tables
@dataclass
class Architecture:
    """What the weights say about the model, as far as the transforms need it."""

    width: int
    use_class_token: bool
    table_has_class_slot: bool  # the position table's first row is the class token's


Transform = Callable[[np.ndarray, Architecture], np.ndarray]


@dataclass(frozen=True)
class Rule:
    """One row of a source's key table: source key -> canonical key, and the transform.

    Patterns name their variable parts in braces: `{i}` a layer index, `{qkv}` one of
    query, key, value. A `{qkv}` in the target alone (timm's fused projection) means the
    transform returns the three parts stacked on a new leading axis, in that order.
    `shape`, where given, is the source array's shape, sizes by `Architecture` attribute
    name ("width") or as numbers; the reader checks it before the transform runs.
    """

    source: str
    target: str
    transform: Transform
    shape: tuple[str | int, ...] | None = None

    def apply(self, value: np.ndarray, arch: Architecture, **parts: Any) -> dict[str, np.ndarray]:
        """The canonical tensor(s) of one source array; `parts` fill the target's braces."""
        array = self.transform(value, arch)
        if "{qkv}" in self.target and "{qkv}" not in self.source:
            return {self.target.format(**parts, qkv=n): a for n, a in zip(QKV, array, strict=True)}
        return {self.target.format(**parts): array}


def copy(value: np.ndarray, arch: Architecture) -> np.ndarray:
    """The array as it is."""
    return value


def position_table(value: np.ndarray, arch: Architecture) -> np.ndarray:
    """A (1, tokens, D) position table with the class token's row first. Where the source
    adds positions before prepending the class token (timm `no_embed_class`, big_vision),
    the class token gets no position: a zero row is exact."""
    if arch.table_has_class_slot or not arch.use_class_token:
        return value
    zero = np.zeros((1, 1, value.shape[-1]), dtype=value.dtype)
    return np.concatenate([zero, value], axis=1)
