"""`vit_core.resample`: each named mode against the anchor implementation it follows.

bicubic / bilinear / bicubic_antialias against `torch.nn.functional.interpolate`,
bicubic_antialias also against timm's `resample_abs_pos_embed` (its checkpoint loader),
jax_zoom against `scipy.ndimage.zoom(order=1)` (the original JAX release). Up and down
sampling, square and non-square grids on both sides, in float64 (the matrices are the
anchor's arithmetic, to 1e-12) and in float32 (what the anchors run, <= 1e-5).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vit_core.errors import LayoutError
from vit_core.resample import (
    DEFAULT_INTERPOLATION,
    INTERPOLATIONS,
    grid_resize_matrices,
    resample_position_embeddings,
    resize_matrix,
)

DIM = 5
# (name, grid_in, grid_out): both directions, square and not, mixed up/down per axis.
GRIDS = [
    ("up-square", (4, 4), (7, 7)),
    ("down-square", (7, 7), (3, 3)),
    ("up-224to384", (14, 14), (24, 24)),
    ("down-384to224", (24, 24), (14, 14)),
    ("up-nonsquare", (3, 5), (6, 11)),
    ("down-nonsquare", (9, 6), (4, 5)),
    ("mixed-nonsquare", (2, 8), (4, 4)),  # same token count: timm PR #2737's case
    ("to-one", (5, 3), (1, 1)),
    ("from-one", (1, 3), (4, 2)),
]
TORCH_MODES = {
    "bicubic": {"mode": "bicubic"},
    "bicubic_antialias": {"mode": "bicubic", "antialias": True},
    "bilinear": {"mode": "bilinear"},
}


def table(grid: tuple[int, int], prefix: int = 1, dtype: Any = np.float32) -> np.ndarray:
    rng = np.random.default_rng(grid[0] * 100 + grid[1])
    return rng.standard_normal((1, prefix + grid[0] * grid[1], DIM)).astype(dtype)


def torch_resize(grid: np.ndarray, size: tuple[int, int], **mode: Any) -> np.ndarray:
    """(H, W, D) -> (H', W', D) with torch's interpolate in the grid's dtype."""
    import torch
    import torch.nn.functional as F

    nchw = torch.from_numpy(grid).permute(2, 0, 1)[None]
    out = F.interpolate(nchw, size=size, align_corners=False, **mode)
    return out[0].permute(1, 2, 0).numpy()


def ours(values: np.ndarray, grid_in: tuple[int, int], grid_out: tuple[int, int], mode: str):
    out = resample_position_embeddings(values, grid_in, grid_out, 1, mode)
    return out[0, 1:].reshape(*grid_out, DIM)


@pytest.mark.parametrize("mode", TORCH_MODES)
@pytest.mark.parametrize(("name", "grid_in", "grid_out"), GRIDS, ids=[g[0] for g in GRIDS])
def test_torch_modes_match_torch_interpolate(
    oracle: Any, mode: str, name: str, grid_in: tuple[int, int], grid_out: tuple[int, int]
) -> None:
    for dtype, atol in ((np.float64, 1e-12), (np.float32, oracle.TOL)):
        values = table(grid_in, dtype=dtype)
        want = torch_resize(values[0, 1:].reshape(*grid_in, DIM), grid_out, **TORCH_MODES[mode])
        got = ours(values, grid_in, grid_out, mode)
        oracle.assert_close(got, want, f"resample {mode} vs torch {dtype.__name__} {name}", atol)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize(("name", "grid_in", "grid_out"), GRIDS, ids=[g[0] for g in GRIDS])
def test_bicubic_antialias_matches_timm(
    oracle: Any, prefix: int, name: str, grid_in: tuple[int, int], grid_out: tuple[int, int]
) -> None:
    """timm resamples in float32 and keeps its `num_prefix_tokens` rows, as we do."""
    import torch
    from timm.layers import resample_abs_pos_embed

    values = table(grid_in, prefix)
    want = resample_abs_pos_embed(
        torch.from_numpy(values), list(grid_out), list(grid_in), num_prefix_tokens=prefix
    ).numpy()
    got = resample_position_embeddings(values, grid_in, grid_out, prefix, "bicubic_antialias")
    oracle.assert_close(got, want, f"resample bicubic_antialias vs timm {name}")


@pytest.mark.parametrize(("name", "grid_in", "grid_out"), GRIDS, ids=[g[0] for g in GRIDS])
def test_jax_zoom_matches_scipy_zoom_order_1(
    oracle: Any, name: str, grid_in: tuple[int, int], grid_out: tuple[int, int]
) -> None:
    """vit_jax's `interpolate_posembed`, generalised to non-square grids per axis."""
    from scipy import ndimage

    values = table(grid_in, dtype=np.float64)
    zoom = (grid_out[0] / grid_in[0], grid_out[1] / grid_in[1], 1)
    want = ndimage.zoom(values[0, 1:].reshape(*grid_in, DIM), zoom, order=1)
    assert want.shape[:2] == grid_out
    got = ours(values, grid_in, grid_out, "jax_zoom")
    oracle.assert_close(got, want, f"resample jax_zoom vs scipy {name}", 1e-12)


