"""What only the torch twin's gradient checkpointing has: it acts only in training with
gradients enabled (as transformers' does), and `forward_intermediates` runs through it.

That checkpointing leaves the gradients as they are, and stochastic depth, are tested for
both twins in tests/twins/.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from vit_test_support import tiny_config

import vit_torch.modeling
from vit_torch import ViTForImageClassification

pytestmark = pytest.mark.usefixtures("torch_one_thread")
CONFIG = tiny_config(num_hidden_layers=3, layerscale_value=0.3)
PIXELS = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def counting_checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one per block the encoder runs through `checkpoint`."""
    calls: list[int] = []
    real = vit_torch.modeling.checkpoint

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        assert kwargs == {"use_reentrant": False}
        return real(*args, **kwargs)

    monkeypatch.setattr(vit_torch.modeling, "checkpoint", counted)
    return calls


def test_checkpointing_acts_in_training_with_gradients_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = counting_checkpoints(monkeypatch)
    model = ViTForImageClassification(CONFIG, seed=0)
    model.gradient_checkpointing_enable()
    model.eval()(PIXELS)
    with torch.no_grad():
        model.train()(PIXELS)
    assert not calls
    model.train()(PIXELS).logits.sum().backward()
    assert len(calls) == CONFIG.num_hidden_layers
    model.gradient_checkpointing_disable()
    model(PIXELS)
    assert len(calls) == CONFIG.num_hidden_layers


def test_forward_intermediates_runs_through_the_checkpointed_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same blocks' outputs, and the same gradients of a loss on them, with it on."""
    model = ViTForImageClassification(CONFIG, seed=0).train()

    def run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        final, states = model.forward_intermediates(PIXELS, indices=[0, 2], norm=True)
        (final.square().sum() + sum(s.square().sum() for s in states)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return [final.detach(), *(s.detach() for s in states)], grads

    outputs, grads = run()
    calls = counting_checkpoints(monkeypatch)
    model.gradient_checkpointing_enable()
    checkpointed_outputs, checkpointed_grads = run()
    assert len(calls) == CONFIG.num_hidden_layers
    for got, want in zip(checkpointed_outputs, outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert checkpointed_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-6, atol=1e-9, msg=name)
