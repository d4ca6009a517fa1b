"""Position-embedding resampling as interpolation matrices, computed once in numpy.

A resize of the position grid is linear and separable, so for static shapes it is two
small matrices: new_grid = Wh @ grid @ Ww^T (per channel). Both twins apply the same
matrices at run time, so PyTorch and Flax agree to float rounding, and the Flax model
can interpolate under `jax.jit` (transformers' Flax ViT cannot: JAX's cubic kernel is
not PyTorch's). Load-time resizing (`vit_core.load(..., image_size=...)`) and checkpoint
conversion apply the same matrices through `resample_position_embeddings`.

The anchors disagree on how to resize, so each mode reproduces one of them exactly
(to float rounding, tested in tests/vit_core/test_resample.py):

- `bicubic` (the default, `DEFAULT_INTERPOLATION`): transformers' `interpolate_pos_encoding`,
  i.e. `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` without
  antialias: Keys' cubic with A = -0.75, half-pixel centres, edge-clamped taps. It is the
  default because it is what the run-time `interpolate_pos_encoding=True` of both twins
  does, and what a transformers user gets.
- `bicubic_antialias`: timm's `resample_abs_pos_embed` default (its checkpoint loader),
  i.e. `F.interpolate(mode="bicubic", antialias=True)`: PIL-style resampling with
  A = -0.5, the kernel stretched by the scale when downsampling, taps outside the grid
  dropped and the weights renormalised. Not equal to `bicubic` even when upsampling
  (other A, other edge handling).
- `bilinear`: timm's `.npz` loader (and FlexiViT), `F.interpolate(mode="bilinear",
  align_corners=False)` without antialias: half-pixel centres, source clamped at 0.
- `jax_zoom`: the original JAX release (`vit_jax.checkpoint.interpolate_posembed`),
  `scipy.ndimage.zoom(grid, (gh_out / gh_in, gw_out / gw_in, 1), order=1)`: linear,
  *corner-aligned* (scipy's default grid_mode=False maps corner to corner).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from vit_core.errors import ConfigError, LayoutError

INTERPOLATIONS = ("bicubic", "bicubic_antialias", "bilinear", "jax_zoom")
DEFAULT_INTERPOLATION = "bicubic"
_CUBIC_A = -0.75  # PyTorch's plain bicubic
_CUBIC_A_ANTIALIAS = -0.5  # PyTorch's antialiased bicubic (as PIL); JAX's "cubic" too


def _cubic(x: float, a: float) -> float:
    """Keys' cubic convolution kernel at distance x (zero beyond 2)."""
    x = abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _bicubic_row(i: int, size_in: int, size_out: int) -> dict[int, float]:
    """Output i of torch's plain bicubic: 4 taps around the half-pixel source, clamped."""
    source = (i + 0.5) * size_in / size_out - 0.5
    base = int(np.floor(source))
    t = source - base
    row: dict[int, float] = {}
    for offset in range(-1, 3):
        index = min(max(base + offset, 0), size_in - 1)
        row[index] = row.get(index, 0.0) + _cubic(t - offset, _CUBIC_A)
    return row


def _bicubic_antialias_row(i: int, size_in: int, size_out: int) -> dict[int, float]:
    """Output i of torch's antialiased bicubic (aten `_compute_indices_weights_aa`).

    The kernel's support grows with the downsampling factor so that every input pixel
    contributes; taps that fall outside the grid are dropped and the rest renormalised.
    """
    scale = size_in / size_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (i + 0.5)
    # torch truncates toward zero here (a C cast), then clamps to the grid
    start = max(int(center - support + 0.5), 0)
    stop = min(int(center + support + 0.5), size_in)
    weights = {
        j: _cubic((j - center + 0.5) * invscale, _CUBIC_A_ANTIALIAS) for j in range(start, stop)
    }
    total = sum(weights.values())
    return {j: w / total for j, w in weights.items()} if total else weights


def _bilinear_row(i: int, size_in: int, size_out: int) -> dict[int, float]:
    """Output i of torch's bilinear, align_corners=False: half-pixel source clamped at 0."""
    source = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
    low = min(int(source), size_in - 1)
    high = min(low + 1, size_in - 1)
    t = source - low
    return {low: 1.0} if high == low else {low: 1.0 - t, high: t}


