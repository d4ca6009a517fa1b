"""`ViTForMaskedImageModeling` (SimMIM) in both twins, against transformers' PyTorch model.

transformers builds the oracle inside each test: a tiny seeded `ViTForMaskedImageModeling`
with every tensor perturbed (the decoder, like qkv and fc1, at ~1/sqrt(width)), saved
with `save_pretrained`; both twins load that folder and must give its reconstruction,
loss, hidden states and attentions within 1e-5, with a random mask and without one, and
match each other. Then the way back (folders the twins write load in transformers and
compute the same), the other input sizes transformers cannot take (its decoder assumes a
square grid at the training size), the loading rules (a MIM folder as a base model or
under a new classifier; a plain ViT refused as MIM unless `init_decoder=True`), the
refusals of masks the model cannot apply, training gradients, and drawn architectures.

Names handed to the oracle start with "torch MIM", "flax MIM" or "twins: MIM".
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vit_test_support import architectures, record_max_diff, tiny_config, write_folder

import vit_flax
import vit_torch
from vit_core import CheckpointError, InputError, ViTConfig, load
from vit_core.backend import get_backend
from vit_core.layout import MIM_KIND, ModelKind
from vit_core.loading import folder_outputs
from vit_flax.weights import internal_weights as flax_internal_weights
from vit_torch.weights import internal_weights as torch_internal_weights

BACKENDS = ("torch", "flax")
TINY: dict[str, Any] = {
    "hidden_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 3,
    "intermediate_size": 96,
    "image_size": 32,
    "patch_size": 8,
    "encoder_stride": 8,
}
FULL = {"output_hidden_states": True, "output_attentions": True}
CLASSES: dict[str, Any] = {
    "torch": vit_torch.ViTForMaskedImageModeling,
    "flax": vit_flax.FlaxViTForMaskedImageModeling,
}


@pytest.fixture(autouse=True)
def _one_torch_thread(torch_one_thread: None) -> None:
    """Tiny models: one intra-op thread (tests/conftest.py says why)."""


def make_mim(oracle: Any, seed: int = 0, **config: Any) -> tuple[Any, Path]:
    """A seeded, perturbed transformers `ViTForMaskedImageModeling` (eager attention, so
    it returns attention maps) and the folder it saved itself to."""
    settings_ = {**TINY, **config, "attn_implementation": "eager"}
    torch.manual_seed(seed)
    model = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**settings_))
    oracle.perturb_torch(model, seed)  # every tensor, the mask token included
    decoder = model.decoder[0].weight  # a Conv2d, perturbed as a patch kernel (a tenth)
    rng = np.random.default_rng(seed + 1)
    noise = rng.standard_normal(tuple(decoder.shape)) / np.sqrt(model.config.hidden_size)
    with torch.no_grad():
        decoder.add_(torch.from_numpy(noise.astype(np.float32)))
    folder = oracle.tmp_path / f"hf-mim-{seed}"
    model.save_pretrained(folder)
    return model.eval(), folder


def random_mask(batch: int, patches: int, seed: int = 0) -> np.ndarray:
    """(batch, patches) booleans, each patch masked with probability 1/2 (SimMIM masks
    0.6 in training; any ratio tests the same arithmetic)."""
    return np.random.default_rng(seed).random((batch, patches)) < 0.5


def transformers_run(model: Any, pixels: np.ndarray, mask: np.ndarray | None, **flags: Any) -> Any:
    with torch.no_grad():
        masked = None if mask is None else torch.from_numpy(mask)
        return model(torch.from_numpy(pixels), bool_masked_pos=masked, **flags)


def twin_run(model: Any, pixels: np.ndarray, mask: np.ndarray | None, **flags: Any) -> Any:
    """A twin's output record on numpy inputs (torch tensors for the torch twin)."""
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            masked = None if mask is None else torch.from_numpy(mask)
            return model(torch.from_numpy(pixels), masked, **flags)
    return model(pixels, mask, **flags)


def assert_mim_close(oracle: Any, got: Any, want: Any, name: str) -> None:
    """Every field of a `MaskedImageModelingOutput` that `want` holds."""
    for field in ("reconstruction", "loss", "hidden_states", "attentions"):
        expected, actual = getattr(want, field), getattr(got, field)
        assert (actual is None) == (expected is None), f"{name}: {field} presence differs"
        if isinstance(expected, tuple):
            assert len(actual) == len(expected), f"{name}: {len(actual)} {field}"
            for a, e in zip(actual, expected, strict=True):
                oracle.assert_close(a, e, f"{name} {field}")
        elif expected is not None:
            oracle.assert_close(actual, expected, f"{name} {field}")


