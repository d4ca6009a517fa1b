"""A model fine-tuned in one framework, saved with `save_pretrained`, predicts the same in
the other: the examples' own fine-tuning (examples/finetune_*.py), a few steps each, on
the shipped digits model loaded at 16x16 (position grid resampled at load time)."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from vit_core import ViTConfig, ViTImageProcessor, load

ATOL = 1e-5  # logits, fine-tuned model in memory vs the saved folder in the other framework
STEPS = 3


@pytest.fixture(scope="module")
def settings_and_data(examples: dict[str, ModuleType]) -> tuple:
    digits = examples["digits_data"]
    settings = digits.Settings(max_steps=STEPS, batch_size=32, learning_rate=1e-3)
    return settings, digits.load_digits_data(settings)


def changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> int:
    return sum(not np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.usefixtures("torch_one_thread")
def test_flax_fine_tune_loads_in_torch_with_the_same_predictions(
    examples: dict[str, ModuleType], settings_and_data: tuple, tmp_path: Path
) -> None:
    from vit_flax.weights import internal_weights

    flax_example = examples["finetune_flax"]
    settings, data = settings_and_data
    model = flax_example.load_model(settings)
    start = internal_weights(model.params)
    losses = flax_example.finetune(model, data, settings, progress=False)
    assert len(losses) == STEPS
    assert changed(start, internal_weights(model.params)) == len(start)  # every tensor trained
    model.save_pretrained(tmp_path)
    assert ViTConfig.from_pretrained(tmp_path).image_size == 16
    reloaded = load(tmp_path, backend="torch")
    expected = flax_example.predict(model, data.test_pixels)
    actual = examples["finetune_torch"].predict(reloaded, data.test_pixels)
    assert float(np.abs(actual - expected).max()) <= ATOL
    np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.usefixtures("torch_one_thread")
def test_torch_fine_tune_loads_in_flax_with_the_same_predictions(
    examples: dict[str, ModuleType], settings_and_data: tuple, tmp_path: Path
) -> None:
    from vit_torch.weights import internal_weights

    torch_example = examples["finetune_torch"]
    settings, data = settings_and_data
    model = torch_example.load_model(settings)
    start = {k: v.copy() for k, v in internal_weights(model).items()}  # not views
    losses = torch_example.finetune(model, data, settings, progress=False)
    assert len(losses) == STEPS
    assert changed(start, internal_weights(model)) == len(start)
    model.save_pretrained(tmp_path)
    reloaded = load(tmp_path, backend="flax")
    expected = torch_example.predict(model, data.test_pixels)
    actual = examples["finetune_flax"].predict(reloaded, data.test_pixels)
    assert float(np.abs(actual - expected).max()) <= ATOL
    np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_example_command_line(
    examples: dict[str, ModuleType],
    framework: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--out` writes a folder (weights, 16x16 config, 16x16 processor); both accuracies print."""
    threads = torch.get_num_threads()
    try:
        examples[f"finetune_{framework}"].main(["--max-steps", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the torch example sets one thread for itself
    printed = capsys.readouterr().out
    before = re.search(r"accuracy before \(resampled, not trained\): ([\d.]+) %", printed)
    after = re.search(r"accuracy after 1 steps \([\d.]+ s\): ([\d.]+) %", printed)
    assert before and after, printed
    assert 80 < float(before[1]) < 95  # 88.61 % on the reference machine, in both frameworks
    assert ViTConfig.from_pretrained(tmp_path).image_hw == (16, 16)
    assert ViTImageProcessor.from_pretrained(tmp_path).size == {"height": 16, "width": 16}