def _jax_zoom_row(i: int, size_in: int, size_out: int) -> dict[int, float]:
    """Output i of `scipy.ndimage.zoom(order=1)`: corner-aligned linear interpolation.

    scipy maps output i to input i * (size_in - 1) / (size_out - 1), and uses a factor
    of 1 when size_out == 1 (so the first entry is kept).
    """
    step = (size_in - 1) / (size_out - 1) if size_out > 1 else 1.0
    source = min(i * step, size_in - 1)
    low = min(int(np.floor(source)), size_in - 1)
    t = source - low
    if t == 0.0 or low + 1 >= size_in:
        return {low: 1.0}
    return {low: 1.0 - t, low + 1: t}


_ROWS: dict[str, Callable[[int, int, int], dict[int, float]]] = {
    "bicubic": _bicubic_row,
    "bicubic_antialias": _bicubic_antialias_row,
    "bilinear": _bilinear_row,
    "jax_zoom": _jax_zoom_row,
}


def check_interpolation(interpolation: str) -> str:
    """The mode itself, or a `ConfigError` listing the modes (callers validate early with it)."""
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"interpolation={interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}"
        )
    return interpolation


def interpolation_mode(interpolate_pos_encoding: bool | str) -> str:
    """The mode a model's `interpolate_pos_encoding` asks for: True is the default mode
    (transformers' bicubic), a string names one of INTERPOLATIONS."""
    if interpolate_pos_encoding is True:
        return DEFAULT_INTERPOLATION
    return check_interpolation(str(interpolate_pos_encoding))


@lru_cache(maxsize=128)
def resize_matrix(
    size_in: int, size_out: int, interpolation: str = DEFAULT_INTERPOLATION
) -> np.ndarray:
    """(size_out, size_in) float64 matrix that resizes a 1-D signal as the mode's anchor does.

    Cached per (size_in, size_out, mode) and read-only, because every forward pass with
    `interpolate_pos_encoding=True` asks for it again.
    """
    row_of = _ROWS[check_interpolation(interpolation)]
    if size_in <= 0 or size_out <= 0:
        raise ValueError(f"cannot resize {size_in} positions to {size_out}; both must be > 0")
    matrix = np.zeros((size_out, size_in))
    if size_in == size_out:  # every mode is the identity here; skip the float noise
        np.fill_diagonal(matrix, 1.0)
    else:
        for i in range(size_out):
            for j, weight in row_of(i, size_in, size_out).items():
                matrix[i, j] += weight
    matrix.setflags(write=False)
    return matrix


def grid_resize_matrices(
    grid_in: tuple[int, int],
    grid_out: tuple[int, int],
    interpolation: str = DEFAULT_INTERPOLATION,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) matrices for `einsum("ah,bw,hwd->abd", rows, cols, grid)`."""
    return (
        resize_matrix(int(grid_in[0]), int(grid_out[0]), interpolation),
        resize_matrix(int(grid_in[1]), int(grid_out[1]), interpolation),
    )


def resample_position_embeddings(
    table: np.ndarray,
    grid_in: tuple[int, int],
    grid_out: tuple[int, int],
    num_prefix_tokens: int,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> np.ndarray:
    """A (1, T, D) position table for a (H, W) grid of patches resampled to `grid_out`.

    The first `num_prefix_tokens` rows (class token) are kept as they are: they have no
    place in the grid, and every anchor leaves them alone. The grid rows are row-major
    (H, W), any shape, square or not. Computed in float64, returned in the input dtype.
    """
    check_interpolation(interpolation)
    table = np.asarray(table)
    (h_in, w_in), (h_out, w_out) = grid_in, grid_out
    expected = num_prefix_tokens + h_in * w_in
    if table.ndim != 3 or table.shape[0] != 1 or table.shape[1] != expected:
        raise LayoutError(
            f"position embeddings of shape {table.shape} do not fit a {h_in}x{w_in} grid with "
            f"{num_prefix_tokens} prefix token(s); expected (1, {expected}, D)"
        )
    rows, cols = grid_resize_matrices(grid_in, grid_out, interpolation)
    grid = table[0, num_prefix_tokens:].astype(np.float64).reshape(h_in, w_in, -1)
    resized = np.einsum("ah,bw,hwd->abd", rows, cols, grid).reshape(1, h_out * w_out, -1)
    prefix = table[:, :num_prefix_tokens].astype(np.float64)
    return np.concatenate([prefix, resized], axis=1).astype(table.dtype)
