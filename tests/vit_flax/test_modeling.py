"""What only the Flax twin has: a params pytree, jit, and dropout through an explicit rng.

What both twins do (dropout only in training, gradients, output records, training) is
tested once for both in tests/twins/.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vit_test_support import TINY_DROPOUT_CONFIG

from vit_core import InputError, ViTConfig
from vit_flax import FlaxViTForImageClassification, FlaxViTModel

CONFIG = TINY_DROPOUT_CONFIG
PIXELS = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)


def with_dropout(hidden: float, attention: float) -> ViTConfig:
    return dataclasses.replace(
        CONFIG, hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention
    )


@pytest.mark.parametrize(("hidden", "attention"), [(0.3, 0.0), (0.0, 0.3), (0.3, 0.3)])
def test_training_with_dropout_needs_a_dropout_rng(hidden: float, attention: float) -> None:
    model = FlaxViTForImageClassification(with_dropout(hidden, attention))
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        model(PIXELS, train=True)


def test_training_without_dropout_needs_no_rng() -> None:
    """No dropout configured: training mode is the inference function."""
    model = FlaxViTForImageClassification(with_dropout(0.0, 0.0))
    np.testing.assert_array_equal(model(PIXELS, train=True).logits, model(PIXELS).logits)


def test_jit_and_grad_over_params() -> None:
    model = FlaxViTForImageClassification(CONFIG)
    labels = jnp.array([0, 2])

    @jax.jit
    def loss_fn(params: dict) -> jax.Array:
        return model(PIXELS, labels=labels, params=params).loss

    grads = jax.grad(loss_fn)(model.params)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(model.params)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))


def test_params_are_a_pytree_with_twin_names() -> None:
    params = FlaxViTForImageClassification(CONFIG).params
    layer = params["vit"]["encoder"]["layers_1"]
    assert layer["attention"]["qkv"]["kernel"].shape == (16, 48)
    assert layer["norm1"]["scale"].shape == (16,)
    assert params["vit"]["embeddings"]["patch_embeddings"]["kernel"].shape == (4, 4, 3, 16)


def test_wrong_size_is_refused_before_tracing() -> None:
    with pytest.raises(InputError, match="does not match the model's 8x8"):
        FlaxViTModel(CONFIG)(np.zeros((1, 3, 12, 12), np.float32))
