"""Attention maps: rollout against a hand computation, the twins agreeing, the PNG itself.

The reference rollout here is written out with explicit loops over plain Python floats,
step by step as Abnar & Zuidema describe it, so that it shares no code (and no
vectorisation trick) with `vit_core.explain`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from vit_test_support import tiny_config

import vit_core
from vit_core.backend import get_backend
from vit_core.cli import HELDOUT, SHIPPED_MODEL, asset, main, processor_for
from vit_core.cli import read_heldout as read_heldout_digits
from vit_core.explain import (
    PANEL_PX,
    attention_rollout,
    cls_attention_maps,
    explain,
    figure_size_px,
    rollout_maps,
)

ROOT = Path(__file__).resolve().parents[2]
IMAGES = 3  # held-out digits explained per test
TWIN_TOL = 1e-5


# ---------------------------------------------------------------- the reference
def hand_rollout(layers: list[np.ndarray], image: int) -> list[list[float]]:
    """Rollout of one image, (T, T) as nested lists, from per-layer (B, heads, T, T)."""
    heads, tokens = layers[0].shape[1], layers[0].shape[2]
    # Before any layer every token is only itself.
    joint = [[1.0 if i == j else 0.0 for j in range(tokens)] for i in range(tokens)]
    for attention in layers:
        # 1. average the heads
        mean = [[0.0] * tokens for _ in range(tokens)]
        for i in range(tokens):
            for j in range(tokens):
                total = 0.0
                for h in range(heads):
                    total += float(attention[image, h, i, j])
                mean[i][j] = total / heads
        # 2. the residual connection: add the identity
        for i in range(tokens):
            mean[i][i] += 1.0
        # 3. renormalise each row to sum to one
        for i in range(tokens):
            row_sum = sum(mean[i])
            mean[i] = [value / row_sum for value in mean[i]]
        # 4. this layer after the ones below: joint <- mean x joint
        product = [[0.0] * tokens for _ in range(tokens)]
        for i in range(tokens):
            for j in range(tokens):
                for k in range(tokens):
                    product[i][j] += mean[i][k] * joint[k][j]
        joint = product
    return joint


def hand_map(joint: list[list[float]], prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """The pooled row over the patch columns, on the grid: the class token's row with a
    prefix token, else the mean of the patch tokens' rows."""
    tokens = len(joint)
    if prefix:
        row = joint[0]
    else:
        row = [sum(joint[i][j] for i in range(tokens)) / tokens for j in range(tokens)]
    patches = row[prefix:]
    height, width = grid
    return np.array([[patches[r * width + c] for c in range(width)] for r in range(height)])


# ------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    with asset(HELDOUT) as path:
        return read_heldout_digits(path)[0][:IMAGES]


@pytest.fixture(scope="module")
def shipped_attentions(digits: np.ndarray, torch_one_thread: None) -> dict[str, list[np.ndarray]]:
    """Per-layer attentions of the shipped model on a few digits, from each twin."""
    with asset(SHIPPED_MODEL) as folder:
        models = {b: vit_core.load(folder, backend=b) for b in ("torch", "flax")}
        pixels = processor_for(folder, models["torch"].config)(list(digits))["pixel_values"]
    return {
        b: list(get_backend(b).run(m, pixels, output_attentions=True)["attentions"])
        for b, m in models.items()
    }


# ----------------------------------------------------------------- numerics
def test_two_tokens_two_layers_worked_by_hand() -> None:
    # Two heads that look only at themselves / only at the other token: their mean is
    # 1/2 everywhere; + identity gives [[1.5, .5], [.5, 1.5]]; rows / 2 -> [[.75, .25], ...].
    layer = np.array([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]])
    one = attention_rollout([layer])
    two = attention_rollout([layer, layer])
    np.testing.assert_allclose(one[0], [[0.75, 0.25], [0.25, 0.75]], rtol=0, atol=1e-15)
    # [[.75, .25], [.25, .75]] squared: .75^2 + .25^2 = .625, 2 * .75 * .25 = .375
    np.testing.assert_allclose(two[0], [[0.625, 0.375], [0.375, 0.625]], rtol=0, atol=1e-15)


def test_discard_ratio_drops_the_weakest_patch_link_but_never_the_class_token() -> None:
    # Row 0 attends [cls .2, patch .3, patch .5]; ratio .5 of 2 patches drops one: the .3.
    row = [0.2, 0.3, 0.5]
    layer = np.array([[[row, row, row]]])
    rollout = attention_rollout([layer], num_prefix_tokens=1, discard_ratio=0.5)
    np.testing.assert_allclose(rollout[0, 0], np.array([1.2, 0.0, 0.5]) / 1.7, atol=1e-15)
    np.testing.assert_allclose(rollout[0, 1], np.array([0.2, 1.0, 0.5]) / 1.7, atol=1e-15)


