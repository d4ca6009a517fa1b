"""The Flax twin trains: dropout from the config only with `train=True` and a dropout rng,
and a short optax fine-tune of the shipped digits model on real digits lowers the loss
(twin of tests/vit_torch/test_training.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from vit_test_support import SHIPPED, training_digits

from vit_core import ViTConfig, load
from vit_flax import FlaxViTForImageClassification
from vit_flax.modeling import ViTEmbeddings

CONFIG = ViTConfig(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=8,
    patch_size=2,
    num_labels=3,
)
PIXELS = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)


def with_dropout(hidden: float, attention: float) -> ViTConfig:
    return dataclasses.replace(
        CONFIG, hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention
    )


def same_weights(config: ViTConfig, params: Any) -> FlaxViTForImageClassification:
    model = FlaxViTForImageClassification(config, _do_init=False)
    model.params = params
    return model


def test_dropout_comes_from_the_config_and_acts_only_in_training() -> None:
    base = FlaxViTForImageClassification(CONFIG)
    reference = np.asarray(base(PIXELS).logits)
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    # no dropout configured: training mode is the inference function, and needs no rng
    np.testing.assert_array_equal(base(PIXELS, train=True).logits, reference)
    for hidden, attention in ((0.3, 0.0), (0.0, 0.3)):
        model = same_weights(with_dropout(hidden, attention), base.params)

        def train(key: jax.Array, model: FlaxViTForImageClassification = model) -> Any:
            return model(PIXELS, train=True, dropout_rng=key, output_attentions=True)

        train_a = train(key_a)
        assert not np.array_equal(train_a.logits, train(key_b).logits)
        np.testing.assert_array_equal(train_a.logits, train(key_a).logits)  # the rng decides
        assert bool((train_a.attentions[0] == 0).any()) == (attention > 0)
        np.testing.assert_array_equal(model(PIXELS).logits, reference)
        with pytest.raises(ValueError, match="needs a dropout_rng"):
            model(PIXELS, train=True)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_rate_is_the_configured_one(p: float) -> None:
    """Embedding dropout zeroes a fraction p of the tokens' entries, scales the rest by 1/(1-p)."""
    params = FlaxViTForImageClassification(with_dropout(p, 0.0)).params["vit"]["embeddings"]
    embeddings = ViTEmbeddings(with_dropout(p, 0.0))
    pixels = jnp.asarray(np.random.default_rng(1).standard_normal((64, 8, 8, 3)), jnp.float32)
    kept = np.asarray(embeddings.apply({"params": params}, pixels, False, True))
    dropped = np.asarray(
        embeddings.apply(
            {"params": params}, pixels, False, False, rngs={"dropout": jax.random.PRNGKey(1)}
        )
    )
    zeroed = (dropped == 0) & (kept != 0)
    assert abs(float(zeroed.mean()) - p) < 0.02
    np.testing.assert_allclose(dropped[~zeroed], kept[~zeroed] / (1 - p), rtol=1e-6)


def test_finetuning_on_digits_lowers_the_loss() -> None:
    """A new head on the shipped encoder (load's num_labels=), dropout on, optax adamw, 12 steps."""
    pixels, labels = (jnp.asarray(a) for a in training_digits(200))
    loaded = load(SHIPPED, backend="flax", num_labels=10, seed=0)
    config = dataclasses.replace(
        loaded.config, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )
    model = same_weights(config, loaded.params)
    optimizer = optax.adamw(2e-3, weight_decay=0.01)

    @jax.jit
    def step(params: Any, opt_state: Any, index: jax.Array, rng: jax.Array) -> tuple:
        def loss_fn(p: Any) -> jax.Array:
            return model(
                pixels[index], labels=labels[index], params=p, dropout_rng=rng, train=True
            ).loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    before = float(model(pixels, labels=labels).loss)
    params, opt_state = model.params, optimizer.init(model.params)
    order, key, losses = np.random.default_rng(0), jax.random.PRNGKey(0), []
    for _ in range(3):
        for index in np.split(order.permutation(len(labels)), 4):
            key, rng = jax.random.split(key)
            params, opt_state, loss = step(params, opt_state, jnp.asarray(index), rng)
            losses.append(float(loss))
    after = float(model(pixels, labels=labels, params=params).loss)
    assert before > 1.5  # a fresh head: about log(10)
    assert after < 0.5 * before, (before, after)
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), str([round(v, 3) for v in losses])
