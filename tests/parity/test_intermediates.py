"""`forward_intermediates`: both twins against timm's own on the same weights and against
each other, every option; the backends' `intermediates`; bad input refused by name.

Each family is a registered timm ViT built small (tests/support/timm_models.py: every
tensor perturbed, LayerScale near 0.3) with `dynamic_img_size=True`, so that timm itself
resamples its position embeddings for another input size. Its state dict is converted to
a canonical folder and loaded in both backends. timm resamples with antialiased bicubic
(`resample_abs_pos_embed`'s default), which is our `"bicubic_antialias"` mode, not the
transformers bicubic that `interpolate_pos_encoding=True` means. float32, <= 1e-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from timm_models import family_model, save
from vit_test_support import tiny_config, write_folder

import vit_core
import vit_flax
import vit_torch
from conversion import convert
from vit_core import InputError
from vit_core.backend import BACKENDS, get_backend
from vit_core.intermediates import take_indices
from vit_core.layout import MIM_KIND, ModelKind

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

HEADS = 3
TINY = {
    "depth": 3,
    "embed_dim": 48,
    "num_heads": HEADS,
    "img_size": 32,
    "patch_size": 8,
    "dynamic_img_size": True,
}
RESIZE = "bicubic_antialias"  # what timm's dynamic_img_size does (see above)

# family -> (timm architecture, create_model overrides)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # a classifier: its forward_intermediates is its encoder's
    "plain": ("vit_small_patch16_224", {"num_classes": 5}),
    "registers": (
        "vit_small_patch16_224",
        {"reg_tokens": 4, "no_embed_class": True, "num_classes": 0},
    ),
    # the mean, then fc_norm: no norm over the tokens, so norm=True leaves them as they are
    "no-class-token": (
        "vit_small_patch16_224",
        {"class_token": False, "global_pool": "avg", "num_classes": 0},
    ),
    "layer-scale": ("vit_small_patch16_224", {"init_values": 0.3, "num_classes": 0}),
    # the converter's families: class + distillation tokens (DeiT), pre-norm with QuickGELU
    # (OpenAI CLIP), no class token with a MAP head (SigLIP), registers + layer scale +
    # SwiGLU (DINOv2 giant)
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {"num_classes": 5}),
    "clip": ("vit_base_patch16_clip_quickgelu_224", {"num_classes": 0}),
    "siglip": ("vit_base_patch16_siglip_224", {"num_classes": 0}),
    "dinov2-swiglu": ("vit_giant_patch14_reg4_dinov2", {"num_classes": 0, "mlp_ratio": 4}),
}
# What a state dict does not hold, given to the converter as its --set does (timm's
# defaults otherwise: LayerNorm eps 1e-6, exact GELU)
NUMERICS: dict[str, dict[str, Any]] = {
    "clip": {"layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"},
}

# name -> (input size, None for the model's; forward_intermediates' options)
OPTIONS: dict[str, tuple[tuple[int, int] | None, dict[str, Any]]] = {
    "defaults": (None, {}),
    "last-2-normed-nlc-prefix": (
        None,
        {"indices": 2, "norm": True, "output_fmt": "NLC", "return_prefix_tokens": True},
    ),
    "listed-stop-early-normed-prefix": (
        None,
        {"indices": [-2, 0], "stop_early": True, "norm": True, "return_prefix_tokens": True},
    ),
    "larger-nonsquare-only": (
        (48, 40),
        {"indices": [-1], "intermediates_only": True, "interpolate_pos_encoding": RESIZE},
    ),
    "smaller-nlc-prefix": (
        (24, 24),
        {
            "indices": 1,
            "output_fmt": "NLC",
            "return_prefix_tokens": True,
            "interpolate_pos_encoding": RESIZE,
        },
    ),
}
# Each option is run on some family, and each family reads its prefix tokens; not every
# pair, as each Flax run with new options compiles (most of the time these tests take).
RUNS = {
    "plain": ["defaults", "last-2-normed-nlc-prefix", "listed-stop-early-normed-prefix"],
    "registers": ["listed-stop-early-normed-prefix", "smaller-nlc-prefix"],
    "no-class-token": ["last-2-normed-nlc-prefix", "larger-nonsquare-only"],
    "layer-scale": ["defaults", "larger-nonsquare-only"],
    "deit-distilled": ["listed-stop-early-normed-prefix"],
    "clip": ["last-2-normed-nlc-prefix"],
    "siglip": ["defaults"],
    "dinov2-swiglu": ["smaller-nlc-prefix"],
}


def converted(oracle: Any, tmp_path: Path, family: str) -> tuple[Any, Path]:
    """The timm model of `family`, and the canonical folder converted from its weights."""
    name, overrides = FAMILIES[family]
    model = family_model(oracle, name, seed=len(family), **{**TINY, **overrides})
    source = save(model, tmp_path / f"{family}.safetensors")
    out = tmp_path / "out"
    overrides = {"num_attention_heads": HEADS, **NUMERICS.get(family, {})}
    convert(source, out, overrides=overrides, progress=False)
    return model, out


def timm_intermediates(model: Any, pixels: np.ndarray, options: dict[str, Any]) -> Any:
    """timm's `forward_intermediates` (which resamples by itself: no interpolate option)."""
    kwargs = {k: v for k, v in options.items() if k != "interpolate_pos_encoding"}
    with torch.inference_mode():
        return model.forward_intermediates(torch.from_numpy(pixels), **kwargs)