def test_jax_zoom_is_corner_aligned_not_half_pixel() -> None:
    """scipy's grid_mode=False maps corner to corner: [0, 1, 2] -> [0, .5, 1, 1.5, 2]."""
    signal = np.array([0.0, 1.0, 2.0])
    np.testing.assert_allclose(resize_matrix(3, 5, "jax_zoom") @ signal, [0, 0.5, 1, 1.5, 2])
    np.testing.assert_allclose(resize_matrix(3, 5, "bilinear") @ signal, [0, 0.4, 1, 1.6, 2])


def test_antialias_differs_from_plain_bicubic_even_when_upsampling() -> None:
    """torch's antialiased bicubic uses A=-0.5 (as PIL), the plain one A=-0.75."""
    plain, smooth = resize_matrix(4, 9, "bicubic"), resize_matrix(4, 9, "bicubic_antialias")
    assert np.abs(plain - smooth).max() > 1e-2


@pytest.mark.parametrize("mode", INTERPOLATIONS)
def test_same_grid_is_the_identity(mode: str) -> None:
    values = table((3, 5))
    out = resample_position_embeddings(values, (3, 5), (3, 5), 1, mode)
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("mode", INTERPOLATIONS)
def test_prefix_rows_kept_and_dtype_returned(mode: str) -> None:
    values = table((4, 4), prefix=2, dtype=np.float16)
    out = resample_position_embeddings(values, (4, 4), (6, 3), 2, mode)
    assert out.dtype == np.float16 and out.shape == (1, 2 + 18, DIM)
    np.testing.assert_array_equal(out[:, :2], values[:, :2])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(INTERPOLATIONS), st.integers(1, 30), st.integers(1, 30))
def test_rows_sum_to_one(mode: str, size_in: int, size_out: int) -> None:
    """Every mode keeps a constant grid constant (a partition of unity)."""
    matrix = resize_matrix(size_in, size_out, mode)
    assert matrix.shape == (size_out, size_in)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)


def test_matrices_are_cached_and_read_only() -> None:
    rows, cols = grid_resize_matrices((4, 6), (5, 9), "bilinear")
    assert rows is resize_matrix(4, 5, "bilinear") and cols is resize_matrix(6, 9, "bilinear")
    with pytest.raises(ValueError, match="read-only"):
        rows[0, 0] = 1.0
    assert DEFAULT_INTERPOLATION == "bicubic"


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="interpolation='nearest'; choose one of bicubic"):
        resize_matrix(3, 4, "nearest")
    with pytest.raises(LayoutError, match=r"do not fit a 4x4 grid with 1 prefix.*\(1, 17, D\)"):
        resample_position_embeddings(table((3, 5)), (4, 4), (2, 2), 1)
