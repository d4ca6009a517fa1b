"""`forward_intermediates` of both twins, the framework-neutral part: timm's contract.

timm's `VisionTransformer.forward_intermediates` (timm 1.0) is what feature extractors
are written against, so both twins take its arguments and return its structure; this
module holds what does not depend on the framework, once: which blocks `indices` asks
for, which output formats exist, and how the chosen blocks' tokens are laid out (prefix
tokens split off, patch tokens as a map, timm's `zip` of the two). Each twin runs the
blocks and hands its own NLC -> NCHW reshape in (docs/architecture.md, "Intermediate
layers", has the user's side).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any

import numpy as np

from vit_core.errors import InputError

OUTPUT_FORMATS = ("NCHW", "NLC")
# `indices=`: None (every block), an int n (the last n) or block indices (negative from the end)
Indices = int | Sequence[int] | None


def take_indices(num_layers: int, indices: Indices) -> tuple[tuple[int, ...], int]:
    """timm's `feature_take_indices`: the absolute indices of the blocks asked for, in
    block order (the order the intermediates come in, as timm's), and the largest.

    `None` is every block, an int n the last n, a sequence of block indices (negative ones
    count from the end). Unlike timm, a block named twice is refused rather than returned
    once, so the list that comes back always has one entry per index given.
    """
    if indices is None:
        indices = num_layers
    if isinstance(indices, Integral) and not isinstance(indices, bool):
        count = int(indices)
        if not 0 < count <= num_layers:
            raise InputError(
                f"indices={count} asks for the last {count} blocks; the model has "
                f"{num_layers}, so give 1 to {num_layers} (or a list of block indices)"
            )
        return tuple(range(num_layers - count, num_layers)), num_layers - 1
    if isinstance(indices, str | bytes) or not isinstance(indices, Sequence):
        raise InputError(
            f"indices={indices!r}: give None (every block), an int n (the last n blocks) "
            "or a list of block indices"
        )
    if not indices:
        raise InputError("indices=[] asks for no block; give at least one block index")
    absolute: list[int] = []
    for index in indices:
        if not isinstance(index, Integral) or isinstance(index, bool):
            raise InputError(f"indices={list(indices)!r}: {index!r} is not a block index")
        block = int(index) + num_layers if index < 0 else int(index)
        if not 0 <= block < num_layers:
            raise InputError(
                f"block index {int(index)} in indices={list(indices)!r} is out of range: the "
                f"model has {num_layers} blocks, 0 to {num_layers - 1} (or -{num_layers} to -1)"
            )
        absolute.append(block)
    if len(set(absolute)) != len(absolute):
        raise InputError(
            f"indices={list(indices)!r} names a block more than once (as absolute indices "
            f"{absolute}); name each block once"
        )
    taken = tuple(sorted(absolute))
    return taken, taken[-1]


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt not in OUTPUT_FORMATS:
        raise InputError(
            f"output_fmt={output_fmt!r}: choose 'NCHW' (patch tokens as a (B, D, H/P, W/P) "
            "map) or 'NLC' (tokens as (B, L, D))"
        )


def patch_grid(patch_hw: tuple[int, int], pixel_shape: Sequence[int]) -> tuple[int, int]:
    """Patches per column and per row of pixels (B, C, H, W): the NCHW map's H and W."""
    (ph, pw), (height, width) = patch_hw, pixel_shape[-2:]
    return height // ph, width // pw


def arrange(
    states: Sequence[Any],
    num_prefix_tokens: int,
    to_map: Callable[[Any], Any] | None,
    return_prefix_tokens: bool,
) -> list[Any]:
    """The chosen blocks' tokens (B, T, D) as timm returns them, in timm's order of work:
    the prefix tokens (class, distillation, registers) split off when the model has any,
    the patch tokens mapped to NCHW by `to_map` (None: left NLC), then each paired with
    its prefix tokens as `(patches, prefix)` if asked. As in timm, a model without prefix
    tokens gives plain entries even with `return_prefix_tokens`.
    """
    n = num_prefix_tokens
    prefix = [y[:, :n] for y in states] if n else None
    patches = [y[:, n:] for y in states] if n else list(states)
    if to_map is not None:
        patches = [to_map(y) for y in patches]
    if return_prefix_tokens and prefix is not None:
        return list(zip(patches, prefix, strict=True))
    return patches


def check_has_blocks_to_read(model: Any) -> None:
    """Refuse a masked-image-modeling model in the backends' `intermediates`: its blocks
    are its encoder's, read from the encoder model (as timm's and transformers' pretraining
    heads offer no `forward_intermediates` either)."""
    kind = getattr(model, "kind", None)
    if kind is not None and kind.decoder:
        raise InputError(
            f"{type(model).__name__}: intermediate layers are read from the encoder; load "
            "this masked-image-modeling folder with model_type='base' for them"
        )


# How the backends' `intermediates` call `forward_intermediates`: every token of each block
# asked for (`all_tokens` joins them again), and no block after the last one.
BACKEND_OPTIONS: dict[str, Any] = {
    "return_prefix_tokens": True,
    "stop_early": True,
    "output_fmt": "NLC",
    "intermediates_only": True,
}


def all_tokens(entry: Any, to_numpy: Callable[[Any], np.ndarray]) -> np.ndarray:
    """An NLC entry of `forward_intermediates(return_prefix_tokens=True)` as the block's
    every token again, prefix tokens first (the backends' `intermediates`)."""
    if isinstance(entry, tuple):
        patches, prefix = entry
        return np.concatenate([to_numpy(prefix), to_numpy(patches)], axis=1)
    return to_numpy(entry)
