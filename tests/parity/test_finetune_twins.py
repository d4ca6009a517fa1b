"""The twins fine-tune alike: the same `finetune` run (tests/conftest.py's `finetuned`:
three epochs from the shipped digits model, warm-up + cosine, layer decay, label
smoothing, random crops) in PyTorch and in Flax takes the same steps, and a fine-tuned
folder predicts the same in the other framework.

Bounds (measured in brackets): every weight within WEIGHT_ATOL (2.4e-7), the key biases
aside (`vit_test_support.KEY_BIAS`: moved apart by rounding noise, 3.6e-4 here, with no
effect on any output); the logits on the validation digits within LOGIT_ATOL (5.6e-6);
each epoch's mean loss within LOSS_RTOL relative (1.6e-6); the same validation top-1. A
folder fine-tuned in one twin, run by the other: float32 parity, TOL (4.8e-7).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vit_test_support import finetune_differences, folder_pixels, record_max_diff

from vit_core import load
from vit_core.backend import get_backend

WEIGHT_ATOL = 1e-5
LOGIT_ATOL = 1e-5
LOSS_RTOL = 1e-5
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_the_twins_take_the_same_steps(finetuned: Any, digits_folder: Path) -> None:
    torch_run, flax_run = finetuned("torch"), finetuned("flax")
    pixels = folder_pixels(digits_folder / "val", torch_run.out)
    diffs = finetune_differences(torch_run.out, flax_run.out, ("torch", "flax"), pixels)
    for what in ("weights", "logits"):  # absolute, as the table's (loss: relative)
        record_max_diff(f"finetune torch vs flax: {what}", diffs[what])
    assert diffs["weights"] <= WEIGHT_ATOL, diffs
    assert diffs["logits"] <= LOGIT_ATOL, diffs
    assert diffs["loss"] <= LOSS_RTOL, diffs
    accuracy = [
        [h["val_top1"] for h in json.loads((run.out / "finetune.json").read_text())["history"]]
        for run in (torch_run, flax_run)
    ]
    assert accuracy[0] == accuracy[1]


@pytest.mark.parametrize(("trained", "other"), [("torch", "flax"), ("flax", "torch")])
def test_a_finetuned_folder_predicts_the_same_in_the_other_twin(
    finetuned: Any, digits_folder: Path, trained: str, other: str
) -> None:
    folder = finetuned(trained).out
    pixels = folder_pixels(digits_folder / "val", folder)
    logits = [
        get_backend(b).run(load(folder, backend=b), pixels)["logits"] for b in (trained, other)
    ]
    diff = float(np.abs(logits[0] - logits[1]).max())
    record_max_diff(f"finetuned in {trained}, run in {other}: logits", diff)
    assert diff <= TOL
    np.testing.assert_array_equal(logits[0].argmax(-1), logits[1].argmax(-1))
