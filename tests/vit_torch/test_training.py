"""The torch twin trains: dropout from the config in training mode only, and a short
fine-tune of the shipped digits model on real digits lowers the loss (twin of
tests/vit_flax/test_training.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from vit_test_support import SHIPPED, training_digits

from vit_core import ViTConfig, load
from vit_torch import ViTForImageClassification

CONFIG = ViTConfig(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=8,
    patch_size=2,
    num_labels=3,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def with_dropout(hidden: float, attention: float) -> ViTConfig:
    return dataclasses.replace(
        CONFIG, hidden_dropout_prob=hidden, attention_probs_dropout_prob=attention
    )


def same_weights(config: ViTConfig, source: torch.nn.Module) -> ViTForImageClassification:
    model = ViTForImageClassification(config)
    model.load_state_dict(source.state_dict())
    return model


def test_dropout_comes_from_the_config_and_acts_only_in_training() -> None:
    torch.manual_seed(0)
    base = ViTForImageClassification(CONFIG)
    pixels = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        reference = base.eval()(pixels).logits
        assert torch.equal(base.train()(pixels).logits, reference)  # no dropout configured
        for hidden, attention in ((0.3, 0.0), (0.0, 0.3)):
            model = same_weights(with_dropout(hidden, attention), base)
            train_a, train_b = model.train()(pixels).logits, model(pixels).logits
            assert not torch.equal(train_a, train_b), (hidden, attention)
            # attention dropout also on the path that returns the probabilities
            probs = model(pixels, output_attentions=True).attentions[0]
            assert (probs == 0).any() == (attention > 0)
            torch.testing.assert_close(model.eval()(pixels).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_rate_is_the_configured_one(p: float) -> None:
    """Embedding dropout zeroes a fraction p of the tokens' entries, scales the rest by 1/(1-p)."""
    torch.manual_seed(1)
    embeddings = ViTForImageClassification(with_dropout(p, 0.0)).vit.embeddings
    pixels = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        kept = embeddings.eval()(pixels, False)
        dropped = embeddings.train()(pixels, False)
    zeroed = (dropped == 0) & (kept != 0)
    assert abs(float(zeroed.float().mean()) - p) < 0.02
    torch.testing.assert_close(dropped[~zeroed], kept[~zeroed] / (1 - p))


def test_finetuning_on_digits_lowers_the_loss() -> None:
    """A new head on the shipped encoder (load's num_labels=), dropout on, AdamW, 12 steps."""
    pixels, labels = (torch.from_numpy(a) for a in training_digits(200))
    loaded = load(SHIPPED, backend="torch", num_labels=10, seed=0)
    config = dataclasses.replace(
        loaded.config, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1
    )
    model = same_weights(config, loaded)
    torch.manual_seed(0)

    def eval_loss() -> float:
        with torch.no_grad():
            return model.eval()(pixels, labels=labels).loss.item()

    before = eval_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(3):
        for index in torch.randperm(len(labels), generator=generator).split(50):
            loss = model(pixels[index], labels=labels[index]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    after = eval_loss()
    assert before > 1.5  # a fresh head: about log(10)
    assert after < 0.5 * before, (before, after, losses)
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), str([round(v, 3) for v in losses])
