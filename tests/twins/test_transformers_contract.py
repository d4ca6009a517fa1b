"""Both twins against transformers as oracle (once per `backend`).

transformers builds small seeded PyTorch models with every tensor perturbed and saves
them; each twin loads the folder and is compared at <= 1e-5 on every output: logits,
last_hidden_state, pooler_output, each hidden state and, against transformers' eager
attention, each attention map. A twin whose framework transformers also has a ViT in
(Flax) is compared with that one too, where it can (square images; it is slow to build).
Then the losses, the reverse direction (saved by the twin, loaded by transformers),
interpolate_pos_encoding, and the errors for inputs the model cannot read.

The names handed to the oracle ("torch forward", "flax -> transformers", ...) are those
of docs/parity.json and the README's parity table.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from twin_adapters import Twin, run_transformers
from vit_test_support import tiny_config

import vit_core
from vit_core.errors import InputError

transformers = pytest.importorskip("transformers")

FULL = {"output_hidden_states": True, "output_attentions": True}
HF_FLAX_CASE = "sq32-p8-qkvbias-gelu-eps1e-12"


def assert_same_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_forward_matches_transformers(oracle, backend: Twin, forward_case: tuple[str, str]) -> None:
    head, case = forward_case
    hf, folder = oracle.make_hf(head, seed=len(case), **oracle.CASES[case])
    x = oracle.pixels(hf.config)
    ours = vit_core.load(folder, backend=backend.name)
    assert type(ours) is backend.classes[head]
    assert backend.has_pooler(ours) == (head == "pooler")

    name = backend.name
    oracle.assert_outputs_close(backend.run(ours, x), run_transformers(hf, x), f"{name} forward")
    eager = oracle.load_hf(folder, head, attn_implementation="eager")
    oracle.assert_outputs_close(
        backend.run(ours, x, **FULL), run_transformers(eager, x, **FULL), f"{name} forward"
    )
    if backend.transformers_flax and case == HF_FLAX_CASE:
        hf_flax = oracle.load_hf(folder, head, flax=True)
        oracle.assert_outputs_close(
            backend.run(ours, x, **FULL), hf_flax(x, **FULL), f"{name} vs transformers Flax"
        )

    # The classes' from_pretrained hold the very weights checked above; the encoder of a
    # classification folder is its `vit`.
    by_class = backend.classes[head].from_pretrained(folder)
    assert type(by_class) is backend.classes[head]
    assert_same_weights(backend.weights(by_class), backend.weights(ours))
    encoder = backend.classes["base"].from_pretrained(folder) if head == "classification" else None
    if encoder is not None:
        assert_same_weights(backend.weights(encoder), backend.encoder_weights(ours))
    if backend.reruns_cheaply:  # a Flax run would only compile the same function again
        oracle.assert_outputs_close(
            backend.run(by_class, x), run_transformers(hf, x), f"{name} from_pretrained"
        )
        if encoder is not None:
            oracle.assert_close(
                backend.run(encoder, x).last_hidden_state,
                run_transformers(hf.vit, x).last_hidden_state,
                f"{name} ViTModel from a classification folder: last_hidden_state",
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
def test_loss_matches_transformers(oracle, backend: Twin, problem: str) -> None:
    settings, make_labels = LOSSES[problem]
    hf, folder = oracle.make_hf("classification", image_size=32, patch_size=16, **settings)
    x, labels = oracle.pixels(hf.config), make_labels(np.random.default_rng(7))
    ours = vit_core.load(folder, backend=backend.name)
    got = backend.run(ours, x, labels=labels)
    want = run_transformers(hf, x, labels=labels)
    oracle.assert_close(got.logits, want.logits, f"{backend.name} loss: logits")
    oracle.assert_close(got.loss, want.loss, f"{backend.name} loss: {problem}")


# One non-square case, and a square one that transformers' Flax ViT can read too.
SAVED = ["32x48-p16-nobias-tanh-eps1e-6", "sq32-p16-nobias-gelu-eps1e-6"]


@pytest.mark.parametrize("case", SAVED)
@pytest.mark.parametrize("head", ["classification", "pooler"])
def test_saved_here_loads_in_transformers(
    oracle, tmp_path, backend: Twin, head: str, case: str
) -> None:
    config = tiny_config(
        hidden_size=48,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=5,
        **oracle.CASES[case],
    )
    model = backend.perturb(oracle, backend.build(config, head), seed=3)
    model.save_pretrained(tmp_path / "ours")
    hf = oracle.load_hf(tmp_path / "ours", head, attn_implementation="eager")
    x = oracle.pixels(config)
    name = f"{backend.name} -> transformers"
    oracle.assert_outputs_close(
        backend.run(model, x, **FULL), run_transformers(hf, x, **FULL), name
    )
    square = not isinstance(config.image_size, list | tuple)
    if backend.transformers_flax and square and head == "classification":  # slow: once
        hf_flax = oracle.load_hf(tmp_path / "ours", head, flax=True)
        oracle.assert_outputs_close(
            backend.run(model, x, **FULL), hf_flax(x, **FULL), f"{name} Flax"
        )


INTERPOLATE = [(8, (48, 48)), (8, (32, 64)), (8, (16, 64)), (16, (48, 48))]


@pytest.mark.parametrize(
    ("patch", "size"), INTERPOLATE, ids=[f"p{p}-{h}x{w}" for p, (h, w) in INTERPOLATE]
)
def test_interpolate_pos_encoding_matches_transformers(
    oracle, backend: Twin, patch: int, size: tuple
) -> None:
    hf, folder = oracle.make_hf("classification", image_size=32, patch_size=patch, seed=5)
    ours = vit_core.load(folder, backend=backend.name)
    x = oracle.pixels(hf.config, size=size)
    flags = {"interpolate_pos_encoding": True, "output_hidden_states": True}
    oracle.assert_outputs_close(
        backend.run(ours, x, **flags),
        run_transformers(hf, x, **flags),
        f"{backend.name} interpolate",
    )


@pytest.mark.parametrize("head", ["classification", "base"])
def test_bad_inputs_raise_input_error(oracle, backend: Twin, head: str) -> None:
    _, folder = oracle.make_hf(head, image_size=(32, 48), patch_size=16)
    ours = vit_core.load(folder, backend=backend.name)
    with pytest.raises(InputError, match=r"32x32.*32x48"):
        backend.run(ours, np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(InputError, match="4 channels"):
        backend.run(ours, np.zeros((2, 4, 32, 48), np.float32))
    with pytest.raises(InputError, match=r"40x48 is not a multiple of the patch size 16x16"):
        backend.run(ours, np.zeros((2, 3, 40, 48), np.float32), interpolate_pos_encoding=True)
    with pytest.raises(InputError, match="batch, channels, height, width"):
        backend.run(ours, np.zeros((3, 32, 48), np.float32))


@pytest.mark.parametrize(
    ("field", "wrong"), [("layer_norm_eps", 1e-6), ("hidden_act", "gelu_pytorch_tanh")]
)
def test_oracle_tolerance_catches_numerics_bugs(
    oracle, tmp_path, backend: Twin, field: str, wrong: object
) -> None:
    """The inputs and weights make an eps or GELU-form slip visible above the bound."""
    hf, folder = oracle.make_hf("classification", **oracle.CASES["sq32-p8-qkvbias-gelu-eps1e-12"])
    shutil.copytree(folder, tmp_path / "wrong")
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "wrong" / "config.json").write_text(json.dumps({**config, field: wrong}))
    x = oracle.pixels(hf.config)
    wrong_model = vit_core.load(tmp_path / "wrong", backend=backend.name)
    got = backend.run(wrong_model, x, output_hidden_states=True)
    want = run_transformers(hf, x, output_hidden_states=True)
    diff = np.abs(got.hidden_states[1] - want.hidden_states[1].numpy()).max()
    assert diff > oracle.TOL, f"a wrong {field} moved the first block by only {diff:.2e}"