def twin_intermediates(model: Any, pixels: np.ndarray, options: dict[str, Any]) -> Any:
    if isinstance(model, torch.nn.Module):
        with torch.inference_mode():
            return model.forward_intermediates(torch.from_numpy(pixels), **options)
    return model.forward_intermediates(pixels, **options)


def assert_same(oracle: Any, got: Any, want: Any, name: str) -> None:
    """The same nesting as `want` (timm's tuple, list, and zip pairs), each tensor close."""
    if isinstance(want, list | tuple):
        assert type(got) is type(want), f"{name}: a {type(got).__name__}, timm's a {type(want)}"
        assert len(got) == len(want), f"{name}: {len(got)} entries, timm's {len(want)}"
        for g, w in zip(got, want, strict=True):
            assert_same(oracle, g, w, name)
        return
    if isinstance(got, torch.Tensor):
        assert got.ndim != 4 or got.is_contiguous(), name  # NCHW maps are, as timm's
    oracle.assert_close(got, want, name)


def only_intermediates(out: Any, options: dict[str, Any]) -> Any:
    return out if options.get("intermediates_only") else out[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_intermediates_match_timm(oracle: Any, tmp_path: Path, family: str) -> None:
    model, folder = converted(oracle, tmp_path, family)
    twins = {b: vit_core.load(folder, b, dtype="float32") for b in BACKENDS}
    config = twins["torch"].config
    for run in RUNS[family]:
        size, options = OPTIONS[run]
        pixels = oracle.pixels(config, seed=len(run), size=size)
        want = timm_intermediates(model, pixels, options)
        got = {b: twin_intermediates(twins[b], pixels, options) for b in BACKENDS}
        for b in BACKENDS:
            assert_same(oracle, got[b], want, f"timm forward_intermediates: {b} {family}")
        assert_same(oracle, got["flax"], got["torch"], f"twins: forward_intermediates {family}")
        if options.get("stop_early"):  # the blocks asked for, as a run of every block gives
            full = timm_intermediates(model, pixels, {**options, "stop_early": False})
            for b in BACKENDS:
                assert_same(
                    oracle,
                    only_intermediates(got[b], options),
                    only_intermediates(full, options),
                    f"timm forward_intermediates: {b} {family}",
                )


def test_stop_early_runs_no_later_block(oracle: Any, tmp_path: Path) -> None:
    """torch calls no later block; Flax runs without their params (and needs them without
    `stop_early`)."""
    from flax.errors import ScopeParamNotFoundError

    _, folder = converted(oracle, tmp_path, "registers")
    model = vit_core.load(folder, "torch", dtype="float32")
    pixels = oracle.pixels(model.config)
    options = {"indices": [-2], "stop_early": True, "intermediates_only": True}
    ran: list[int] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, _a, i=i: ran.append(i))
        for i, layer in enumerate(model.encoder.layers)
    ]
    want = twin_intermediates(model, pixels, options)
    for hook in hooks:
        hook.remove()
    assert ran == [0, 1]
    flax_model = vit_core.load(folder, "flax", dtype="float32")
    encoder = flax_model.params["encoder"]
    params = {**flax_model.params, "encoder": {k: encoder[k] for k in ("layers_0", "layers_1")}}
    got = flax_model.forward_intermediates(pixels, **options, params=params)
    assert_same(oracle, got, want, "twins: forward_intermediates stop_early")
    with pytest.raises(ScopeParamNotFoundError, match="layers_2"):
        flax_model.forward_intermediates(pixels, **{**options, "stop_early": False}, params=params)


@pytest.mark.parametrize("indices", [None, 1, 4, [0], [-1, 0], (2, -3), range(1, 3)], ids=str)
def test_take_indices_as_timm(indices: Any) -> None:
    """timm's `feature_take_indices`, sorted: the intermediates come in block order."""
    from timm.models._features import feature_take_indices

    taken, last = feature_take_indices(4, indices)
    assert take_indices(4, indices) == (tuple(sorted(taken)), last)


