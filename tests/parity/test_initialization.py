"""One init path for both twins: the same seed gives the same weights, at the stated std.

Both twins' `init_weights(seed)` take `vit_core.initialization.initial_weights`; the
weights are compared under the internal names (`vit_torch.weights.internal_weights`,
`vit_flax.weights.internal_weights`). The linen modules' own initializers (what
`module.init` draws) are held to the same std.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from vit_test_support import tiny_config

import vit_flax.weights
import vit_torch.modeling
import vit_torch.weights
from vit_core import ViTConfig
from vit_core.initialization import TRUNCATED_NORMAL_STD, initial_weights, internal_shapes
from vit_core.layout import BASE_PREFIX, ModelKind
from vit_flax.modeling import (
    FlaxViTForImageClassification,
    FlaxViTModel,
    ViTForImageClassificationModule,
)
from vit_torch import ViTForImageClassification, ViTModel

SMALL_ARGS: dict[str, Any] = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "image_size": (8, 12),
    "patch_size": 4,
    "num_labels": 3,
}
SMALL = ViTConfig(**SMALL_ARGS)
# (config, kind): heads with and without the pooler, base models with and without it,
# no class token, no qkv bias, no labels.
CASES = {
    "classification": (SMALL, ModelKind(classifier=True, pooler=False)),
    "classification-pooler": (
        dataclasses.replace(SMALL, classifier_uses_pooler=True),
        ModelKind(classifier=True, pooler=True),
    ),
    "classification-no-labels": (
        ViTConfig(**{**SMALL_ARGS, "num_labels": 0}),
        ModelKind(classifier=True, pooler=False),
    ),
    "base-pooler": (SMALL, ModelKind(classifier=False, pooler=True)),
    "base-mean-no-cls-no-qkv-bias": (
        dataclasses.replace(SMALL, use_class_token=False, pooling_type="mean", qkv_bias=False),
        ModelKind(classifier=False, pooler=False),
    ),
}
# Wide enough for the std to be measured to ~0.3 %; an odd initializer_range, to see it used.
WIDE = tiny_config(
    hidden_size=64,
    num_attention_heads=4,
    intermediate_size=256,
    image_size=16,
    num_labels=10,
    initializer_range=0.05,
)
WIDE_KIND = ModelKind(classifier=True, pooler=False)
STD_RTOL = 0.03


def torch_model(config: ViTConfig, kind: ModelKind, seed: int | None) -> torch.nn.Module:
    if kind.classifier:
        return ViTForImageClassification(config, seed=seed)
    return ViTModel(config, add_pooling_layer=kind.pooler, seed=seed)


def flax_model(config: ViTConfig, kind: ModelKind, seed: int) -> Any:
    if kind.classifier:
        return FlaxViTForImageClassification(config, seed=seed)
    return FlaxViTModel(config, add_pooling_layer=kind.pooler, seed=seed)


def drawn(weights: dict[str, np.ndarray]) -> np.ndarray:
    """The truncated-normal tensors, flattened together: everything but biases and norms."""
    return np.concatenate(
        [v.ravel() for k, v in weights.items() if not k.endswith(".bias") and v.ndim > 1]
    )


@pytest.mark.parametrize("case", CASES)
def test_same_seed_same_weights_in_both_twins(case: str) -> None:
    config, kind = CASES[case]
    for seed in (0, 7):
        ours = vit_torch.weights.internal_weights(torch_model(config, kind, seed))
        twin = vit_flax.weights.internal_weights(flax_model(config, kind, seed).params)
        assert ours.keys() == twin.keys() == internal_shapes(config, kind).keys()
        for name, value in ours.items():
            np.testing.assert_array_equal(value, twin[name], err_msg=f"{case} seed {seed}: {name}")
    other = vit_torch.weights.internal_weights(torch_model(config, kind, 8))
    assert not np.array_equal(drawn(ours), drawn(other))


def test_torch_seed_none_follows_torch_manual_seed() -> None:
    config, kind = CASES["classification"]
    torch.manual_seed(3)
    first = vit_torch.weights.internal_weights(torch_model(config, kind, None))
    torch.manual_seed(3)
    again = vit_torch.weights.internal_weights(torch_model(config, kind, None))
    later = vit_torch.weights.internal_weights(torch_model(config, kind, None))
    for name, value in first.items():
        np.testing.assert_array_equal(value, again[name], err_msg=name)
    assert not np.array_equal(drawn(first), drawn(later))


def test_a_head_and_a_base_model_from_one_seed_share_the_encoder() -> None:
    """The head is drawn last, so a new head does not move the encoder's weights."""
    with_head = initial_weights(SMALL, ModelKind(classifier=True, pooler=False), seed=4)
    base = initial_weights(SMALL, ModelKind(classifier=False, pooler=False), seed=4)
    for name, value in base.items():
        np.testing.assert_array_equal(value, with_head[BASE_PREFIX + name], err_msg=name)


def test_drawn_weights_have_the_stated_std() -> None:
    weights = initial_weights(WIDE, WIDE_KIND, seed=0)
    samples = drawn(weights)
    std = WIDE.initializer_range
    assert samples.dtype == np.float32 and samples.size > 100_000
    assert abs(samples.std() / std - 1) < STD_RTOL
    assert abs(samples.mean()) < 0.01 * std
    assert np.abs(samples).max() <= 2 * std / TRUNCATED_NORMAL_STD  # truncated at 2 sigma
    for name, value in weights.items():
        if name.endswith(".bias"):
            assert not value.any(), name
        elif value.ndim == 1:  # LayerNorm scales
            assert (value == 1).all(), name
    # each kind of tensor, not only the pool: the tables and the patch projection too
    for name in ("vit.embeddings.position_embeddings", "vit.embeddings.patch_embeddings.weight"):
        assert abs(weights[name].std() / std - 1) < 0.15, name


def test_linen_initializers_have_the_stated_std() -> None:
    """`module.init` itself (not the models' numpy path) draws at initializer_range."""
    module = ViTForImageClassificationModule(WIDE)
    pixels = jnp.zeros((1, *WIDE.image_hw, WIDE.num_channels), jnp.float32)
    params = jax.jit(module.init)({"params": jax.random.PRNGKey(0)}, pixels)["params"]
    weights = vit_flax.weights.internal_weights(params)
    assert weights.keys() == internal_shapes(WIDE, WIDE_KIND).keys()
    samples = drawn(weights)
    assert abs(samples.std() / WIDE.initializer_range - 1) < STD_RTOL
    assert np.abs(samples).max() <= 2 * WIDE.initializer_range / TRUNCATED_NORMAL_STD * 1.0001


@pytest.mark.parametrize("case", ["classification", "base-pooler"])
def test_models_built_on_the_meta_device_draw_nothing(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How the torch backend builds a model to load into: the init costs nothing there."""

    def refuse(*args: object) -> None:
        raise AssertionError("initial_weights called for a meta-device model")

    monkeypatch.setattr(vit_torch.modeling, "initial_weights", refuse)
    config, kind = CASES[case]
    with torch.device("meta"):
        model = torch_model(config, kind, seed=None)
    assert all(p.is_meta for p in model.parameters())
