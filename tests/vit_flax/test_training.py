"""What only the Flax twin's gradient checkpointing has: the blocks recomputed one at a
time in a loop (a checkpointed `lax.scan` step), the same params tree, the compiled step's
temporaries cut, and `forward_intermediates` through it.

That checkpointing leaves the gradients as they are, and stochastic depth, are tested for
both twins in tests/twins/.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from vit_test_support import tiny_config

from vit_flax import FlaxViTForImageClassification, FlaxViTModel

CONFIG = tiny_config(layerscale_value=0.3)
PIXELS = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)


def gradient_jaxpr(model: FlaxViTForImageClassification, pixels: np.ndarray) -> str:
    def loss(params: dict) -> jax.Array:
        labels = jnp.zeros(len(pixels), jnp.int32)
        return model(pixels, labels=labels, params=params, train=True).loss

    return str(jax.make_jaxpr(jax.grad(loss))(model.params))


def step_temporaries(model: FlaxViTForImageClassification, pixels: np.ndarray) -> int:
    """Bytes of temporaries XLA allocates for the compiled gradient of a loss."""

    def loss(params: dict) -> jax.Array:
        labels = jnp.zeros(len(pixels), jnp.int32)
        return model(pixels, labels=labels, params=params, train=True).loss

    compiled = jax.jit(jax.grad(loss)).lower(model.params).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_the_blocks_are_recomputed_in_a_loop_with_the_same_params() -> None:
    """jax prints the remat primitive as `checkpoint`, or `remat2` in jax 0.10."""
    model = FlaxViTForImageClassification(CONFIG)
    params = model.params
    remat = r"\b(?:checkpoint|remat\d*)\["
    assert not re.findall(remat, gradient_jaxpr(model, PIXELS))
    model.gradient_checkpointing_enable()
    assert model.module.gradient_checkpointing
    traced = gradient_jaxpr(model, PIXELS)
    assert re.findall(remat, traced) and "scan[" in traced
    assert model.params is params  # the same tree: the stored `layers_{i}` names stay
    fresh = jax.eval_shape(model.module.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    assert jax.tree.structure(fresh["params"]) == jax.tree.structure(params)
    model.gradient_checkpointing_disable()
    assert not re.findall(remat, gradient_jaxpr(model, PIXELS))


def test_checkpointing_cuts_the_compiled_steps_temporaries() -> None:
    """Eight blocks at 8 x 8 patches: what XLA keeps for the backward pass falls by more
    than 3x (3.8x when written: one block's activations live at a time instead of eight).
    Unrolled blocks under `jax.checkpoint` alone compiled to the same bytes on XLA's CPU
    backend: this is what the scan is for."""
    config = tiny_config(
        num_hidden_layers=8,
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
    )
    model = FlaxViTForImageClassification(config)
    pixels = np.zeros((8, 3, 32, 32), np.float32)
    plain = step_temporaries(model, pixels)
    model.gradient_checkpointing_enable()
    assert step_temporaries(model, pixels) * 3 < plain


def test_forward_intermediates_runs_through_the_checkpointed_blocks() -> None:
    """The same blocks' outputs, and the same gradients of a loss on them, with it on."""
    model = FlaxViTModel(CONFIG)

    def loss(params: dict) -> tuple[jax.Array, list[jax.Array]]:
        final, states = model.forward_intermediates(PIXELS, indices=[0, 1], params=params)
        return final.sum() + sum(jnp.square(s).sum() for s in states), states

    (value, states), grads = jax.value_and_grad(loss, has_aux=True)(model.params)
    model.gradient_checkpointing_enable()
    (checkpointed_value, checkpointed_states), checkpointed_grads = jax.value_and_grad(
        loss, has_aux=True
    )(model.params)
    np.testing.assert_allclose(checkpointed_value, value, rtol=1e-6)
    for got, want in zip(checkpointed_states, states, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # XLA fuses it otherwise
    for got, want in zip(jax.tree.leaves(checkpointed_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
