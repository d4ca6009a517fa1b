"""What only the Flax twin's gradient checkpointing has: `nn.remat` around each block of the
traced computation, the same params tree, and `forward_intermediates` through it.

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


def remat_blocks(model: FlaxViTForImageClassification) -> int:
    """How many remat calls the traced gradient of a loss holds (jax prints the primitive
    as `checkpoint`, or `remat2` in jax 0.10)."""

    def loss(params: dict) -> jax.Array:
        return model(PIXELS, labels=jnp.array([0, 1]), params=params, train=True).loss

    return len(
        re.findall(
            r"\b(?:checkpoint|remat\d*)\[", str(jax.make_jaxpr(jax.grad(loss))(model.params))
        )
    )


def test_each_block_is_rematerialised_with_the_same_params() -> None:
    model = FlaxViTForImageClassification(CONFIG)
    params = model.params
    assert remat_blocks(model) == 0
    model.gradient_checkpointing_enable()
    assert model.module.gradient_checkpointing
    assert remat_blocks(model) == CONFIG.num_hidden_layers
    assert model.params is params  # the same tree: nn.remat keeps every block's name
    fresh = jax.eval_shape(model.module.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    assert jax.tree.structure(fresh["params"]) == jax.tree.structure(params)
    model.gradient_checkpointing_disable()
    assert remat_blocks(model) == 0


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
