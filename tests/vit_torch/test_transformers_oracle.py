"""The torch twin against transformers' PyTorch ViT as oracle (mirror: tests/vit_flax/).

transformers builds small seeded models with every tensor perturbed and saves them; we
load the folder and compare every output at <= 1e-5: logits, last_hidden_state,
pooler_output, each hidden state and, against its eager attention, each attention map.
Then the losses, the reverse direction (saved here, loaded by transformers),
interpolate_pos_encoding, and the errors for inputs the model cannot read.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import vit_core
import vit_torch
from vit_core.errors import InputError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

OURS = {
    "classification": vit_torch.ViTForImageClassification,
    "pooler": vit_torch.ViTModel,
    "base": vit_torch.ViTModel,
}
FULL = {"output_hidden_states": True, "output_attentions": True}


def run(model: torch.nn.Module, pixels: np.ndarray, **kwargs: object) -> object:
    with torch.no_grad():
        return model(torch.from_numpy(pixels), **kwargs)


def test_forward_matches_transformers(oracle, forward_case: tuple[str, str]) -> None:
    head, case = forward_case
    hf, folder = oracle.make_hf(head, seed=len(case), **oracle.CASES[case])
    x = oracle.pixels(hf.config)
    ours = vit_core.load(folder, backend="torch")
    assert type(ours) is OURS[head]
    assert (getattr(ours, "pooler", None) is not None) == (head == "pooler")

    oracle.assert_outputs_close(run(ours, x), run(hf, x), "torch forward")
    eager = oracle.load_hf(folder, head, attn_implementation="eager")
    oracle.assert_outputs_close(run(ours, x, **FULL), run(eager, x, **FULL), "torch forward")

    by_class = OURS[head].from_pretrained(folder)
    oracle.assert_outputs_close(run(by_class, x), run(hf, x), "torch from_pretrained")
    if head == "classification":  # the encoder alone, from the classification folder
        encoder = vit_torch.ViTModel.from_pretrained(folder)
        oracle.assert_close(
            run(encoder, x).last_hidden_state,
            run(hf.vit, x).last_hidden_state,
            "torch ViTModel from a classification folder: last_hidden_state",
        )


def multi_hot(rng: np.random.Generator) -> np.ndarray:
    return (rng.random((2, 5)) < 0.5).astype(np.float32)


LOSSES = {
    "single_label": ({"num_labels": 5}, lambda rng: rng.integers(0, 5, 2).astype(np.int64)),
    "multi_label": (
        {"num_labels": 5, "problem_type": "multi_label_classification"},
        multi_hot,
    ),
    "multi_label_inferred": ({"num_labels": 5}, multi_hot),
    "regression": ({"num_labels": 1}, lambda rng: rng.standard_normal(2).astype(np.float32)),
    "regression_5": (
        {"num_labels": 5, "problem_type": "regression"},
        lambda rng: rng.standard_normal((2, 5)).astype(np.float32),
    ),
}


@pytest.mark.parametrize("problem", LOSSES)
def test_loss_matches_transformers(oracle, problem: str) -> None:
    settings, make_labels = LOSSES[problem]
    hf, folder = oracle.make_hf("classification", image_size=32, patch_size=16, **settings)
    x, labels = oracle.pixels(hf.config), make_labels(np.random.default_rng(7))
    ours = vit_core.load(folder, backend="torch")
    got = run(ours, x, labels=torch.from_numpy(labels))
    want = run(hf, x, labels=torch.from_numpy(labels))
    oracle.assert_close(got.logits, want.logits, "torch loss: logits")
    oracle.assert_close(got.loss, want.loss, f"torch loss: {problem}")


@pytest.mark.parametrize("head", ["classification", "pooler"])
def test_saved_here_loads_in_transformers(oracle, tmp_path, head: str) -> None:
    config = vit_core.ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=5,
        **oracle.CASES["32x48-p16-nobias-tanh-eps1e-6"],
    )
    model = (
        vit_torch.ViTForImageClassification(config)
        if head == "classification"
        else vit_torch.ViTModel(config, add_pooling_layer=True)
    )
    oracle.perturb_torch(model, seed=3)
    model.save_pretrained(tmp_path / "ours")
    hf = oracle.load_hf(tmp_path / "ours", head, attn_implementation="eager")
    x = oracle.pixels(config)
    oracle.assert_outputs_close(run(model, x, **FULL), run(hf, x, **FULL), "torch -> transformers")


INTERPOLATE = [(8, (48, 48)), (8, (32, 64)), (8, (16, 64)), (16, (48, 48))]


@pytest.mark.parametrize(
    ("patch", "size"), INTERPOLATE, ids=[f"p{p}-{h}x{w}" for p, (h, w) in INTERPOLATE]
)
def test_interpolate_pos_encoding_matches_transformers(oracle, patch: int, size: tuple) -> None:
    hf, folder = oracle.make_hf("classification", image_size=32, patch_size=patch, seed=5)
    ours = vit_core.load(folder, backend="torch")
    x = oracle.pixels(hf.config, size=size)
    flags = {"interpolate_pos_encoding": True, "output_hidden_states": True}
    oracle.assert_outputs_close(run(ours, x, **flags), run(hf, x, **flags), "torch interpolate")


@pytest.mark.parametrize("head", ["classification", "base"])
def test_bad_inputs_raise_input_error(oracle, head: str) -> None:
    _, folder = oracle.make_hf(head, image_size=(32, 48), patch_size=16)
    ours = vit_core.load(folder, backend="torch")
    with pytest.raises(InputError, match=r"32x32.*32x48"):
        run(ours, np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="4 channels"):
        run(ours, np.zeros((2, 4, 32, 48), np.float32))
    with pytest.raises(InputError, match=r"40x48 is not a multiple of the patch size 16x16"):
        run(ours, np.zeros((2, 3, 40, 48), np.float32), interpolate_pos_encoding=True)
    with pytest.raises(InputError, match="batch, channels, height, width"):
        run(ours, np.zeros((3, 32, 48), np.float32))


@pytest.mark.parametrize(
    ("field", "wrong"), [("layer_norm_eps", 1e-6), ("hidden_act", "gelu_pytorch_tanh")]
)
def test_oracle_tolerance_catches_numerics_bugs(
    oracle, tmp_path, field: str, wrong: object
) -> None:
    """The inputs and weights make an eps or GELU-form slip visible above the bound."""
    hf, folder = oracle.make_hf("classification", **oracle.CASES["sq32-p8-qkvbias-gelu-eps1e-12"])
    shutil.copytree(folder, tmp_path / "wrong")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "wrong" / "config.json").write_text(json.dumps({**config, field: wrong}))
    x = oracle.pixels(hf.config)
    got = run(vit_core.load(tmp_path / "wrong", backend="torch"), x, output_hidden_states=True)
    want = run(hf, x, output_hidden_states=True)
    diff = np.abs(got.hidden_states[1].numpy() - want.hidden_states[1].numpy()).max()
    assert diff > oracle.TOL, f"a wrong {field} moved the first block by only {diff:.2e}"
