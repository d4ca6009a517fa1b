"""Both twins train (once per `backend`): dropout comes from the config and acts only in
training, at the configured rate, and a short AdamW fine-tune of the shipped digits model
on real digits lowers the loss.

Flax's explicit dropout rng (needed only with dropout) is tested in tests/vit_flax/.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from twin_adapters import Twin
from vit_test_support import SHIPPED, TINY_DROPOUT_CONFIG, training_digits

from vit_core import ViTConfig, load

# The model tests' tiny config, one layer of 2x2 patches, no dropout.
CONFIG = dataclasses.replace(
    TINY_DROPOUT_CONFIG,
    num_hidden_layers=1,
    patch_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
PIXELS = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)


def with_dropout(hidden: float, attention: float) -> ViTConfig:
    return dataclasses.replace(
        CONFIG, hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention
    )


def test_dropout_comes_from_the_config_and_acts_only_in_training(backend: Twin) -> None:
    base = backend.build(CONFIG)
    reference = backend.run(base, PIXELS).logits
    # no dropout configured: training mode computes the inference function
    np.testing.assert_array_equal(backend.run(base, PIXELS, train=True).logits, reference)
    for hidden, attention in ((0.3, 0.0), (0.0, 0.3)):
        model = backend.with_config(base, with_dropout(hidden, attention))
        train_a = backend.run(model, PIXELS, train=True, draw=0).logits
        train_b = backend.run(model, PIXELS, train=True, draw=1).logits
        assert not np.array_equal(train_a, train_b), (hidden, attention)
        np.testing.assert_array_equal(  # the draw decides
            backend.run(model, PIXELS, train=True, draw=0).logits, train_a
        )
        # attention dropout also on the path that returns the probabilities (torch's
        # fused kernel returns none)
        probs = backend.run(model, PIXELS, train=True, output_attentions=True).attentions[0]
        assert bool((probs == 0).any()) == (attention > 0)
        np.testing.assert_array_equal(backend.run(model, PIXELS).logits, reference)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_rate_is_the_configured_one(backend: Twin, p: float) -> None:
    """Embedding dropout zeroes a fraction p of the tokens' entries, scales the rest by 1/(1-p)."""
    model = backend.build(with_dropout(p, 0.0), seed=1)
    pixels = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
    kept = backend.embeddings(model, pixels, train=False)
    dropped = backend.embeddings(model, pixels, train=True, draw=1)
    zeroed = (dropped == 0) & (kept != 0)
    assert abs(float(zeroed.mean()) - p) < 0.02
    np.testing.assert_allclose(dropped[~zeroed], kept[~zeroed] / (1 - p), rtol=1e-6)


def test_finetuning_on_digits_lowers_the_loss(backend: Twin) -> None:
    """A new head on the shipped encoder (load's num_labels=), dropout on, AdamW, 12 steps."""
    pixels, labels = training_digits(200)
    loaded = load(SHIPPED, backend=backend.name, num_labels=10, seed=0)
    config = dataclasses.replace(
        loaded.config, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )
    model = backend.with_config(loaded, config)
    before = float(backend.run(model, pixels, labels=labels).loss)
    step = backend.trainer(model, lr=2e-3, weight_decay=0.01)
    order, losses = np.random.default_rng(0), []
    for _ in range(3):
        for index in np.split(order.permutation(len(labels)), 4):
            losses.append(step(pixels[index], labels[index], len(losses)))
    after = float(backend.run(model, pixels, labels=labels).loss)
    assert before > 1.5  # a fresh head: about log(10)
    assert after < 0.5 * before, (before, after, losses)
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), str([round(v, 3) for v in losses])