@pytest.mark.parametrize("masked", [True, False], ids=["random-mask", "no-mask"])
def test_both_twins_match_transformers(oracle: Any, masked: bool) -> None:
    hf, folder = make_mim(oracle, seed=int(masked))
    x = oracle.pixels(hf.config)
    mask = random_mask(len(x), 16) if masked else None
    want = transformers_run(hf, x, mask, **FULL)
    assert (want.loss is not None) == masked
    got = {}
    for backend in BACKENDS:
        model = load(folder, backend=backend)  # model_type="auto" finds the decoder
        assert type(model) is CLASSES[backend]
        assert model.kind == MIM_KIND
        got[backend] = twin_run(model, x, mask, **FULL)
        assert_mim_close(oracle, got[backend], want, f"{backend} MIM:")
    assert_mim_close(oracle, got["flax"], got["torch"], "twins: MIM")


def test_other_sizes_through_interpolate_pos_encoding(oracle: Any) -> None:
    """At 48 px transformers gives the reconstruction (without a mask: its loss reshapes
    the mask to the training grid); the twins read the input's own grid, so they give
    the loss there too, and take a non-square input, which transformers' square-root
    grid cannot: those the twins are held to each other."""
    hf, folder = make_mim(oracle, seed=2)
    twins = {backend: load(folder, backend=backend) for backend in BACKENDS}
    flags = {"interpolate_pos_encoding": True, "output_hidden_states": True}
    x = oracle.pixels(hf.config, size=(48, 48))
    want = transformers_run(hf, x, None, **flags)
    for backend, model in twins.items():
        assert_mim_close(oracle, twin_run(model, x, None, **flags), want, f"{backend} MIM: 48px")
    for size in ((48, 48), (32, 48)):
        x = oracle.pixels(hf.config, seed=1, size=size)
        mask = random_mask(len(x), (size[0] // 8) * (size[1] // 8), seed=3)
        torch_out, flax_out = (twin_run(twins[b], x, mask, **flags) for b in BACKENDS)
        assert torch_out.reconstruction.shape == (2, 3, *size)
        assert_mim_close(oracle, flax_out, torch_out, "twins: MIM interpolated")


@pytest.mark.parametrize("backend", BACKENDS)
def test_folders_the_twins_write_load_in_transformers(
    oracle: Any, tmp_path: Path, backend: str
) -> None:
    hf, folder = make_mim(oracle, seed=3)
    twin = CLASSES[backend].from_pretrained(folder)
    assert type(twin) is CLASSES[backend]
    saved = twin.save_pretrained(tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())["architectures"] == [
        "ViTForMaskedImageModeling"
    ]
    back, info = transformers.ViTForMaskedImageModeling.from_pretrained(
        saved, output_loading_info=True, attn_implementation="eager"
    )
    assert not {k: v for k, v in info.items() if v}, info
    x, mask = oracle.pixels(hf.config, seed=4), random_mask(2, 16, seed=4)
    want = transformers_run(hf, x, mask, **FULL)
    assert_mim_close(
        oracle, transformers_run(back.eval(), x, mask, **FULL), want, f"{backend} MIM ->"
    )
    # the backend interface, through which the CLI, verification and benchmarks run models
    outputs = get_backend(backend).run(twin, x)
    unmasked = transformers_run(hf, x, None).reconstruction
    oracle.assert_close(outputs["reconstruction"], unmasked, f"{backend} MIM: backend run")


def test_folder_outputs_carry_the_reconstruction_and_the_encoder(oracle: Any) -> None:
    """`vit_core.loading.folder_outputs` (conversion's `--verify`): the folder's own model
    and its encoder, whose outputs are transformers' `vit` part (no pooler)."""
    hf, folder = make_mim(oracle, seed=4)
    x = oracle.pixels(hf.config, seed=5)
    outputs = folder_outputs(folder, "torch", x)
    assert outputs.keys() == {"reconstruction", "last_hidden_state"}
    want, encoder = transformers_run(hf, x, None), transformers_run(hf.vit, x, None)
    oracle.assert_close(outputs["reconstruction"], want.reconstruction, "torch MIM: folder_outputs")
    oracle.assert_close(
        outputs["last_hidden_state"], encoder.last_hidden_state, "torch MIM: folder_outputs"
    )


def test_a_mim_folder_loads_as_its_encoder_and_under_a_new_classifier(oracle: Any) -> None:
    hf, folder = make_mim(oracle, seed=4)
    x = oracle.pixels(hf.config, seed=5)
    want = transformers_run(hf.vit, x, None)
    for backend in BACKENDS:
        base = load(folder, backend=backend, model_type="base")
        assert base.kind == ModelKind(classifier=False, pooler=False)  # no mask token left
        oracle.assert_close(
            twin_run(base, x, None).last_hidden_state,
            want.last_hidden_state,
            f"{backend} MIM as base: last_hidden_state",
        )
        classifier = load(folder, backend=backend, num_labels=3, seed=1)
        assert classifier.kind == ModelKind(classifier=True, pooler=False)
        weights = weights_of(classifier)
        assert not any("mask_token" in k or k.startswith("decoder.") for k in weights)
        assert {
            k.removeprefix("vit."): v for k, v in weights.items() if k.startswith("vit.")
        }.keys() == weights_of(base).keys()
    with pytest.raises(CheckpointError, match="num_labels=N for a new classifier"):
        load(folder, model_type="classification")


def weights_of(model: Any) -> dict[str, np.ndarray]:
    """A twin's weights under their internal names."""
    if isinstance(model, torch.nn.Module):
        return torch_internal_weights(model)
    return flax_internal_weights(model.params)


def test_a_plain_vit_is_refused_as_mim_unless_a_decoder_is_asked_for(oracle: Any) -> None:
    hf, folder = oracle.make_hf("classification", seed=5, **TINY)
    with pytest.raises(CheckpointError, match="init_decoder=True") as refused:
        load(folder, model_type="masked-image-modeling")
    for key in ("vit.embeddings.mask_token", "decoder.0.weight", "decoder.0.bias"):
        assert key in str(refused.value)
    with pytest.raises(ValueError, match="model_type='masked-image-modeling'"):
        load(folder, init_decoder=True)
    with pytest.raises(ValueError, match="a masked-image-modeling model has none"):
        load(folder, model_type="masked-image-modeling", num_labels=3)

    started = {
        backend: load(
            folder, backend=backend, model_type="masked-image-modeling", init_decoder=True, seed=7
        )
        for backend in BACKENDS
    }
    weights = {backend: weights_of(model) for backend, model in started.items()}
    assert weights["torch"].keys() == weights["flax"].keys()
    for name, value in weights["torch"].items():  # drawn in numpy: the same in both
        np.testing.assert_array_equal(weights["flax"][name], value, err_msg=name)
    assert not weights["torch"]["vit.embeddings.mask_token"].any()  # transformers' start
    assert weights["torch"]["decoder.projection.weight"].std() > 0
    encoder = hf.vit.state_dict()
    np.testing.assert_array_equal(
        weights["torch"]["vit.embeddings.position_embeddings"],
        encoder["embeddings.position_embeddings"].numpy(),
    )
    assert not any(k.startswith(("vit.pooler.", "classifier.")) for k in weights["torch"])
    x, mask = oracle.pixels(hf.config, seed=6), random_mask(2, 16, seed=6)
    torch_out, flax_out = (twin_run(started[b], x, mask) for b in BACKENDS)
    assert_mim_close(oracle, flax_out, torch_out, "twins: MIM init_decoder")


def test_a_base_model_with_a_mask_token_matches_transformers(oracle: Any) -> None:
    """transformers' `ViTModel(use_mask_token=True)`: the mask token without the decoder."""
    torch.manual_seed(6)
    config = transformers.ViTConfig(**TINY)
    hf = transformers.ViTModel(config, add_pooling_layer=False, use_mask_token=True)
    oracle.perturb_torch(hf, 6)
    folder = oracle.tmp_path / "hf-masked-base"
    hf.save_pretrained(folder)
    x, mask = oracle.pixels(config, seed=7), random_mask(2, 16, seed=7)
    want = transformers_run(hf, x, mask)
    for backend in BACKENDS:
        model = load(folder, backend=backend)
        assert model.kind == ModelKind(classifier=False, pooler=False, mask_token=True)
        oracle.assert_close(
            twin_run(model, x, mask).last_hidden_state,
            want.last_hidden_state,
            f"{backend} MIM: ViTModel(use_mask_token=True) last_hidden_state",
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_the_model_cannot_apply_are_refused(backend: str) -> None:
    config = tiny_config(image_size=8, patch_size=4, encoder_stride=4)
    cls = CLASSES[backend]
    model = cls(config, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with pytest.raises(InputError, match=r"has shape \(2, 3\); this input needs \(2, 4\)"):
        twin_run(model, x, np.zeros((2, 3), bool))
    base = vit_torch.ViTModel(config) if backend == "torch" else vit_flax.FlaxViTModel(config)
    with pytest.raises(InputError, match="this model has none"):
        twin_run(base, x, np.zeros((2, 4), bool))
    # encoder_stride unlike the patch: reconstructions of another size, and no loss
    other = cls(dataclasses.replace(config, encoder_stride=2), seed=0)
    assert twin_run(other, x, None).reconstruction.shape == (2, 3, 4, 4)
    with pytest.raises(InputError, match="encoder_stride equal to the patch size"):
        twin_run(other, x, np.zeros((2, 4), bool))


def test_the_twins_initialise_and_train_alike(oracle: Any) -> None:
    """One seed, one set of weights in both twins (drawn in numpy; the mask token zero, as
    transformers starts it, and the encoder the base model's of that seed); then the
    loss and every gradient of a training step agree."""
    config = ViTConfig(**TINY)
    torch_model = vit_torch.ViTForMaskedImageModeling(config, seed=8)
    flax_model = vit_flax.FlaxViTForMaskedImageModeling(config, seed=8)
    weights = weights_of(torch_model)
    for name, value in weights_of(flax_model).items():
        np.testing.assert_array_equal(value, weights[name], err_msg=name)
    encoder = weights_of(vit_torch.ViTModel(config, add_pooling_layer=False, seed=8))
    for name, value in encoder.items():
        np.testing.assert_array_equal(weights["vit." + name], value, err_msg=name)
    # perturbed, so that no weight sits where a wrong gradient could hide (a zero mask
    # token or bias, a unit LayerNorm scale)
    flax_model.params = oracle.perturb_flax(flax_model.params, 9)
    torch_model = load_internal(config, weights_of(flax_model))

    x, mask = oracle.pixels(config, seed=8), random_mask(2, 16, seed=8)
    torch_model.train()
    out = torch_model(torch.from_numpy(x), torch.from_numpy(mask))
    out.loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}

    def loss(params: Any) -> jax.Array:
        trained: Any = flax_model(x, mask, params=params, train=True)
        return trained.loss

    flax_loss, grads = jax.value_and_grad(loss)(flax_model.params)
    oracle.assert_close(flax_loss, out.loss, "twins: MIM training loss")
    flax_grads = flax_internal_weights(grads)
    assert flax_grads.keys() == torch_grads.keys()
    scale = max(float(np.abs(g).max()) for g in torch_grads.values())
    for name, grad in torch_grads.items():  # relative to the largest gradient
        oracle.assert_close(flax_grads[name] / scale, grad / scale, "twins: MIM gradients")


def load_internal(config: ViTConfig, internal: dict[str, np.ndarray]) -> Any:
    """A torch MIM model holding `internal`, as the torch backend builds one."""
    return get_backend("torch").build(config, MIM_KIND, internal)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architecture=architectures(), seed=st.integers(0, 2**16))
def test_drawn_architectures_agree_in_both_twins(
    architecture: tuple[ViTConfig, ModelKind], seed: int
) -> None:
    """The family switches (registers, distillation token, no_embed_class, LayerScale,
    pre-norm, SwiGLU, pooling) under the SimMIM head: reconstruction, and the loss where
    the patch is square (encoder_stride is its side)."""
    drawn, _ = architecture
    patch = drawn.patch_hw
    config = dataclasses.replace(drawn, encoder_stride=patch[0])
    grid = config.grid_hw
    x = np.random.default_rng(seed).standard_normal((2, config.num_channels, *config.image_hw))
    x = x.astype(np.float32)
    mask = random_mask(2, grid[0] * grid[1], seed) if patch[0] == patch[1] else None
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(Path(tmp), config, MIM_KIND, seed)
        torch_out, flax_out = (twin_run(load(tmp, backend=b), x, mask) for b in BACKENDS)
    for field in ("reconstruction", "loss"):
        want = getattr(torch_out, field)
        if want is None:
            continue
        got = np.asarray(getattr(flax_out, field))
        diff = float(np.max(np.abs(got - want.numpy())))
        record_max_diff(f"twins: MIM drawn architectures {field}", diff)
        assert diff <= 1e-5, (field, diff, config)
