"""`vit_core.processing.ViTImageProcessor` against transformers' `ViTImageProcessor` as oracle.

Real photos from scikit-image, every input kind, sizes above, at and below the target (so
both down- and up-scaling), non-square targets and ImageNet statistics. Where transformers
refuses an input (non-RGB PIL modes without `do_convert_rgb=True`, 2-D or 1-channel arrays)
the oracle gets the RGB image it would need, and ours gets the raw input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image

from vit_core.errors import ConfigError, ImageError
from vit_core.processing import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    PROCESSOR_NAME,
    BatchFeature,
    ViTFeatureExtractor,
    ViTImageProcessor,
)

transformers = pytest.importorskip("transformers")
HF = transformers.ViTImageProcessor
TOL = 1e-5
IMAGENET = {"image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD)}


@pytest.fixture(autouse=True, scope="module")
def _quiet_oracle():
    """The oracle logs warnings (ambiguous channels, double rescale) that are expected here."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


_CHELSEA, _ASTRONAUT, _COFFEE = (
    skimage.data.chelsea(),
    skimage.data.astronaut(),
    skimage.data.coffee(),
)
_CAMERA = skimage.data.camera()
RGB_SOURCES = {
    "chelsea_300x451": _CHELSEA,  # landscape, downscaled
    "astronaut_224x224": _ASTRONAUT[100:324, 150:374],  # already the target size
    "coffee_400x150": _COFFEE[:, 200:350],  # portrait crop
    "chelsea_40x61": _resized(_CHELSEA, 40, 61),  # upscaled
    "astronaut_17x29": _resized(_ASTRONAUT, 17, 29),  # tiny, upscaled a lot
}
GRAY_SOURCES = {
    "camera_512x512": _CAMERA,
    "camera_130x90": _CAMERA[200:330, 100:190],
    "camera_21x33": _resized(_CAMERA, 21, 33),
}


def _rgba(image: np.ndarray) -> Image.Image:
    alpha = np.linspace(0, 255, image.shape[0] * image.shape[1]).reshape(image.shape[:2])
    return Image.fromarray(np.dstack([image, alpha.astype(np.uint8)]), mode="RGBA")


# kind -> (ours_input, oracle_input, kwargs for both, extra kwargs for the oracle only)
Case = tuple[Any, Any, dict[str, Any], dict[str, Any]]
RGB_KINDS: dict[str, Callable[[np.ndarray], Case]] = {
    "pil_rgb": lambda im: (Image.fromarray(im), Image.fromarray(im), {}, {}),
    "pil_rgba": lambda im: (_rgba(im), _rgba(im), {}, {"do_convert_rgb": True}),
    "pil_p": lambda im: (
        Image.fromarray(im).convert("P"),
        Image.fromarray(im).convert("P"),
        {},
        {"do_convert_rgb": True},
    ),
    "pil_cmyk": lambda im: (
        Image.fromarray(im).convert("CMYK"),
        Image.fromarray(im).convert("CMYK"),
        {},
        {"do_convert_rgb": True},
    ),
    "np_hwc_uint8": lambda im: (im, im, {}, {}),
    "np_chw_uint8": lambda im: (im.transpose(2, 0, 1), im.transpose(2, 0, 1), {}, {}),
    "np_hwc_float01": lambda im: (im / 255.0, im / 255.0, {"do_rescale": False}, {}),
    "np_chw_float32_01": lambda im: (
        (im / np.float32(255)).transpose(2, 0, 1),
        (im / np.float32(255)).transpose(2, 0, 1),
        {"do_rescale": False},
        {},
    ),
    "np_hwc_float_0_255": lambda im: (im.astype(np.float32), im.astype(np.float32), {}, {}),
    "np_hwc_int64": lambda im: (im.astype(np.int64), im.astype(np.int64), {}, {}),
}


def _gray_rgb(im: np.ndarray) -> Image.Image:
    return Image.fromarray(im).convert("RGB")


GRAY_KINDS: dict[str, Callable[[np.ndarray], Case]] = {
    "pil_l": lambda im: (Image.fromarray(im), Image.fromarray(im), {}, {"do_convert_rgb": True}),
    "pil_la": lambda im: (Image.fromarray(im).convert("LA"), _gray_rgb(im), {}, {}),
    "np_2d_uint8": lambda im: (im, _gray_rgb(im), {}, {}),
    "np_hw1_uint8": lambda im: (im[..., None], _gray_rgb(im), {}, {}),
    "np_1hw_uint8": lambda im: (im[None], _gray_rgb(im), {}, {}),
    "np_2d_float01": lambda im: (
        im / 255.0,
        np.dstack([im / 255.0] * 3),
        {"do_rescale": False},
        {},
    ),
}


