"""Both twins as models (once per `backend`): dropout only in training, the loss reaches
every parameter, output records read like transformers', and no labels means no head.

Framework-only behaviour (Flax's params pytree, jit, its explicit dropout rng) is in
tests/vit_flax/test_modeling.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from twin_adapters import Twin
from vit_test_support import TINY_DROPOUT_CONFIG

CONFIG = TINY_DROPOUT_CONFIG
PIXELS = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)


def test_dropout_only_in_training(backend: Twin) -> None:
    model = backend.build(CONFIG)
    np.testing.assert_array_equal(
        backend.run(model, PIXELS).logits, backend.run(model, PIXELS).logits
    )
    train_a = backend.run(model, PIXELS, train=True, draw=0).logits
    assert not np.array_equal(train_a, backend.run(model, PIXELS, train=True, draw=1).logits)
    np.testing.assert_array_equal(train_a, backend.run(model, PIXELS, train=True, draw=0).logits)


def test_loss_in_training_reaches_every_parameter(backend: Twin) -> None:
    """With dropout on (Flax's jitted gradients in inference: tests/vit_flax/)."""
    model = backend.build(CONFIG)
    _, grads = backend.gradients(model, PIXELS, np.array([0, 2]), train=True)
    assert grads.keys() == backend.weights(model).keys()
    unreached = [n for n, g in grads.items() if g is None or not np.abs(g).sum() > 0]
    assert not unreached


def test_output_records_read_like_transformers(backend: Twin) -> None:
    model = backend.build(CONFIG, head="pooler")
    out = backend.run(model, PIXELS[:1], output_hidden_states=True)
    assert list(out) == ["last_hidden_state", "pooler_output", "hidden_states"]
    assert out["pooler_output"] is out.pooler_output and out[0] is out.last_hidden_state
    assert len(out.hidden_states) == CONFIG.num_hidden_layers + 1
    full = backend.run(model, PIXELS, output_hidden_states=True, output_attentions=True)
    assert list(full) == ["last_hidden_state", "pooler_output", "hidden_states", "attentions"]
    assert full.attentions[0].shape == (2, 2, 5, 5)
    as_tuple = backend.run(model, PIXELS[:1], return_dict=False)
    assert len(as_tuple) == 2 and as_tuple[1].shape == (1, 16)


def test_no_labels_means_identity_classifier(backend: Twin) -> None:
    config = dataclasses.replace(CONFIG, num_labels=0, id2label=None, label2id=None)
    assert config.num_labels == 0
    assert backend.run(backend.build(config), PIXELS).logits.shape == (2, 16)