# case -> (forward_intermediates options, or input shape; what the error must say)
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "past-the-end": ({"indices": [0, 2]}, r"block index 2 in indices=\[0, 2\] is out of range"),
    "before-the-start": ({"indices": [-3]}, r"block index -3 .* 0 to 1 \(or -2 to -1\)"),
    "last-none": ({"indices": 0}, r"indices=0 asks for the last 0 blocks; .* 1 to 2"),
    "last-too-many": ({"indices": 3}, r"indices=3 .* the model has 2"),
    "empty": ({"indices": []}, r"indices=\[\] asks for no block"),
    "twice": ({"indices": [1, -1]}, r"names a block more than once \(as absolute .* \[1, 1\]"),
    "not-an-index": ({"indices": [0.5]}, r"0\.5 is not a block index"),
    "a-bool": ({"indices": True}, r"indices=True: give None"),
    "format": ({"output_fmt": "NHWC"}, r"output_fmt='NHWC': choose 'NCHW' .* or 'NLC'"),
    "size": ({"shape": (2, 3, 12, 12)}, r"input size 12x12 does not match the model's 8x8"),
}


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("twin", BACKENDS)
def test_bad_input_is_refused(twin: str, case: str) -> None:
    config = tiny_config()
    model = vit_torch.ViTModel(config) if twin == "torch" else vit_flax.FlaxViTModel(config)
    options, message = dict(BAD[case][0]), BAD[case][1]
    shape = options.pop("shape", (2, 3, 8, 8))
    with pytest.raises(InputError, match=message):
        twin_intermediates(model, np.zeros(shape, np.float32), options)


# case -> (family, input size, indices, norm): the classifier's encoder and its class
# token, at its own size; a model without prefix tokens at another.
BACKEND_CASES = {
    "classifier-normed": ("plain", None, [0, -1], True),
    "no-prefix-resized": ("no-class-token", (40, 24), [2], False),
}


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_intermediates(oracle: Any, tmp_path: Path, backend: str, case: str) -> None:
    """Every token (prefix first) of each block asked for, as float32 numpy."""
    family, size, indices, norm = BACKEND_CASES[case]
    model, folder = converted(oracle, tmp_path, family)
    twin = vit_core.load(folder, backend, dtype="float32")
    pixels = oracle.pixels(twin.config, seed=3, size=size)
    got = get_backend(backend).intermediates(
        twin, pixels, indices, norm=norm, interpolate_pos_encoding=RESIZE if size else False
    )
    options = {"output_fmt": "NLC", "intermediates_only": True, "return_prefix_tokens": True}
    want = timm_intermediates(model, pixels, {"indices": indices, "norm": norm, **options})
    assert len(got) == len(want)
    for tokens, entry in zip(got, want, strict=True):
        if isinstance(entry, tuple):
            entry = torch.cat(entry[::-1], dim=1)  # (patches, prefix) -> prefix first
        assert isinstance(tokens, np.ndarray) and tokens.dtype == np.float32
        oracle.assert_close(tokens, entry, f"timm forward_intermediates: {backend} backend")


def test_torch_backend_reads_the_eager_model_of_a_compiled_one(tmp_path: Path) -> None:
    """A `CompiledViT` gives its eager model's intermediates (nothing compiles); a model
    without blocks to read is refused by name."""
    write_folder(tmp_path, tiny_config(), ModelKind(classifier=True, pooler=False), seed=0)
    twin = get_backend("torch")
    try:
        compiled = vit_core.load(tmp_path, "torch", compile=True)
    except InputError as error:  # no C++ compiler here
        pytest.skip(str(error))
    pixels = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = twin.intermediates(compiled, pixels, [1], norm=True)
    want = twin.intermediates(compiled.model, pixels, [1], norm=True)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[0].shape == (2, 5, 16)
    with pytest.raises(
        InputError, match=r"cannot read intermediate layers from Identity: .* int8-static"
    ):
        twin.intermediates(torch.nn.Identity(), pixels, [1], norm=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_intermediates_of_a_masked_image_modeling_model_say_where_they_are(
    tmp_path: Path, backend: str
) -> None:
    write_folder(tmp_path, tiny_config(encoder_stride=4), MIM_KIND, seed=0)
    model = vit_core.load(tmp_path, backend)
    pixels = np.zeros((1, 3, *model.config.image_hw), np.float32)
    with pytest.raises(InputError, match="load this masked-image-modeling folder with model_type"):
        get_backend(backend).intermediates(model, pixels, [0], norm=False)
    encoder = vit_core.load(tmp_path, backend, model_type="base")
    assert len(get_backend(backend).intermediates(encoder, pixels, [0], norm=False)) == 1