def _compare(
    ours_in: Any, hf_in: Any, kwargs: dict[str, Any], hf_only: dict[str, Any]
) -> np.ndarray:
    ours = ViTImageProcessor(**kwargs)(ours_in)
    expected = HF(**kwargs, **hf_only)(hf_in, return_tensors="np").pixel_values
    got = ours.pixel_values
    assert isinstance(ours, BatchFeature) and got is ours["pixel_values"]
    assert got.dtype == np.float32 and got.ndim == 4 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL
    return got


@pytest.mark.parametrize("source", RGB_SOURCES)
@pytest.mark.parametrize("kind", RGB_KINDS)
def test_rgb_inputs_match_transformers(kind: str, source: str) -> None:
    ours_in, hf_in, kwargs, hf_only = RGB_KINDS[kind](RGB_SOURCES[source])
    _compare(ours_in, hf_in, kwargs, hf_only)


@pytest.mark.parametrize("source", GRAY_SOURCES)
@pytest.mark.parametrize("kind", GRAY_KINDS)
def test_grayscale_inputs_become_rgb_like_transformers(kind: str, source: str) -> None:
    ours_in, hf_in, kwargs, hf_only = GRAY_KINDS[kind](GRAY_SOURCES[source])
    assert _compare(ours_in, hf_in, kwargs, hf_only).shape[1] == 3


@pytest.mark.parametrize("source", ["chelsea_300x451", "coffee_400x150", "chelsea_40x61"])
@pytest.mark.parametrize(
    "options",
    [
        {"size": {"height": 384, "width": 256}, **IMAGENET},
        {"size": (160, 320), "resample": Image.Resampling.BICUBIC},
        {"size": 96, "resample": Image.Resampling.NEAREST, "do_normalize": False},
        {"resample": Image.Resampling.LANCZOS, "rescale_factor": 1 / 127.5, **IMAGENET},
        {"do_resize": False},
        {"do_resize": False, "do_rescale": False, **IMAGENET},
    ],
    ids=["384x256_imagenet", "tuple_bicubic", "int_nearest_no_norm", "lanczos", "no_resize", "raw"],
)
def test_non_default_options_match_transformers(options: dict[str, Any], source: str) -> None:
    image = RGB_SOURCES[source]
    _compare(image, image, options, {})
    # the same options given per call instead of in the constructor
    per_call = ViTImageProcessor()(image, **options).pixel_values
    expected = HF(**options)(image, return_tensors="np").pixel_values
    assert np.abs(per_call - expected).max() <= TOL


def test_float_images_are_quantised_to_8_bits_when_resized() -> None:
    # transformers resizes through an 8-bit PIL image and truncates x * 255; we match it.
    image = np.full((8, 8, 3), 0.5)
    got = ViTImageProcessor(do_normalize=False, do_rescale=False)(image).pixel_values
    np.testing.assert_allclose(got, np.float32(127 / 255), atol=1e-7)
    _compare(image, image, {"do_rescale": False}, {})


def test_float_images_rescaled_twice_warn_but_match_transformers() -> None:
    image = RGB_SOURCES["chelsea_40x61"] / 255.0
    with pytest.warns(UserWarning, match="do_rescale=False"):
        _compare(image, image, {}, {})


def test_batches_match_transformers() -> None:
    images = [RGB_SOURCES["chelsea_300x451"], RGB_SOURCES["coffee_400x150"], _CHELSEA[:50, :90]]
    expected = HF(**IMAGENET)(images, return_tensors="np").pixel_values
    pil = [Image.fromarray(im) for im in images]
    for batch in (images, tuple(images), pil, [pil[0], [images[1], pil[2]]]):
        got = ViTImageProcessor(**IMAGENET)(batch).pixel_values
        assert got.shape == (3, 3, 224, 224) and np.abs(got - expected).max() <= TOL
    stacked = np.stack([RGB_SOURCES["chelsea_40x61"]] * 2)
    _compare(stacked, stacked, {}, {})
    _compare([stacked, stacked], [stacked, stacked], {}, {})
    mixed = [Image.fromarray(_CAMERA), _CHELSEA]  # grayscale and colour in one batch
    expected = HF()([_gray_rgb(_CAMERA), _CHELSEA], return_tensors="np").pixel_values
    assert np.abs(ViTImageProcessor()(mixed).pixel_values - expected).max() <= TOL


def test_ambiguous_channels_are_taken_first_like_transformers() -> None:
    image = _CHELSEA[100:103, 200:240]  # shape (3, 40, 3): channels first or last?
    _compare(image, image, {}, {})
    got = ViTImageProcessor()(image, input_data_format="channels_last").pixel_values
    expected = HF()(image, input_data_format="channels_last", return_tensors="np").pixel_values
    assert np.abs(got - expected).max() <= TOL
    # A PIL image is always HWC: unlike transformers, a 3-pixel-tall one is not read as CHW.
    assert np.array_equal(ViTImageProcessor()(Image.fromarray(image)).pixel_values, got)


