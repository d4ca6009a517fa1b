"""The torch twin as a module: training mode, dropout, gradients, tuple outputs."""

from __future__ import annotations

import dataclasses

import torch
from vit_test_support import TINY_DROPOUT_CONFIG

from vit_torch import ViTForImageClassification, ViTModel

CONFIG = TINY_DROPOUT_CONFIG


def test_dropout_only_in_training_mode() -> None:
    torch.manual_seed(0)
    model = ViTForImageClassification(CONFIG)
    pixels = torch.randn(2, 3, 8, 8)
    model.train()
    assert not torch.equal(model(pixels).logits, model(pixels).logits)
    model.eval()
    assert torch.equal(model(pixels).logits, model(pixels).logits)


def test_loss_backpropagates_to_every_parameter() -> None:
    model = ViTForImageClassification(CONFIG).train()
    loss = model(torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_tuple_outputs_and_name_access() -> None:
    model = ViTModel(CONFIG).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 8, 8), output_hidden_states=True)
        as_tuple = model(torch.randn(1, 3, 8, 8), return_dict=False)
    assert list(out) == ["last_hidden_state", "pooler_output", "hidden_states"]
    assert out["pooler_output"] is out.pooler_output and out[0] is out.last_hidden_state
    assert len(out.hidden_states) == CONFIG.num_hidden_layers + 1
    assert len(as_tuple) == 2 and as_tuple[1].shape == (1, 16)


def test_no_labels_means_identity_classifier() -> None:
    config = dataclasses.replace(CONFIG, num_labels=0, id2label=None, label2id=None)
    assert config.num_labels == 0
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).logits.shape == (2, 16)
