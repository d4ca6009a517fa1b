"""The Flax twin against transformers as oracle (mirror: tests/vit_torch/).

transformers builds small seeded PyTorch models with every tensor perturbed and saves
them; we load the folder and compare every output at <= 1e-5 with transformers' PyTorch
ViT (its eager attention where attention maps are compared) and, for the square configs
it supports, with transformers' Flax ViT converted from the same folder. Then the
losses, the reverse direction (saved here, loaded by transformers), interpolate_pos_encoding,
and the errors for inputs the model cannot read.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch

import vit_core
import vit_flax
from vit_core.errors import InputError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

OURS = {
    "classification": vit_flax.FlaxViTForImageClassification,
    "pooler": vit_flax.FlaxViTModel,
    "base": vit_flax.FlaxViTModel,
}
FULL = {"output_hidden_states": True, "output_attentions": True}
HF_FLAX_CASE = "sq32-p8-qkvbias-gelu-eps1e-12"


def hf_run(model: torch.nn.Module, pixels: np.ndarray, **kwargs: object) -> object:
    with torch.no_grad():
        return model(torch.from_numpy(pixels), **kwargs)


def test_forward_matches_transformers(oracle, forward_case: tuple[str, str]) -> None:
    head, case = forward_case
    hf, folder = oracle.make_hf(head, seed=len(case), **oracle.CASES[case])
    x = oracle.pixels(hf.config)
    ours = vit_core.load(folder, backend="flax")
    assert type(ours) is OURS[head]
    assert ("pooler" in ours.params.get("vit", ours.params)) == (head == "pooler")

    oracle.assert_outputs_close(ours(x), hf_run(hf, x), "flax forward")
    eager = oracle.load_hf(folder, head, attn_implementation="eager")
    oracle.assert_outputs_close(ours(x, **FULL), hf_run(eager, x, **FULL), "flax forward")
    if case == HF_FLAX_CASE:  # transformers' Flax ViT: square images only, and slow to build
        hf_flax = oracle.load_hf(folder, head, flax=True)
        oracle.assert_outputs_close(
            ours(x, **FULL), hf_flax(x, **FULL), "flax vs transformers Flax"
        )

    # The classes' from_pretrained hold the very params checked above (a run would only
    # recompile the same function); the encoder of a classification folder is its `vit`.
    by_class = OURS[head].from_pretrained(folder)
    assert type(by_class) is OURS[head]
    assert_same_params(by_class.params, ours.params)
    if head == "classification":
        assert_same_params(vit_flax.FlaxViTModel.from_pretrained(folder).params, ours.params["vit"])


def assert_same_params(got: object, want: object) -> None:
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
    ours = vit_core.load(folder, backend="flax")
    got = ours(x, labels=labels)
    want = hf_run(hf, x, labels=torch.from_numpy(labels))
    oracle.assert_close(got.logits, want.logits, "flax loss: logits")
    oracle.assert_close(got.loss, want.loss, f"flax loss: {problem}")


@pytest.mark.parametrize("head", ["classification", "pooler"])
def test_saved_here_loads_in_transformers(oracle, tmp_path, head: str) -> None:
    config = vit_core.ViTConfig(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=5,
        **oracle.CASES["sq32-p16-nobias-gelu-eps1e-6"],
    )
    model = (
        vit_flax.FlaxViTForImageClassification(config)
        if head == "classification"
        else vit_flax.FlaxViTModel(config, add_pooling_layer=True)
    )
    model.params = oracle.perturb_flax(model.params, seed=3)
    model.save_pretrained(tmp_path / "ours")
    x = oracle.pixels(config)
    hf = oracle.load_hf(tmp_path / "ours", head, attn_implementation="eager")
    oracle.assert_outputs_close(model(x, **FULL), hf_run(hf, x, **FULL), "flax -> transformers")
    if head == "classification":  # transformers' Flax ViT is slow to build: once is enough
        hf_flax = oracle.load_hf(tmp_path / "ours", head, flax=True)
        oracle.assert_outputs_close(
            model(x, **FULL), hf_flax(x, **FULL), "flax -> transformers Flax"
        )


INTERPOLATE = [(8, (48, 48)), (8, (32, 64)), (8, (16, 64)), (16, (48, 48))]


@pytest.mark.parametrize(
    ("patch", "size"), INTERPOLATE, ids=[f"p{p}-{h}x{w}" for p, (h, w) in INTERPOLATE]
)
def test_interpolate_pos_encoding_matches_transformers(oracle, patch: int, size: tuple) -> None:
    hf, folder = oracle.make_hf("classification", image_size=32, patch_size=patch, seed=5)
    ours = vit_core.load(folder, backend="flax")
    x = oracle.pixels(hf.config, size=size)
    flags = {"interpolate_pos_encoding": True, "output_hidden_states": True}
    oracle.assert_outputs_close(ours(x, **flags), hf_run(hf, x, **flags), "flax interpolate")


@pytest.mark.parametrize("head", ["classification", "base"])
def test_bad_inputs_raise_input_error(oracle, head: str) -> None:
    _, folder = oracle.make_hf(head, image_size=(32, 48), patch_size=16)
    ours = vit_core.load(folder, backend="flax")
    with pytest.raises(InputError, match=r"32x32.*32x48"):
        ours(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="4 channels"):
        ours(np.zeros((2, 4, 32, 48), np.float32))
    with pytest.raises(InputError, match=r"40x48 is not a multiple of the patch size 16x16"):
        ours(np.zeros((2, 3, 40, 48), np.float32), interpolate_pos_encoding=True)
    with pytest.raises(InputError, match="batch, channels, height, width"):
        ours(np.zeros((3, 32, 48), np.float32))


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
    got = vit_core.load(tmp_path / "wrong", backend="flax")(x, output_hidden_states=True)
    want = hf_run(hf, x, output_hidden_states=True)
    diff = np.abs(np.asarray(got.hidden_states[1]) - want.hidden_states[1].numpy()).max()
    assert diff > oracle.TOL, f"a wrong {field} moved the first block by only {diff:.2e}"