def test_channels_last_output_and_single_channel_when_conversion_is_off() -> None:
    got = ViTImageProcessor()(_CHELSEA, data_format="channels_last").pixel_values
    assert got.shape == (1, 224, 224, 3)
    gray = ViTImageProcessor(do_convert_rgb=False, image_mean=0.5, image_std=0.5)(_CAMERA)
    assert gray.pixel_values.shape == (1, 1, 224, 224)


def test_return_tensors() -> None:
    expected = ViTImageProcessor()(_CHELSEA).pixel_values
    as_list = ViTImageProcessor()(_CHELSEA, return_tensors=None).pixel_values
    assert isinstance(as_list, list) and np.array_equal(as_list[0], expected[0])
    torch = pytest.importorskip("torch")
    pt = ViTImageProcessor()(_CHELSEA, return_tensors="pt").pixel_values
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32
    assert np.array_equal(pt.numpy(), expected)
    jax = pytest.importorskip("jax")
    jx = ViTImageProcessor()(_CHELSEA, return_tensors="jax")["pixel_values"]
    assert isinstance(jx, jax.Array) and jx.dtype == np.float32
    assert np.array_equal(np.asarray(jx), expected)
    tensor_in = ViTImageProcessor()(torch.from_numpy(_CHELSEA)).pixel_values
    assert np.array_equal(tensor_in, expected)


def test_import_needs_neither_torch_nor_jax() -> None:
    code = (
        "import sys, vit_core.processing as p, numpy as np\n"
        "p.ViTImageProcessor()(np.zeros((8, 8, 3), np.uint8))\n"
        "assert not {'torch', 'jax', 'transformers'} & set(sys.modules), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_fields_defaults_and_constants_match_transformers() -> None:
    ours = ViTImageProcessor()
    theirs = {k: v for k, v in HF().to_dict().items() if k != "_processor_class"}
    assert ours.to_dict() == theirs
    assert ours.resample == 2 and isinstance(ours.resample, int)
    assert list(IMAGENET_STANDARD_MEAN) == transformers.image_utils.IMAGENET_STANDARD_MEAN
    assert list(IMAGENET_STANDARD_STD) == transformers.image_utils.IMAGENET_STANDARD_STD
    assert list(IMAGENET_DEFAULT_MEAN) == transformers.image_utils.IMAGENET_DEFAULT_MEAN
    assert list(IMAGENET_DEFAULT_STD) == transformers.image_utils.IMAGENET_DEFAULT_STD
    assert ViTImageProcessor(size=384).size == HF(size=384).size == {"height": 384, "width": 384}
    assert ViTImageProcessor(size=(384, 256)).size == HF(size=(384, 256)).size
    assert ViTFeatureExtractor is ViTImageProcessor


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"size": {"height": 384, "width": 256}, "resample": 3, "do_convert_rgb": True, **IMAGENET},
    ],
    ids=["default", "custom"],
)
def test_save_load_round_trip_with_transformers(tmp_path: Path, options: dict[str, Any]) -> None:
    ours_dir, hf_dir = tmp_path / "ours", tmp_path / "hf"
    written = ViTImageProcessor(**options).save_pretrained(ours_dir)
    HF(**options).save_pretrained(hf_dir)
    assert written == ours_dir / PROCESSOR_NAME
    assert written.read_text() == (hf_dir / PROCESSOR_NAME).read_text()  # byte-identical
    assert [p.name for p in ours_dir.iterdir()] == [PROCESSOR_NAME]  # no temp file left
    from_ours, from_hf = HF.from_pretrained(ours_dir), ViTImageProcessor.from_pretrained(hf_dir)
    assert from_ours.to_json_string() == from_hf.to_json_string()
    assert from_hf == ViTImageProcessor(**options)
    image = RGB_SOURCES["coffee_400x150"]
    ours_out = ViTImageProcessor.from_pretrained(hf_dir / PROCESSOR_NAME)(image).pixel_values
    hf_out = from_ours(image, return_tensors="np").pixel_values
    assert np.abs(ours_out - hf_out).max() <= TOL


