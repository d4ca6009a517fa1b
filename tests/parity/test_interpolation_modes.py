"""Run-time position interpolation in every mode: the twins agree, and run time = load time.

`interpolate_pos_encoding=True` is transformers' bicubic; a mode name picks another
(`vit_core.resample.INTERPOLATIONS`). Both twins apply the same numpy matrices, so they
agree to float rounding, and a model loaded with `image_size=` (resampled once in numpy)
computes what the original computes with run-time interpolation in the same mode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from vit_test_support import write_folder

from vit_core import InputError, ViTConfig, load
from vit_core.layout import ModelKind
from vit_core.resample import INTERPOLATIONS

ATOL = 1e-5
CONFIG = ViTConfig(
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    image_size=(16, 24),  # a non-square 4x6 grid
    patch_size=4,
    num_labels=3,
    layer_norm_eps=1e-6,
)


# Prefix tokens with positions (registers, distillation token), and registers without
# (no_embed_class: the table covers the patches only): the patch rows alone are resampled.
FAMILIES = {
    "plain": CONFIG,
    "prefix-positions": dataclasses.replace(
        CONFIG, num_register_tokens=2, use_distillation_token=True, layerscale_value=0.3
    ),
    "no-embed-class": dataclasses.replace(CONFIG, num_register_tokens=4, no_embed_class=True),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("interp")
    write_folder(path, FAMILIES[request.param], ModelKind(classifier=True, pooler=False), seed=3)
    return path


def torch_logits(model: torch.nn.Module, pixels: np.ndarray, **kwargs: object) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(pixels), **kwargs).logits.numpy()


@pytest.mark.parametrize("mode", INTERPOLATIONS)
@pytest.mark.parametrize("size", [(32, 20), (12, 12)], ids=["up-nonsquare", "down"])
def test_run_time_modes_agree_and_equal_load_time(
    folder: Path, mode: str, size: tuple[int, int]
) -> None:
    pixels = np.random.default_rng(0).standard_normal((2, 3, *size), dtype=np.float32)
    ours_torch = torch_logits(load(folder), pixels, interpolate_pos_encoding=mode)
    ours_flax = np.asarray(
        load(folder, backend="flax")(pixels, interpolate_pos_encoding=mode).logits
    )
    assert np.abs(ours_torch - ours_flax).max() <= ATOL
    resized = load(folder, image_size=size, interpolation=mode)
    assert np.abs(torch_logits(resized, pixels) - ours_torch).max() <= ATOL


def test_true_means_bicubic(folder: Path) -> None:
    pixels = np.random.default_rng(1).standard_normal((1, 3, 32, 32), dtype=np.float32)
    model = load(folder)
    np.testing.assert_array_equal(
        torch_logits(model, pixels, interpolate_pos_encoding=True),
        torch_logits(model, pixels, interpolate_pos_encoding="bicubic"),
    )


def test_unknown_mode_is_named(folder: Path) -> None:
    pixels = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(ValueError, match="interpolation='lanczos'; choose one of bicubic"):
        torch_logits(load(folder), pixels, interpolate_pos_encoding="lanczos")
    with pytest.raises(InputError, match="not a multiple of the patch size"):
        torch_logits(
            load(folder), np.zeros((1, 3, 30, 32), np.float32), interpolate_pos_encoding=True
        )
