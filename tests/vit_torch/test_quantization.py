"""int8 inference, `load(..., quantize="int8")`: what it replaces, what it costs in
accuracy on real data, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from vit_test_support import SHIPPED

import vit_core
from vit_core.cli import HELDOUT, read_heldout


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_heldout(SHIPPED.parent / HELDOUT)
    processor = vit_core.ViTImageProcessor.from_pretrained(SHIPPED)
    return processor(list(images), return_tensors="np")["pixel_values"], labels


def _logits(model: nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(pixels)).logits.numpy()


def test_encoder_linears_become_int8_and_the_head_stays_float() -> None:
    model = vit_core.load(SHIPPED, quantize="int8")
    encoder = model.vit.encoder
    assert all(type(m) is not nn.Linear for m in encoder.modules())
    assert sum(isinstance(m, Int8Linear) for m in encoder.modules()) == 4 * len(encoder.layers)
    assert type(model.classifier) is nn.Linear and not model.training


def test_int8_agrees_with_float32_on_the_heldout_digits(
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    pixels, labels = heldout
    full = _logits(vit_core.load(SHIPPED), pixels)
    int8 = _logits(vit_core.load(SHIPPED, quantize="int8"), pixels)
    agreement = float(np.mean(full.argmax(1) == int8.argmax(1)))
    print(f"int8 vs float32, {len(labels)} held-out digits: top-1 agreement {agreement:.4f}, "
          f"max logit diff {np.abs(full - int8).max():.3g}")  # fmt: skip
    assert agreement >= 0.99
    assert np.mean(int8.argmax(1) == labels) >= np.mean(full.argmax(1) == labels) - 0.01
    assert np.abs(full - int8).max() < 0.25 * np.abs(full).max()


def test_int8_still_returns_attentions_and_hidden_states(
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    model = vit_core.load(SHIPPED, quantize="int8")
    with torch.inference_mode():
        out = model(torch.from_numpy(heldout[0][:2]), output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(out.attentions[0].shape[:-1]))


def test_an_int8_model_is_not_saved_as_if_it_were_float(tmp_path: Path) -> None:
    model = vit_core.load(SHIPPED, quantize="int8")
    with pytest.raises(vit_core.ViTError, match="int8-quantized.*save the float32 model"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantize": "int4"}, "unknown quantize 'int4'"),
        ({"quantize": "int8", "backend": "flax"}, "runs on the torch backend"),
        ({"quantize": "int8", "dtype": "bfloat16"}, "cannot be combined with dtype"),
    ],
)
def test_quantize_refuses_what_it_cannot_do(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vit_core.load(SHIPPED, **kwargs)
