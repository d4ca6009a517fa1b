"""`vit_core.load(..., image_size=..., num_labels=...)`: load-time resize and head replacement.

A model resized at load time with the default (bicubic) must compute what the original
computes at run time with `interpolate_pos_encoding=True` (and what transformers
computes), in both backends; after `save_pretrained` the folder is a plain model for the
new size. A replaced head is drawn in numpy from a seed, so both backends get it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from vit_core import ConfigError, LayoutError, load
from vit_core.backend import BACKENDS, get_backend
from vit_core.initialization import TRUNCATED_NORMAL_STD
from vit_core.layout import WEIGHTS_NAME
from vit_core.resample import resample_position_embeddings

NEW_SIZE = (48, 64)  # from 32x32 with patch 8: a 4x4 grid becomes 6x8
POSITIONS = "vit.embeddings.position_embeddings"


@pytest.fixture
def hf_folder(oracle: Any) -> tuple[Any, Path]:
    """A perturbed transformers classifier at 32x32, patch 8, 5 labels, and its folder."""
    return oracle.make_hf("classification", seed=3, image_size=32, patch_size=8)


def run(model: Any, pixels: np.ndarray, **flags: Any) -> dict[str, Any]:
    """The model's outputs for numpy pixels, from the backend that built it."""
    return get_backend("torch" if hasattr(model, "parameters") else "flax").run(
        model, pixels, **flags
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_time_resize_equals_run_time_interpolation(
    oracle: Any, torch_one_thread: None, hf_folder: tuple[Any, Path], backend: str
) -> None:
    hf_model, folder = hf_folder
    pixels = oracle.pixels(hf_model.config, seed=1, size=NEW_SIZE)
    resized = load(folder, backend=backend, image_size=NEW_SIZE)
    original = load(folder, backend=backend)
    assert resized.config.image_hw == NEW_SIZE and original.config.image_hw == (32, 32)
    got = run(resized, pixels)["logits"]
    at_run_time = run(original, pixels, interpolate_pos_encoding=True)["logits"]
    oracle.assert_close(got, at_run_time, f"load-time vs run-time resize ({backend})")
    import torch

    with torch.no_grad():
        hf = hf_model(torch.from_numpy(pixels), interpolate_pos_encoding=True).logits
    oracle.assert_close(got, hf, f"load-time resize ({backend}) vs transformers run-time")


def test_resized_folder_round_trip(
    oracle: Any, torch_one_thread: None, hf_folder: tuple[Any, Path], tmp_path: Path
) -> None:
    """Save the resized model; the folder loads strictly at the new size in both backends."""
    hf_model, folder = hf_folder
    pixels = oracle.pixels(hf_model.config, seed=2, size=NEW_SIZE)
    resized = load(folder, backend="flax", image_size=NEW_SIZE)
    want = run(resized, pixels)["logits"]
    resized.save_pretrained(tmp_path / "resized")
    config = json.loads((tmp_path / "resized" / "config.json").read_text())
    assert config["image_size"] == list(NEW_SIZE) and config["patch_size"] == 8
    assert load_file(tmp_path / "resized" / WEIGHTS_NAME)[POSITIONS].shape == (1, 1 + 48, 48)
    for backend in BACKENDS:
        reloaded = load(tmp_path / "resized", backend=backend)
        oracle.assert_close(
            run(reloaded, pixels)["logits"], want, f"resized round trip ({backend})"
        )


@pytest.mark.parametrize("mode", ["bicubic_antialias", "bilinear", "jax_zoom"])
def test_other_modes_write_the_resampled_table(
    hf_folder: tuple[Any, Path], tmp_path: Path, mode: str
) -> None:
    from vit_torch import ViTForImageClassification

    _, folder = hf_folder
    model = ViTForImageClassification.from_pretrained(
        folder, image_size=NEW_SIZE, interpolation=mode
    )
    model.save_pretrained(tmp_path / mode)
    table = load_file(folder / WEIGHTS_NAME)[POSITIONS]
    want = resample_position_embeddings(table, (4, 4), (6, 8), 1, mode)
    np.testing.assert_array_equal(load_file(tmp_path / mode / WEIGHTS_NAME)[POSITIONS], want)


def test_patch_size_cannot_change(hf_folder: tuple[Any, Path]) -> None:
    _, folder = hf_folder
    with pytest.raises(ConfigError, match=r"image_size=\(48, 60\).*not a multiple.*patch"):
        load(folder, image_size=(48, 60))
    with pytest.raises(ValueError, match="interpolation='area'"):
        load(folder, image_size=48, interpolation="area")


def encoder_and_logits(model: Any, pixels: np.ndarray) -> tuple[Any, Any]:
    out = run(model, pixels, output_hidden_states=True)
    return out["hidden_states"], out["logits"]


def test_new_head_is_the_same_in_both_backends(
    oracle: Any, torch_one_thread: None, hf_folder: tuple[Any, Path], tmp_path: Path
) -> None:
    hf_model, folder = hf_folder
    pixels = oracle.pixels(hf_model.config, seed=4)
    models = {b: load(folder, backend=b, num_labels=7, seed=11) for b in BACKENDS}
    for backend, model in models.items():
        assert model.config.num_labels == 7
        assert model.config.id2label == {i: f"LABEL_{i}" for i in range(7)}
        states, _ = encoder_and_logits(model, pixels)
        original, _ = encoder_and_logits(load(folder, backend=backend), pixels)
        for new, old in zip(states, original, strict=True):
            oracle.assert_close(new, old, f"head replaced: encoder unchanged ({backend})", 0.0)
    _, torch_logits = encoder_and_logits(models["torch"], pixels)
    _, flax_logits = encoder_and_logits(models["flax"], pixels)
    oracle.assert_close(torch_logits, flax_logits, "head replaced: torch vs flax logits")
    models["flax"].save_pretrained(tmp_path / "new-head")
    head = load_file(tmp_path / "new-head" / WEIGHTS_NAME)
    assert head["classifier.weight"].shape == (7, 48) and not head["classifier.bias"].any()
    reloaded = load(tmp_path / "new-head", backend="torch")  # strict, no num_labels
    oracle.assert_close(run(reloaded, pixels)["logits"], torch_logits, "new-head folder reload")


def test_new_head_distribution_seed_and_labels(hf_folder: tuple[Any, Path]) -> None:
    _, folder = hf_folder
    names = {0: "cat", 1: "dog", 2: "fish"}
    model = load(folder, num_labels=3, id2label=names, seed=1)
    assert model.config.id2label == names and model.config.label2id == {
        "cat": 0,
        "dog": 1,
        "fish": 2,
    }
    big = load(folder, num_labels=2000, seed=1).classifier.weight.detach().numpy()
    limit = 2 * 0.02 / TRUNCATED_NORMAL_STD
    assert np.abs(big).max() <= limit and abs(big.std() - 0.02) < 1e-3
    again = load(folder, num_labels=2000, seed=1).classifier.weight.detach().numpy()
    other = load(folder, num_labels=2000, seed=2).classifier.weight.detach().numpy()
    assert np.array_equal(big, again) and not np.array_equal(big, other)
    with pytest.raises(ConfigError, match="num_labels=4 but id2label has 3"):
        load(folder, num_labels=4, id2label=names)


def test_head_mismatch_is_never_silent(hf_folder: tuple[Any, Path]) -> None:
    """A folder whose head disagrees with its config fails unless num_labels is asked for."""
    _, folder = hf_folder
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): f"c{i}" for i in range(9)}
    config["label2id"] = {f"c{i}": i for i in range(9)}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayoutError, match=r"classifier.weight: expected \(9, 48\).*num_labels=N"):
        load(folder)
    assert load(folder, num_labels=9).config.id2label[8] == "LABEL_8"


def test_base_checkpoint_gains_a_head(oracle: Any, torch_one_thread: None) -> None:
    _, folder = oracle.make_hf("pooler", seed=5, image_size=32, patch_size=8)
    model = load(folder, num_labels=4, image_size=(32, 48))
    assert type(model).__name__ == "ViTForImageClassification"
    assert model.config.image_hw == (32, 48) and model.vit.pooler is None
    with pytest.raises(ValueError, match="a base model has none"):
        load(folder, model_type="base", num_labels=4)
