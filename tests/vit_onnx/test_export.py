"""ONNX export (`vit_torch.export.write_onnx`) and onnxruntime (`vit_onnx`) against the
torch twin: plain ViT and each family the converter reads, at 224 px and at another size.

Each case is a canonical folder of seeded, perturbed weights (`write_folder`, with the
switches of its family: docs/families.md), loaded by the torch twin at 224x224 or,
resampled at load, at 160x256; the graph exported from that twin is run by onnxruntime
at batch 1 and at batch 3 (one file: the batch axis is symbolic), and every output must
lie within 1e-5 of the twin's, by name, with the config, kind and processor read back
from the file. The models are tiny (width 32, two blocks) with 16 px patches, so 224 px
is a 14x14 grid, as in ViT-B/16.

Plain ViT runs at both sizes; each family at one, the two sizes shared out among them
(class token or none, registers, distillation, MAP head on either side). An export takes
a few seconds of torch.export tracing whatever the size, and a graph at another size
differs from one at 224 only in its fixed H and W: the position table is resampled in
numpy before the export (tests/vit_core/test_load_resize.py holds that to transformers),
so a second size per family would trace the same graph code again.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from vit_test_support import record_max_diff, tiny_config, write_folder

import vit_core
from vit_core import InputError
from vit_core.backend import get_backend
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.layout import KIND_METADATA_KEY, ModelKind
from vit_core.processing import PROCESSOR_NAME, processor_for

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from vit_onnx.backend import read_graph, run_onnx_file  # noqa: E402
from vit_torch.export import DEFAULT_OPSET, write_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TOL = 1e-5
SIZES: dict[str, tuple[int, int] | None] = {"224": None, "160x256": (160, 256)}
BOTH = tuple(SIZES)  # every family at the config's 224 px and resampled to 160 x 256
CLASSIFIER = ModelKind(classifier=True, pooler=False)
ENCODER = ModelKind(classifier=False, pooler=False)
# family -> (config switches, kind, the sizes it runs at); the converter's families
FAMILIES: dict[str, tuple[dict[str, Any], ModelKind, tuple[str, ...]]] = {
    "vit-classifier": ({}, CLASSIFIER, BOTH),
    "vit-pooler": ({}, ModelKind(classifier=False, pooler=True), BOTH),
    "dinov2": ({"layerscale_value": 0.3, "layer_norm_eps": 1e-6}, ENCODER, BOTH),
    "dinov2-registers": (
        {"num_register_tokens": 4, "no_embed_class": True, "layerscale_value": 0.3},
        ENCODER,
        BOTH,
    ),
    "deit-distilled": ({"use_distillation_token": True}, CLASSIFIER, BOTH),
    "deit3": ({"layerscale_value": 0.3, "no_embed_class": True}, CLASSIFIER, BOTH),
    "clip": (
        {"use_pre_norm": True, "patch_embedding_bias": False, "hidden_act": "quick_gelu"},
        ENCODER,
        BOTH,
    ),
    "siglip-map": ({"use_class_token": False, "pooling_type": "map"}, ENCODER, BOTH),
    "gap-fc_norm": (
        {"use_class_token": False, "pooling_type": "mean", "use_fc_norm": True},
        CLASSIFIER,
        BOTH,
    ),
    # RADIO's registers and positions, InternViT's LayerScale: without a final norm the
    # outputs are the raw residual stream, whose float32 rounding LayerScale keeps small
    "no-final-norm": (
        {
            "num_register_tokens": 7,
            "no_embed_class": True,
            "use_final_norm": False,
            "layerscale_value": 0.3,
        },
        ENCODER,
        BOTH,
    ),
    "swiglu": ({"use_swiglu_ffn": True, "hidden_act": "silu"}, CLASSIFIER, BOTH),
}
CASES = [(family, size) for family, (_, _, sizes) in FAMILIES.items() for size in sizes]


def family_config(fields: dict[str, Any]) -> ViTConfig:
    return tiny_config(
        hidden_size=32, intermediate_size=64, image_size=224, patch_size=16, **fields
    )


def metadata(folder: Path, config: ViTConfig) -> dict[str, str]:
    """What an export stores: the config and the processor, keyed by file name."""
    processor = processor_for(folder, config).to_json_string()
    return {CONFIG_NAME: config.to_json_string(), PROCESSOR_NAME: processor}


def export(tmp_path: Path, family: str, size: tuple[int, int] | None) -> tuple[Any, Path]:
    """The torch twin of `family` at `size`, and the .onnx file exported from it."""
    fields, kind, _ = FAMILIES[family]
    folder = tmp_path / family
    folder.mkdir()
    write_folder(folder, family_config(fields), kind, seed=len(family))
    model = vit_core.load(folder, backend="torch", image_size=size)
    file = tmp_path / f"{family}.onnx"
    write_onnx(model, file, model.config.image_hw, metadata(folder, model.config))
    return model, file


def pixels(config: ViTConfig, batch: int, seed: int) -> np.ndarray:
    shape = (batch, config.num_channels, *config.image_hw)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(("family", "size"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_onnxruntime_computes_what_the_twin_computes(
    tmp_path: Path, family: str, size: str
) -> None:
    model, file = export(tmp_path, family, SIZES[size])
    twin = get_backend("torch")
    for batch in (1, 3):  # one file, two batch sizes
        x = pixels(model.config, batch, seed=batch)
        want, got = twin.run(model, x), run_onnx_file(file, x)
        assert list(got) == list(want), f"{family}: outputs {list(got)} != {list(want)}"
        for name, value in want.items():
            assert got[name].shape == value.shape, f"{family} {name}"
            diff = float(np.abs(got[name] - value).max())
            record_max_diff(f"onnxruntime vs torch twin, float32: {name}", diff)
            assert diff <= TOL, f"{family} at {size}, batch {batch}: {name} differs by {diff}"
    check_file(file, model, tmp_path / family)


def check_file(file: Path, model: Any, folder: Path) -> None:
    """What the file says about itself: the twin's config, kind and processor, the opset,
    and one input with a symbolic batch."""
    graph = read_graph(file)
    assert graph.config.to_dict() == model.config.to_dict()
    assert graph.kind == model.kind
    assert graph.processor == processor_for(folder, model.config)
    proto = onnx.load(str(file))
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert opsets == [DEFAULT_OPSET]
    (pixel_values,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in pixel_values.type.tensor_type.shape.dim]
    assert dims == ["batch", model.config.num_channels, *model.config.image_hw]
    props = {p.key: p.value for p in proto.metadata_props}
    assert set(props) == {CONFIG_NAME, PROCESSOR_NAME, KIND_METADATA_KEY}
    assert json.loads(props[KIND_METADATA_KEY]) == dataclasses.asdict(model.kind)


def test_a_training_model_is_traced_without_dropout_and_left_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "dropout"
    folder.mkdir()
    config = family_config({"hidden_dropout_prob": 0.5, "attention_probs_dropout_prob": 0.5})
    write_folder(folder, config, CLASSIFIER, seed=3)
    model = vit_core.load(folder, backend="torch").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_onnx(model, tmp_path / "m.onnx", config.image_hw, metadata(folder, config))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = pixels(config, 2, seed=4)
    want = get_backend("torch").run(model.eval(), x)["logits"]
    assert np.abs(run_onnx_file(tmp_path / "m.onnx", x)["logits"] - want).max() <= TOL


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": (160, 160)}, "differs from the model's (224, 224)"),
        ({"metadata": {}}, "metadata has no 'config.json' entry"),
        ({"metadata": {KIND_METADATA_KEY: "{}"}}, "is written by write_onnx itself"),
        ({"opset": 11}, "opset 11 is out of range"),
        ({"dtype": "bfloat16"}, "also holds bfloat16 state"),
        ({"quantize": "int8"}, "also holds dtype, int64, tuple state"),
    ],
    ids=["size", "no-config", "kind-given", "opset", "bfloat16", "int8"],
)
def test_what_cannot_be_exported_is_refused_and_nothing_written(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    folder = tmp_path / "vit"
    folder.mkdir()
    config = family_config({})
    write_folder(folder, config, CLASSIFIER, seed=5)
    options = {k: change[k] for k in ("dtype", "quantize") if k in change}
    model = vit_core.load(folder, backend="torch", **options)
    given = change.get("metadata", {CONFIG_NAME: config.to_json_string()})
    if KIND_METADATA_KEY in given:
        given = {CONFIG_NAME: config.to_json_string(), **given}
    with pytest.raises(InputError, match=re.escape(message)):
        write_onnx(
            model,
            tmp_path / "m.onnx",
            change.get("image_size", config.image_hw),
            given,
            opset=change.get("opset", DEFAULT_OPSET),
        )
    assert list(tmp_path.glob("*.onnx")) == []
    assert list(tmp_path.glob(".*")) == []
