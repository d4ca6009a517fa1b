"""Gradient parity: PyTorch autograd and `jax.grad` agree on the loss and every gradient.

Each example draws a small architecture with `vit_test_support.architectures`, gives it a
classifier head for one of transformers' three problem types (single-label
cross-entropy, multi-label binary cross-entropy, regression MSE), writes random
canonical weights with `vit_test_support.random_canonical_weights`, loads the folder in both
backends and differentiates the loss of the same batch and labels. Dropout is off:
either the config has none and both run in training mode, or it has some and both run
in inference mode (torch `.eval()`, Flax `train=False`).

Flax gradients come back as a params-shaped tree; `vit_flax.weights.internal_weights`
turns it into torch names and orientations, so each tensor is compared with the
`.grad` of the torch parameter of the same name.

The bound, per tensor: max|g_torch - g_flax| <= RTOL * max|g_torch| (relative to the
tensor's own scale), widened only by float32's own error on that tensor. Some drawn
examples are ill-conditioned in float32 (4-wide LayerNorms, a single token): there each
twin alone misses float64 autograd by up to ~5e-4 of a tensor's scale, and no float32
implementation could agree with another to 1e-5. So each example also runs torch in
float64, and a tensor may exceed RTOL only by twice torch's float32 error against that
reference (a Flax bug would not hide there: it would have to stay within torch's own
rounding). Typical examples agree to ~1e-6 of each tensor's scale.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vit_test_support import architectures, write_folder

from vit_core import ViTConfig, load
from vit_core.layout import ModelKind
from vit_flax.weights import internal_weights

RTOL = 1e-5
FLOOR = 1e-9  # absolute slack for gradients that are zero up to rounding (the key bias's)
PROBLEMS = ("single_label_classification", "multi_label_classification", "regression")
# Reported at the end of the module: worst twin difference relative to each tensor's scale
# (all examples, and those where torch float32 is within RTOL / 10 of float64), worst
# absolute difference, worst loss difference.
WORST = {"relative": 0.0, "well_conditioned": 0.0, "absolute": 0.0, "loss": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _report_worst() -> object:
    yield
    print(
        f"\ngradient parity: worst per-tensor max|g_t - g_f| / max|g_t| {WORST['relative']:.3g}"
        f" ({WORST['well_conditioned']:.3g} where float32 resolves the tensor to {RTOL / 10:g};"
        f" bound {RTOL}), worst max abs diff {WORST['absolute']:.3g},"
        f" worst loss diff {WORST['loss']:.3g}"
    )


@st.composite
def problems(draw: st.DrawFn) -> tuple[ViTConfig, ModelKind, str]:
    """An architecture from vit_test_support, given a head and labels for one problem type."""
    config, _ = draw(architectures())
    problem = draw(st.sampled_from(PROBLEMS))
    if problem == "regression":
        num_labels = draw(st.sampled_from([1, 3]))
    else:
        num_labels = draw(st.sampled_from([2, 3, 5]))
    # problem_type=None lets the labels' dtype choose, as transformers does; set it
    # explicitly where None would resolve to something else (regression with 3 outputs).
    explicit = draw(st.booleans()) or (problem == "regression" and num_labels != 1)
    dropout = draw(st.sampled_from([0.0, 0.1]))
    config = dataclasses.replace(
        config,
        num_labels=num_labels,
        id2label=None,
        label2id=None,
        problem_type=problem if explicit else None,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return config, ModelKind(classifier=True, pooler=config.classifier_uses_pooler), problem


def make_labels(rng: np.random.Generator, problem: str, batch: int, num_labels: int) -> np.ndarray:
    if problem == "single_label_classification":
        return rng.integers(0, num_labels, batch).astype(np.int64)
    if problem == "multi_label_classification":
        return rng.integers(0, 2, (batch, num_labels)).astype(np.float32)
    shape = (batch,) if num_labels == 1 else (batch, num_labels)
    return rng.standard_normal(shape).astype(np.float32)


def compare(
    torch_grads: dict[str, np.ndarray],
    flax_grads: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
) -> None:
    """Every tensor within RTOL of its scale, or within twice torch's own float32 error."""
    assert torch_grads.keys() == flax_grads.keys() == reference.keys()
    for name, expected in torch_grads.items():
        actual = flax_grads[name]
        assert actual.shape == expected.shape, name
        diff = float(np.abs(actual - expected).max())
        scale = float(np.abs(expected).max())
        float32_error = float(np.abs(expected - reference[name]).max())
        relative = diff / scale if scale > FLOOR else 0.0
        WORST["absolute"] = max(WORST["absolute"], diff)
        WORST["relative"] = max(WORST["relative"], relative)
        if float32_error <= RTOL / 10 * scale:
            WORST["well_conditioned"] = max(WORST["well_conditioned"], relative)
        assert diff <= RTOL * scale + 2 * float32_error + FLOOR, (
            f"{name}: max abs diff {diff:.3g}, {relative:.3g} of the gradient's scale "
            f"{scale:.3g} (torch float32 vs float64: {float32_error:.3g})"
        )


def torch_gradients(model: torch.nn.Module, pixels: np.ndarray, labels: np.ndarray) -> tuple:
    """(loss, {name: gradient as float64}) of one backward pass in the model's dtype."""
    dtype = next(model.parameters()).dtype
    target = torch.from_numpy(labels)
    target = target.to(dtype) if target.is_floating_point() else target
    loss = model(torch.from_numpy(pixels).to(dtype), labels=target).loss
    loss.backward()
    return loss.item(), {n: p.grad.double().numpy() for n, p in model.named_parameters()}


@pytest.mark.usefixtures("torch_one_thread")
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_loss_and_every_gradient_agree(
    problem: tuple[ViTConfig, ModelKind, str], batch: int, seed: int
) -> None:
    config, kind, problem_type = problem
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), config, kind, seed)
        torch_model = load(tmp, backend="torch", model_type="classification")
        reference = load(tmp, backend="torch", model_type="classification", dtype="float64")
        flax_model = load(tmp, backend="flax", model_type="classification")
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, config.num_channels, *config.image_hw), np.float32)
    labels = make_labels(rng, problem_type, batch, config.num_labels)
    assert config.resolved_problem_type(labels.dtype == np.int64) == problem_type
    train = config.hidden_dropout_prob == 0.0  # dropout off either way
    torch_loss, torch_grads = torch_gradients(torch_model.train(train), pixels, labels)
    _, reference_grads = torch_gradients(reference.train(train), pixels, labels)

    def loss_fn(params: dict) -> jax.Array:
        return flax_model(pixels, labels=jnp.asarray(labels), params=params, train=train).loss

    flax_loss, grads = jax.value_and_grad(loss_fn)(flax_model.params)

    loss_diff = abs(float(flax_loss) - torch_loss)
    WORST["loss"] = max(WORST["loss"], loss_diff)
    assert loss_diff <= RTOL * max(1.0, abs(torch_loss)), f"loss differs by {loss_diff:.3g}"
    compare(torch_grads, internal_weights(grads), reference_grads)
