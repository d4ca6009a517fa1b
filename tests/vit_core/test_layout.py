"""The canonical key table: shapes from the config, and the internal (fused qkv) bridge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from vit_core import ViTConfig
from vit_core.layout import (
    MIM_KIND,
    TABLE,
    ModelKind,
    expected_shapes,
    layout_markdown,
    to_canonical,
    to_internal,
)

SMALL = {
    "hidden_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 40,
    "image_size": (16, 24),
    "patch_size": 8,
    "num_labels": 5,
}


@pytest.mark.parametrize(
    ("model_class", "kind", "qkv_bias"),
    [
        (transformers.ViTForImageClassification, ModelKind(classifier=True, pooler=False), True),
        (transformers.ViTModel, ModelKind(classifier=False, pooler=True), False),
        (transformers.ViTForMaskedImageModeling, MIM_KIND, True),
    ],
)
def test_expected_shapes_are_transformers_state_dict(
    model_class: type, kind: ModelKind, qkv_bias: bool
) -> None:
    hf_model = model_class(transformers.ViTConfig(**SMALL, qkv_bias=qkv_bias))
    theirs = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    assert expected_shapes(ViTConfig(**SMALL, qkv_bias=qkv_bias), kind) == theirs


def test_internal_names_are_the_torch_twins_state_dict() -> None:
    from vit_torch import ViTForImageClassification

    config = ViTConfig(**SMALL)
    kind = ModelKind(classifier=True, pooler=False)
    canonical = {
        k: np.random.default_rng(0).standard_normal(s).astype(np.float32)
        for k, s in expected_shapes(config, kind).items()
    }
    internal = to_internal(canonical, kind)
    twin = {k: tuple(v.shape) for k, v in ViTForImageClassification(config).state_dict().items()}
    assert {k: v.shape for k, v in internal.items()} == twin
    back = to_canonical(internal, kind)
    assert back.keys() == canonical.keys()
    for key, value in canonical.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_fused_qkv_rows_are_query_key_value_in_order() -> None:
    config = ViTConfig(**SMALL)
    kind = ModelKind(classifier=False, pooler=False)
    canonical = {k: np.zeros(s, np.float32) for k, s in expected_shapes(config, kind).items()}
    for value, part in enumerate(("query", "key", "value")):
        canonical[f"encoder.layer.1.attention.attention.{part}.weight"][:] = value
    fused = to_internal(canonical, kind)["encoder.layers.1.attention.qkv.weight"]
    d = config.hidden_size
    assert [fused[i * d : (i + 1) * d].mean() for i in range(3)] == [0, 1, 2]
    assert torch.Size(fused.shape) == (3 * d, d)


def test_markdown_table_lists_every_entry() -> None:
    table = layout_markdown()
    assert "`encoder.layer.{i}.attention.attention.query.weight` | (D, D)" in table
    assert table.count("\n") == len(TABLE) + 1  # header, rule, one row per entry