def test_unknown_and_legacy_keys_are_carried_like_transformers(tmp_path: Path) -> None:
    legacy = {
        "feature_extractor_type": "ViTFeatureExtractor",
        "size": 384,
        "resample": 2,
        "processor_class": "SomeProcessor",
        "my_custom_key": [1, 2],
    }
    path = tmp_path / "legacy.json"
    path.write_text(json.dumps(legacy))
    ours = ViTImageProcessor.from_pretrained(path)
    assert ours.size == {"height": 384, "width": 384}
    assert ours.to_json_string() == HF.from_pretrained(path).to_json_string()
    assert ViTImageProcessor.from_pretrained(path, do_normalize=False).do_normalize is False
    ours.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / PROCESSOR_NAME).read_text())["my_custom_key"] == [1, 2]
    assert ViTImageProcessor.from_dict(ours.to_dict()) == ours


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("google/vit-base-patch16-224", "never downloads"),
        ("/no/such/folder/anywhere", "no such file or folder"),
    ],
)
def test_from_pretrained_missing_path(target: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        ViTImageProcessor.from_pretrained(target)


def test_from_pretrained_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=PROCESSOR_NAME):
        ViTImageProcessor.from_pretrained(tmp_path)
    (tmp_path / PROCESSOR_NAME).write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ViTImageProcessor.from_pretrained(tmp_path)
    (tmp_path / PROCESSOR_NAME).write_text(json.dumps({"size": {"shortest_edge": 224}}))
    with pytest.raises(ConfigError, match="height and width"):
        ViTImageProcessor.from_pretrained(tmp_path)


_RGBA = Image.new("RGBA", (8, 8))
IMAGE_ERRORS = {
    "rank_1": (np.zeros(10, np.uint8), {}, r"rank 2 .* got shape \(10,\) \(rank 1\)"),
    "rank_5": (np.zeros((1, 2, 8, 8, 3), np.uint8), {}, r"got shape \(1, 2, 8, 8, 3\) \(rank 5\)"),
    "2_channels": (
        np.zeros((8, 8, 2), np.uint8),
        {},
        r"channel axis .* \(8, 8, 2\): expected 1 or 3",
    ),
    "5_channels_first": (np.zeros((5, 8, 8), np.uint8), {}, r"channel axis .* \(5, 8, 8\)"),
    "4_channels": (
        np.zeros((8, 8, 4), np.uint8),
        {},
        r"channel axis .* \(RGBA: arr\[\.\.\., :3\]\)",
    ),
    "string_dtype": (np.full((8, 8, 3), "a"), {}, "numeric .* got dtype <U1"),
    "object_dtype": (np.empty((8, 8, 3), object), {}, "numeric .* got dtype object"),
    "complex_dtype": (np.zeros((8, 8, 3), complex), {}, "numeric .* got dtype complex128"),
    "empty_list": ([], {}, "at least one image; got an empty list"),
    "empty_batch": (np.zeros((0, 8, 8, 3), np.uint8), {}, r"at least one image; .* \(0, 8, 8, 3\)"),
    "zero_height": (np.zeros((0, 8, 3), np.uint8), {}, r"with pixels; got height x width \(0, 8\)"),
    "zero_width_pil": (Image.new("RGB", (0, 5)), {}, r"with pixels; got height x width \(5, 0\)"),
    "path_string": ("cat.jpg", {}, "PIL.Image.open"),
    "int": (42, {}, "got builtins.int"),
    "dict_in_list": ([np.zeros((8, 8, 3)), {"a": 1}], {}, "got builtins.dict"),
    "float_out_of_range": (np.linspace(-1, 2, 192).reshape(8, 8, 3), {}, r"in \[0, 1\]"),
    "int_out_of_range": (np.full((8, 8, 3), 300, np.int64), {}, r"in \[0, 255\] .* 300"),
    "nan": (np.full((8, 8, 3), np.nan), {}, "NaN or inf"),
    "rgba_without_conversion": (_RGBA, {"do_convert_rgb": False}, "got 4 in shape"),
    "gray_without_conversion": (
        Image.new("L", (8, 8)),
        {"do_convert_rgb": False},
        "image_mean has 3 values but the image has 1 channels",
    ),
    "unstackable": (
        [np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)],
        {"do_resize": False},
        "different shapes",
    ),
}


@pytest.mark.parametrize("name", IMAGE_ERRORS)
def test_image_errors(name: str) -> None:
    images, kwargs, fragment = IMAGE_ERRORS[name]
    with pytest.raises(ImageError, match=fragment):
        ViTImageProcessor()(images, **kwargs)


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: ViTImageProcessor(size={"shortest_edge": 224}), "keys height and width"),
        (lambda: ViTImageProcessor(size=(0, 224)), "positive int"),
        (lambda: ViTImageProcessor(size="big"), "an int, .* got 'big'"),
        (lambda: ViTImageProcessor(resample=9), "PIL filter code"),
        (lambda: ViTImageProcessor()(_CHELSEA, return_tensors="tf"), "got 'tf'"),
        (lambda: ViTImageProcessor()(_CHELSEA, input_data_format="nchw"), "got 'nchw'"),
        (lambda: ViTImageProcessor()(_CHELSEA, data_format="hwc"), "got 'hwc'"),
    ],
)
def test_config_errors(build: Callable[[], Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build()
