"""Attention maps of a ViT, computed in numpy from either twin's `attentions`.

Both twins return, with `output_attentions=True`, one (B, heads, T, T) array per layer;
everything here takes those arrays as numpy, so the PyTorch and the Flax model go
through the very same arithmetic and their maps can only differ by what their
attentions differ by.

Two maps are drawn:

- **Attention rollout** (Abnar & Zuidema 2020, "Quantifying Attention Flow in
  Transformers"): per layer the heads are averaged, the identity is added for the
  residual connection and the rows are renormalised; the layers are then multiplied
  through, so that row i of the product says how much each input token flowed into
  token i at the output.
- **The last layer's attention per head**: what the pooled token attends to just before
  the classifier reads it, one map per head.

Which *rows* to show follows the pooling the classifier uses (`config.pooling_type`):
for "cls" it is the class token's row; for "mean" (including models without a class
token) it is the mean of the patch tokens' rows, because the pooled vector *is* the
mean of the patch tokens and a rollout row is linear in what it summarises; a MAP head
("map", SigLIP) shows the mean too. The columns are always the patch tokens (the prefix
tokens, registers included, dropped), reshaped to the patch grid.

Only numpy is needed, plus PIL to upsample; matplotlib is imported by `plot_explanation`
alone, so computing maps never needs a plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

POOLINGS = ("cls", "mean", "map")
PANEL_PX = 320  # pixel width and height of one panel of the figure
PANEL_COLUMNS = 3  # image | rollout | last layer (mean of heads); head grid rows below
DPI = 100
ALPHA = 0.6  # opacity of a heat map over the image
COLORMAP = "inferno"
TITLE_PX, SUPTITLE_PX = 22, 26  # space kept above the panels for the titles
MAX_DISPLAY_SIDE = 1024  # larger photos are shrunk for drawing only; maps are unaffected


# ------------------------------------------------------------------- numerics
def _checked_stack(attentions: Sequence[Any]) -> np.ndarray:
    """(L, B, heads, T, T) float64 from per-layer arrays, or a ValueError saying what is off."""
    if len(attentions) == 0:
        raise ValueError("attention rollout needs at least one layer of attentions")
    layers = [np.asarray(a, dtype=np.float64) for a in attentions]
    shapes = {a.shape for a in layers}
    if len(shapes) != 1:
        raise ValueError(f"attentions of all layers must have one shape; got {sorted(shapes)}")
    shape = layers[0].shape
    if len(shape) != 4 or shape[2] != shape[3]:
        raise ValueError(f"each layer's attentions must be (B, heads, T, T); got {shape}")
    return np.stack(layers)


def _discard_lowest(fused: np.ndarray, num_prefix_tokens: int, ratio: float) -> np.ndarray:
    """Zero the `ratio` weakest links to patch tokens in each row (noise removal).

    Done per row so every query keeps its strongest links; prefix columns (the class
    token) are never discarded, as in Gildenblat's widely used implementation.
    """
    patches = fused[..., num_prefix_tokens:]
    count = int(ratio * patches.shape[-1])
    if count == 0:
        return fused
    weakest = np.argsort(patches, axis=-1, kind="stable")[..., :count]
    kept = patches.copy()
    np.put_along_axis(kept, weakest, 0.0, axis=-1)
    return np.concatenate([fused[..., :num_prefix_tokens], kept], axis=-1)


def attention_rollout(
    attentions: Sequence[Any], num_prefix_tokens: int = 1, discard_ratio: float = 0.0
) -> np.ndarray:
    """The rollout matrix (B, T, T) in float64: row i = where output token i's content came from.

    Per layer: mean over heads, optional discarding of the weakest links
    (`discard_ratio` in [0, 1), 0 = the paper's rollout), plus the identity for the
    residual stream, rows renormalised to sum to 1; then the layers multiplied
    through, the last layer on the left (R = A_L ... A_2 A_1).
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must lie in [0, 1); got {discard_ratio}")
    stacked = _checked_stack(attentions)
    tokens = stacked.shape[-1]
    rollout = np.tile(np.eye(tokens), (stacked.shape[1], 1, 1))  # one identity per image
    for layer in stacked:
        fused = _discard_lowest(layer.mean(axis=1), num_prefix_tokens, discard_ratio)
        fused = fused + np.eye(tokens)
        fused /= fused.sum(axis=-1, keepdims=True)
        rollout = fused @ rollout
    return rollout


def pooled_rows(matrix: np.ndarray, num_prefix_tokens: int, pooling: str) -> np.ndarray:
    """The row(s) of a (..., T, T) matrix that the classifier reads, over the patch columns.

    "cls": row 0 (the class token); "mean" and "map": the mean of the patch tokens' rows
    (a MAP head's probe reads every token; its own attention is not part of the rollout).
    Returns (..., P) with P the number of patch tokens.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    if pooling == "cls":
        if num_prefix_tokens < 1:
            raise ValueError("pooling 'cls' needs a class token (num_prefix_tokens >= 1)")
        rows = matrix[..., 0, :]
    else:
        rows = matrix[..., num_prefix_tokens:, :].mean(axis=-2)
    return rows[..., num_prefix_tokens:]


def to_grid(rows: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """(..., P) patch values to (..., gh, gw), patches being in row-major order."""
    height, width = grid_hw
    if rows.shape[-1] != height * width:
        raise ValueError(
            f"{rows.shape[-1]} patch tokens do not fill a {height}x{width} grid; "
            "was the image run at the model's image_size?"
        )
    return rows.reshape(*rows.shape[:-1], height, width)


def rollout_maps(
    attentions: Sequence[Any],
    grid_hw: tuple[int, int],
    num_prefix_tokens: int = 1,
    pooling: str = "cls",
    discard_ratio: float = 0.0,
) -> np.ndarray:
    """Rollout over the patch grid (B, gh, gw), for the pooled token (see `pooled_rows`)."""
    rollout = attention_rollout(attentions, num_prefix_tokens, discard_ratio)
    return to_grid(pooled_rows(rollout, num_prefix_tokens, pooling), grid_hw)


def cls_attention_maps(
    attentions: Sequence[Any],
    grid_hw: tuple[int, int],
    num_prefix_tokens: int = 1,
    pooling: str = "cls",
    layer: int = -1,
) -> np.ndarray:
    """One layer's attention of the pooled token, per head, over the grid (B, heads, gh, gw).

    The last layer by default: that is the attention whose output the classifier reads.
    """
    probabilities = np.asarray(attentions[layer], dtype=np.float64)
    return to_grid(pooled_rows(probabilities, num_prefix_tokens, pooling), grid_hw)


@dataclass
class Explanation:
    """The maps of a batch of images, all on the patch grid and in float64.

    `rollout` (B, T, T) is the full rollout matrix; `rollout_map` (B, gh, gw) its
    pooled row(s); `head_maps` (B, heads, gh, gw) the last layer's pooled attention.
    """

    rollout: np.ndarray
    rollout_map: np.ndarray
    head_maps: np.ndarray


def explain(
    attentions: Sequence[Any],
    grid_hw: tuple[int, int],
    num_prefix_tokens: int,
    pooling: str,
    discard_ratio: float = 0.0,
) -> Explanation:
    """All the maps `plot_explanation` draws, from one forward pass's attentions."""
    rollout = attention_rollout(attentions, num_prefix_tokens, discard_ratio)
    return Explanation(
        rollout=rollout,
        rollout_map=to_grid(pooled_rows(rollout, num_prefix_tokens, pooling), grid_hw),
        head_maps=cls_attention_maps(attentions, grid_hw, num_prefix_tokens, pooling),
    )


def upsample(grid_map: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """A (gh, gw) map stretched bilinearly to (H, W), as the processor squeezed the image.

    ViT's processor resizes the whole image to the model's size (no crop), so the patch
    grid covers the whole original image and a plain stretch puts each patch back over
    the pixels it saw.
    """
    from PIL import Image

    height, width = size_hw
    image = Image.fromarray(np.ascontiguousarray(grid_map, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def normalise(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1], so maps of different magnitude share one colour scale."""
    low, high = float(values.min()), float(values.max())
    return np.zeros_like(values) if high <= low else (values - low) / (high - low)


# ------------------------------------------------------------------- plotting
def figure_size_px(num_heads: int, head_grid: bool) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `plot_explanation` writes."""
    rows = 1 + (math.ceil(num_heads / PANEL_COLUMNS) if head_grid else 0)
    return PANEL_COLUMNS * PANEL_PX, rows * PANEL_PX


def display_image(image: np.ndarray) -> np.ndarray:
    """The photo as (H, W, 3) uint8, shrunk to at most `MAX_DISPLAY_SIDE` for drawing."""
    from PIL import Image

    array = np.asarray(image)
    array = np.repeat(array[..., None], 3, axis=-1) if array.ndim == 2 else array[..., :3]
    pil = Image.fromarray(array.astype(np.uint8))
    pil.thumbnail((MAX_DISPLAY_SIDE, MAX_DISPLAY_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(pil)


def _overlay(axes: Any, image: np.ndarray, grid_map: np.ndarray, title: str) -> None:
    axes.imshow(image)
    heat = normalise(upsample(grid_map, image.shape[:2]))
    axes.imshow(heat, cmap=COLORMAP, alpha=ALPHA, vmin=0.0, vmax=1.0)
    axes.set_title(title, fontsize=9)


def plot_explanation(
    image: np.ndarray,
    rollout_map: np.ndarray,
    head_maps: np.ndarray,
    path: str | Path,
    head_grid: bool = False,
    title: str | None = None,
    layer_count: int | None = None,
) -> Path:
    """Write a PNG: the image, the rollout over it, the last layer's attention over it
    (mean of heads), and with `head_grid` one panel per head below.

    Its pixel size is exactly `figure_size_px(len(head_maps), head_grid)` (no tight
    bounding box), so scripts can rely on it. Uses matplotlib's Agg backend: no display
    is needed, and the global pyplot state is never touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = display_image(image)
    width, height = figure_size_px(len(head_maps), head_grid)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    rows = height // PANEL_PX
    grid = figure.subplots(rows, PANEL_COLUMNS, squeeze=False)
    for axes in grid.flat:
        axes.set_axis_off()
    grid[0, 0].imshow(image)
    grid[0, 0].set_title("input", fontsize=9)
    layers = f" ({layer_count} layers)" if layer_count else ""
    _overlay(grid[0, 1], image, rollout_map, f"attention rollout{layers}")
    _overlay(
        grid[0, 2], image, head_maps.mean(axis=0), f"last layer, mean of {len(head_maps)} heads"
    )
    if head_grid:
        for head, head_map in enumerate(head_maps):
            row, column = divmod(head, PANEL_COLUMNS)
            _overlay(grid[1 + row, column], image, head_map, f"last layer, head {head + 1}")
    if title:  # pinned in pixels from the top: a fraction would drift into a taller figure
        figure.suptitle(title, fontsize=10, y=1 - 4 / height, va="top")
    top_px = TITLE_PX + (SUPTITLE_PX if title else 0)  # room in pixels, whatever the rows
    figure.subplots_adjust(
        left=0.01, right=0.99, bottom=0.01, top=1 - top_px / height, hspace=0.12, wspace=0.04
    )
    path = Path(path)
    figure.savefig(path, dpi=DPI, format="png")
    return path
