"""The Flax twin as a model: a params pytree, jit, dropout through an rng, gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vit_test_support import TINY_DROPOUT_CONFIG

from vit_core import InputError
from vit_flax import FlaxViTForImageClassification, FlaxViTModel

CONFIG = TINY_DROPOUT_CONFIG
PIXELS = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)


def test_dropout_through_rng_only_when_training() -> None:
    model = FlaxViTForImageClassification(CONFIG)
    eval_a, eval_b = model(PIXELS).logits, model(PIXELS).logits
    np.testing.assert_array_equal(eval_a, eval_b)
    rng_a, rng_b = jax.random.split(jax.random.PRNGKey(0))
    train_a = model(PIXELS, train=True, dropout_rng=rng_a).logits
    assert not np.array_equal(train_a, model(PIXELS, train=True, dropout_rng=rng_b).logits)
    np.testing.assert_array_equal(train_a, model(PIXELS, train=True, dropout_rng=rng_a).logits)
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        model(PIXELS, train=True)


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


def test_outputs_like_transformers() -> None:
    model = FlaxViTModel(dataclasses.replace(CONFIG, hidden_dropout_prob=0.0))
    out = model(PIXELS, output_hidden_states=True, output_attentions=True)
    assert list(out) == ["last_hidden_state", "pooler_output", "hidden_states", "attentions"]
    assert out.attentions[0].shape == (2, 2, 5, 5)
    assert len(model(PIXELS, return_dict=False)) == 2


def test_wrong_size_is_refused_before_tracing() -> None:
    with pytest.raises(InputError, match="does not match the model's 8x8"):
        FlaxViTModel(CONFIG)(np.zeros((1, 3, 12, 12), np.float32))
