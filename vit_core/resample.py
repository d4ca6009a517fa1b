"""Position-embedding resampling as interpolation matrices, computed once in numpy.

A resize of the position grid is linear and separable, so for static shapes it is two
small matrices: new_grid = Wh @ grid @ Ww^T (per channel). Both twins apply the same
matrices at run time, so PyTorch and Flax agree to float rounding, and the Flax model
can interpolate under `jax.jit` (transformers' Flax ViT cannot: JAX's cubic kernel is
not PyTorch's).

`bicubic` reproduces `torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)` without antialias: Keys' cubic with A = -0.75, half-pixel
centres, edge-clamped taps. That is what transformers' `interpolate_pos_encoding` does.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

INTERPOLATIONS = ("bicubic",)
_CUBIC_A = -0.75  # PyTorch's choice; JAX and PIL use -0.5


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    """Weights of the taps at offsets -1, 0, 1, 2 for a fractional position t in [0, 1)."""
    a = _CUBIC_A

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@lru_cache(maxsize=64)
def resize_matrix(size_in: int, size_out: int, interpolation: str = "bicubic") -> np.ndarray:
    """(size_out, size_in) float64 matrix that resizes a 1-D signal like PyTorch does."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; choose one of {INTERPOLATIONS}")
    matrix = np.zeros((size_out, size_in))
    scale = size_in / size_out
    for i in range(size_out):
        source = (i + 0.5) * scale - 0.5
        base = int(np.floor(source))
        for offset, weight in zip(range(-1, 3), _cubic_weights(source - base), strict=True):
            matrix[i, min(max(base + offset, 0), size_in - 1)] += weight
    matrix.setflags(write=False)
    return matrix


def grid_resize_matrices(
    grid_in: tuple[int, int], grid_out: tuple[int, int], interpolation: str = "bicubic"
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) matrices for `einsum("ah,bw,hwd->abd", rows, cols, grid)`."""
    return (
        resize_matrix(grid_in[0], grid_out[0], interpolation),
        resize_matrix(grid_in[1], grid_out[1], interpolation),
    )
