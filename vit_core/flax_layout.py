"""The one Flax <-> PyTorch leaf table, in numpy (no framework is imported here).

Flax names and orients a module's parameters differently from PyTorch; the leaf name and
rank alone decide the translation:

    Flax                          PyTorch
    *.kernel (H, W, I, O)    <->  *.weight (O, I, H, W)   a convolution (the patch embedding)
    *.kernel (in, out)       <->  *.weight (out, in)      every Dense / Linear
    *.scale (D)              <->  *.weight (D)            every LayerNorm
    anything else (bias, cls_token, position_embeddings)  unchanged
    layers_N                 <->  layers.N                linen's name for a list member

`vit_flax.weights` (the twin's params) and `conversion.sources.hf` (transformers' Flax
msgpack) both translate through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vit_core.errors import LayoutError

# (Flax leaf, rank) -> the np.transpose axes that make it PyTorch's `weight` (None: as is).
TO_TORCH: dict[tuple[str, int], tuple[int, ...] | None] = {
    ("kernel", 4): (3, 2, 0, 1),  # convolution: HWIO -> OIHW
    ("kernel", 2): (1, 0),  # Dense: (in, out) -> (out, in)
    ("scale", 1): None,  # LayerNorm
}
# PyTorch `weight` by rank -> (Flax leaf, axes): the same table, inverted.
TO_FLAX: dict[int, tuple[str, tuple[int, ...] | None]] = {
    rank: (leaf, None if axes is None else tuple(int(a) for a in np.argsort(axes)))
    for (leaf, rank), axes in TO_TORCH.items()
}
WEIGHT_LEAVES = frozenset(TO_TORCH)  # (Flax leaf, rank)
_WEIGHT_NAMES = frozenset(leaf for leaf, _ in TO_TORCH)


def _transposed(value: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    return value if axes is None else np.transpose(value, axes)


def _to_torch_axes(path: Sequence[str], value: np.ndarray) -> tuple[int, ...] | None:
    if (path[-1], value.ndim) not in TO_TORCH:
        ranks = " or ".join(str(rank) for leaf, rank in TO_TORCH if leaf == path[-1])
        raise LayoutError(
            f"Flax leaf {'/'.join(path)} has rank {value.ndim}; a {path[-1]} has rank {ranks}"
        )
    return TO_TORCH[path[-1], value.ndim]


def kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """A Flax kernel (convolution HWIO or Dense (in, out)) in PyTorch's orientation."""
    return _transposed(kernel, _to_torch_axes(("kernel",), kernel))


def to_torch(path: Sequence[str], value: np.ndarray) -> tuple[str, np.ndarray]:
    """A Flax leaf (path, array) -> (PyTorch name, array in PyTorch's orientation)."""
    path = [str(part) for part in path]
    names: list[str] = []
    for part in path[:-1]:
        member = part.startswith("layers_")
        names += ["layers", part[len("layers_") :]] if member else [part]
    if path[-1] not in _WEIGHT_NAMES:
        return ".".join([*names, path[-1]]), value
    return ".".join([*names, "weight"]), _transposed(value, _to_torch_axes(path, value))


def to_flax(name: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """A PyTorch name and array -> (Flax path, array in Flax's orientation)."""
    *parents, leaf = name.split(".")
    path: list[str] = []
    parts = iter(parents)
    for part in parts:
        path.append(f"layers_{next(parts)}" if part == "layers" else part)
    if leaf != "weight":
        return (*path, leaf), value
    if value.ndim not in TO_FLAX:
        ranks = ", ".join(map(str, TO_FLAX))
        raise LayoutError(f"{name} has rank {value.ndim}; a Flax weight has rank {ranks}")
    leaf, axes = TO_FLAX[value.ndim]
    return (*path, leaf), _transposed(value, axes)
