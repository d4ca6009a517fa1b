"""The family switches through the core: config checks, `info`, `explain`, `predict`, and
folders whose config contradicts their weights (docs/families.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from vit_test_support import random_canonical_weights, tiny_config, write_folder

import vit_core
from vit_core import ConfigError, LayoutError
from vit_core.cli import main
from vit_core.info import family, folder_info
from vit_core.layout import WEIGHTS_NAME, ModelKind

BASE = ModelKind(classifier=False, pooler=False)
CLASSIFIER = ModelKind(classifier=True, pooler=False)
DINOV2_REG = {
    "num_register_tokens": 4,
    "no_embed_class": True,
    "layerscale_value": 1e-5,
    "image_size": 16,
    "layer_norm_eps": 1e-6,
}
SIGLIP = {"use_class_token": False, "pooling_type": "map", "image_size": 16}


@pytest.mark.parametrize(
    ("fields", "kind", "name", "transformers_class"),
    [
        ({}, BASE, "ViT", "ViTModel"),
        (DINOV2_REG, BASE, "DINOv2 with registers", "Dinov2WithRegistersModel"),
        ({"layerscale_value": 1.0}, BASE, "DINOv2", "Dinov2Model"),
        ({"layerscale_value": 1e-6, "no_embed_class": True}, CLASSIFIER, "DeiT-3", None),
        (SIGLIP, BASE, "SigLIP (MAP head)", "SiglipVisionModel"),
        (
            {"use_pre_norm": True, "patch_embedding_bias": False},
            BASE,
            "CLIP",
            "CLIPVisionModel",
        ),
        (
            {"use_distillation_token": True},
            CLASSIFIER,
            "DeiT (distilled)",
            "DeiTForImageClassificationWithTeacher",
        ),
        (
            {"use_class_token": False, "pooling_type": "mean", "use_fc_norm": True},
            CLASSIFIER,
            "ViT, average-pooled (gap)",
            None,
        ),
    ],
)
def test_family_names_the_transformers_class_that_computes_the_same(
    fields: dict[str, object], kind: ModelKind, name: str, transformers_class: str | None
) -> None:
    assert family(tiny_config(**fields), kind) == (name, transformers_class)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (
            {"use_distillation_token": True, "use_class_token": False, "pooling_type": "mean"},
            "use_distillation_token",
        ),
        ({"use_fc_norm": True, "use_final_norm": False}, "use_fc_norm"),
        ({"num_register_tokens": -1}, "num_register_tokens"),
        ({"layerscale_value": "0.1"}, "layerscale_value"),
        ({"pooling_type": "attention"}, "pooling_type"),
    ],
)
def test_contradictory_or_wrong_switches_are_refused_by_name(
    fields: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        tiny_config(**fields)


def test_positions_cover_the_prefix_tokens_unless_no_embed_class() -> None:
    with_prefix = tiny_config(num_register_tokens=4, use_distillation_token=True)
    assert with_prefix.num_prefix_tokens == 6
    assert with_prefix.num_positions == 4 + 6  # 2x2 patches + class, distillation, registers
    assert tiny_config(num_register_tokens=4, no_embed_class=True).num_positions == 4


@pytest.mark.parametrize(
    ("config_fields", "weights_fields", "key"),
    [
        (
            {"num_register_tokens": 2, "no_embed_class": True},
            {"no_embed_class": True},
            "register_tokens",
        ),
        (SIGLIP, {"use_class_token": False, "pooling_type": "mean"}, "head.probe"),
        ({"layerscale_value": 0.5}, {}, "layer_scale1.lambda1"),
        ({}, {"use_distillation_token": True}, "distillation_token"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_a_config_that_contradicts_the_weights_names_the_key(
    tmp_path: Path,
    config_fields: dict[str, object],
    weights_fields: dict[str, object],
    key: str,
    backend: str,
) -> None:
    weights = random_canonical_weights(tiny_config(**weights_fields), BASE, seed=0)
    save_file(weights, tmp_path / WEIGHTS_NAME, {"format": "pt"})
    tiny_config(**config_fields).save_pretrained(tmp_path)
    with pytest.raises(LayoutError, match=key):
        vit_core.load(tmp_path, backend=backend)


@pytest.fixture()
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("fields", [DINOV2_REG, SIGLIP], ids=["dinov2-reg", "siglip"])
@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_a_family_folder_runs_info_predict_and_explain(
    tmp_path: Path,
    photo: Path,
    fields: dict[str, object],
    backend: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = tiny_config(**fields, id2label={0: "cat", 1: "dog", 2: "fox"})
    folder = tmp_path / "model"
    folder.mkdir()
    write_folder(folder, config, CLASSIFIER, seed=1)
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == family(config, CLASSIFIER)[0]
    assert main(["predict", str(photo), "--model", str(folder), "--backend", backend]) == 0
    assert any(label in capsys.readouterr().out for label in ("cat", "dog", "fox"))
    output = tmp_path / "explain.png"
    args = ["explain", str(photo), "--model", str(folder), "--backend", backend, "-o", str(output)]
    assert main(args) == 0
    assert Image.open(output).size[0] > 0
    assert "on 4x4 patches" in capsys.readouterr().out  # the registers are not patches


def test_info_reads_the_family_from_the_header(tmp_path: Path) -> None:
    write_folder(tmp_path, tiny_config(**DINOV2_REG), BASE, seed=0)
    info = folder_info(tmp_path)
    assert (info["family"], info["transformers_class"]) == (
        "DINOv2 with registers",
        "Dinov2WithRegistersModel",
    )
