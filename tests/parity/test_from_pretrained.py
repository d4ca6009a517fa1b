"""`from_pretrained` builds the class it is called on, in both twins, subclasses included.

A subclass of the classification model loads as that subclass with its head (not as a
base model), a subclass of the base model as that subclass, and each computes what
`vit_core.load` of the same folder computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from vit_test_support import tiny_config, write_folder

import vit_flax
import vit_torch
from vit_core import load
from vit_core.layout import ModelKind


class TorchClassifier(vit_torch.ViTForImageClassification):
    """A user's subclass of the torch classification model."""


class TorchEncoder(vit_torch.ViTModel):
    """A user's subclass of the torch base model."""


class FlaxClassifier(vit_flax.FlaxViTForImageClassification):
    """A user's subclass of the Flax classification model."""


class FlaxEncoder(vit_flax.FlaxViTModel):
    """A user's subclass of the Flax base model."""


CLASSES: dict[str, dict[str, tuple[Any, Any]]] = {
    "torch": {
        "classification": (vit_torch.ViTForImageClassification, TorchClassifier),
        "base": (vit_torch.ViTModel, TorchEncoder),
    },
    "flax": {
        "classification": (vit_flax.FlaxViTForImageClassification, FlaxClassifier),
        "base": (vit_flax.FlaxViTModel, FlaxEncoder),
    },
}
CONFIG = tiny_config(image_size=(8, 12))
KINDS = {
    "classification": ModelKind(classifier=True, pooler=False),
    "base": ModelKind(classifier=False, pooler=True),
}
PIXELS = np.random.default_rng(0).standard_normal((2, 3, 8, 12), dtype=np.float32)


def outputs(model: Any, backend: str) -> dict[str, np.ndarray]:
    if backend == "torch":
        with torch.inference_mode():
            out = model(torch.from_numpy(PIXELS))
    else:
        out = model(PIXELS)
    return {name: np.asarray(getattr(out, name)) for name in out}


@pytest.mark.parametrize("head", ["classification", "base"])
@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_from_pretrained_builds_the_class_it_is_called_on(
    tmp_path: Path, backend: str, head: str
) -> None:
    write_folder(tmp_path, CONFIG, KINDS[head], seed=2)
    twin_class, subclass = CLASSES[backend][head]
    expected = outputs(load(tmp_path, backend=backend, model_type=head), backend)
    for cls in (twin_class, subclass):
        model = cls.from_pretrained(tmp_path)
        assert type(model) is cls
        actual = outputs(model, backend)
        assert actual.keys() == expected.keys()  # a classifier subclass keeps its logits
        for name, value in expected.items():
            np.testing.assert_array_equal(actual[name], value, err_msg=f"{cls.__name__}.{name}")


@pytest.mark.parametrize("backend", sorted(CLASSES))
def test_a_model_class_that_cannot_hold_the_checkpoint_is_refused(
    backend: str, tmp_path: Path
) -> None:
    """A base-model class asked to hold a classifier checkpoint: a clear refusal naming
    the class it needs, not a state-dict error from inside the framework."""
    from vit_core import InputError

    write_folder(tmp_path, CONFIG, KINDS["classification"], seed=0)
    base_class, _ = CLASSES[backend]["base"]
    with pytest.raises(InputError, match=f"model_class={base_class.__name__} cannot hold"):
        load(tmp_path, backend=backend, model_class=base_class)