def test_rollout_matches_the_hand_loops_on_the_shipped_model(
    shipped_attentions: dict[str, list[np.ndarray]],
) -> None:
    attentions = shipped_attentions["torch"]
    config = vit_core.ViTConfig.from_pretrained(ROOT / "vit_core/assets" / SHIPPED_MODEL)
    rollout = attention_rollout(attentions, config.num_prefix_tokens)
    maps = rollout_maps(attentions, config.grid_hw, config.num_prefix_tokens, "cls")
    assert rollout.shape == (IMAGES, config.num_positions, config.num_positions)
    np.testing.assert_allclose(rollout.sum(axis=-1), 1.0, rtol=0, atol=1e-12)
    for image in range(IMAGES):
        joint = hand_rollout(attentions, image)
        np.testing.assert_allclose(rollout[image], joint, rtol=0, atol=1e-12)
        np.testing.assert_allclose(maps[image], hand_map(joint, 1, (4, 4)), rtol=0, atol=1e-12)


def test_head_maps_are_the_last_layers_class_token_row(
    shipped_attentions: dict[str, list[np.ndarray]],
) -> None:
    last = shipped_attentions["torch"][-1]
    maps = cls_attention_maps(shipped_attentions["torch"], (4, 4), 1, "cls")
    assert maps.shape == (IMAGES, 4, 4, 4)
    for image in range(IMAGES):
        for head in range(4):
            for patch in range(16):
                row, column = divmod(patch, 4)
                assert maps[image, head, row, column] == last[image, head, 0, 1 + patch]


def test_torch_and_flax_maps_agree(shipped_attentions: dict[str, list[np.ndarray]]) -> None:
    torch_maps, flax_maps = (
        explain(shipped_attentions[b], (4, 4), 1, "cls") for b in ("torch", "flax")
    )
    for name in ("rollout", "rollout_map", "head_maps"):
        diff = np.abs(getattr(torch_maps, name) - getattr(flax_maps, name)).max()
        assert diff <= TWIN_TOL, f"{name}: torch vs flax max abs diff {diff:.2e}"


@pytest.mark.usefixtures("torch_one_thread")
def test_model_without_class_token_uses_the_mean_of_the_patch_rows(tmp_path: Path) -> None:
    import vit_torch

    config = tiny_config(use_class_token=False, pooling_type="mean")
    vit_torch.ViTForImageClassification(config).save_pretrained(tmp_path)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    attentions = {
        b: list(
            get_backend(b).run(vit_core.load(tmp_path, b), pixels, output_attentions=True)[
                "attentions"
            ]
        )
        for b in ("torch", "flax")
    }
    maps = {b: explain(a, (2, 2), 0, "mean") for b, a in attentions.items()}
    expected = hand_map(hand_rollout(attentions["torch"], 0), 0, (2, 2))
    np.testing.assert_allclose(maps["torch"].rollout_map[0], expected, rtol=0, atol=1e-12)
    assert np.abs(maps["torch"].rollout - maps["flax"].rollout).max() <= TWIN_TOL


def test_class_token_pooling_without_a_class_token_is_refused() -> None:
    layer = np.full((1, 1, 4, 4), 0.25)
    with pytest.raises(ValueError, match="needs a class token"):
        rollout_maps([layer], (2, 2), num_prefix_tokens=0, pooling="cls")


# ------------------------------------------------------------------ the PNG
@pytest.fixture(scope="module")
def digit_png(digits: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A held-out digit as a 48x24 PNG: not square, not the model's size."""
    path = tmp_path_factory.mktemp("explain") / "digit.png"
    Image.fromarray(digits[0]).resize((24, 48), Image.Resampling.NEAREST).save(path)
    return path


def test_figure_size_is_three_panels_per_row() -> None:
    assert PANEL_PX == 320
    assert figure_size_px(4, head_grid=False) == (960, 320)
    assert figure_size_px(4, head_grid=True) == (960, 960)  # 4 heads: 2 more rows of 3
    assert figure_size_px(3, head_grid=True) == (960, 640)


@pytest.mark.usefixtures("torch_one_thread")
def test_explain_writes_a_png_of_the_expected_size(
    digit_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "map.png"
    assert main(["explain", str(digit_png), "-o", str(output)]) == 0
    assert f"wrote {output} (960x320 px)" in capsys.readouterr().out
    with Image.open(output) as png:
        assert png.format == "PNG" and png.size == (960, 320)


def test_explain_cli_with_flax_and_head_grid(digit_png: Path, tmp_path: Path) -> None:
    """As a user runs it: a subprocess, exit status 0, the PNG on disk at its size."""
    output = tmp_path / "grid.png"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "vit_core", "explain", str(digit_png), "--backend", "flax"]
    result = subprocess.run(
        [*command, "--head-grid", "-o", str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("digit.png: ")  # the prediction is the title
    with Image.open(output) as png:
        assert png.size == (960, 960)  # 4 heads: the main row and two rows of heads


def test_explain_of_a_missing_image_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "no-such-image.png"]) == 2
    assert capsys.readouterr().err == "error: no-such-image.png: no such image file\n"
