"""Gradient checkpointing in both twins (once per `backend`): transformers' switch names and
timm's alias, and the same loss and every parameter's gradient with it on as off.

The step runs in training mode with dropout, attention dropout and drop path all on, so a
recomputed block must draw the masks its forward drew (torch restores the RNG state; Flax
hands the block the same rngs) for the gradients to agree. Weights are the oracle's
perturbation of a seeded init, so every gradient is far from zero.
"""

from __future__ import annotations

import numpy as np
from twin_adapters import Twin
from vit_test_support import record_max_diff, tiny_config

CONFIG = tiny_config(  # two blocks
    layerscale_value=0.3,
    num_register_tokens=1,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    drop_path_rate=0.4,
)
PIXELS = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1])
TOL = 1e-5  # max |g_checkpointed - g| of each tensor, relative to that tensor's scale


def test_the_switches(backend: Twin) -> None:
    model = backend.build(CONFIG)
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    model.set_grad_checkpointing()  # timm's name; enable=True by default, as there
    assert model.is_gradient_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.is_gradient_checkpointing


def test_every_gradient_is_the_same_with_checkpointing(backend: Twin, oracle: object) -> None:
    model = backend.perturb(oracle, backend.build(CONFIG, seed=3), seed=3)
    loss, grads = backend.gradients(model, PIXELS, LABELS, train=True, draw=7)
    assert loss != float(backend.run(model, PIXELS, labels=LABELS).loss)  # the masks acted
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed = backend.gradients(model, PIXELS, LABELS, train=True, draw=7)
    assert abs(checkpointed_loss - loss) <= 1e-6 * abs(loss)
    assert checkpointed.keys() == grads.keys()
    for name, grad in grads.items():
        assert grad is not None and checkpointed[name] is not None, name
        scale = float(np.abs(grad).max())
        assert scale > 0, name
        diff = float(np.abs(checkpointed[name] - grad).max())
        record_max_diff(f"gradient checkpointing, {backend.name}: gradients", diff)
        assert diff <= TOL * scale, f"{name}: max abs diff {diff:.3g}, scale {scale:.3g}"
