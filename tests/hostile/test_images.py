"""Images from anywhere: every kind either converts as documented or is a clear `ImageError`.

`FILE_CASES` and `PIXEL_CASES` are the image part of the bad-input corpus (files through
`open_image`, objects through the processor). The conversions (16-bit, bilevel, palette,
CMYK, alpha, EXIF orientation) are asserted value by value, as docs/errors.md states them.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vit_core import cli
from vit_core.errors import ImageError
from vit_core.processing import ViTImageProcessor, open_image, scale_16_bit

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)
PLAIN = ViTImageProcessor(
    do_resize=False, do_rescale=False, do_normalize=False, image_mean=0, image_std=1
)


def _encoded(fmt: str, image: Image.Image | None = None, **save: Any) -> bytes:
    buffer = io.BytesIO()
    (image or Image.fromarray(RGB)).save(buffer, fmt, **save)
    return buffer.getvalue()


def _corrupt_png_chunk() -> bytes:
    """The IDAT chunk's length made 10 bytes short: the decoder then reads pixel bytes as
    the next chunk's name (PIL raises SyntaxError, not OSError)."""
    data = bytearray(_encoded("PNG"))
    assert data[37:41] == b"IDAT"
    (length,) = struct.unpack(">I", data[33:37])
    data[33:37] = struct.pack(">I", length - 10)
    return bytes(data)


def _file(content: bytes | Callable[[], bytes], name: str = "image.png") -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content() if callable(content) else content)
        return path

    return build


def _a_folder(folder: Path) -> Path:
    (folder / "photos").mkdir()
    return folder / "photos"


# name -> (build(tmp_path) -> file, message fragment)
FILE_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated_png": (_file(lambda: _encoded("PNG")[:200]), r"truncated or corrupt"),
    "truncated_jpeg": (
        _file(lambda: _encoded("JPEG")[:300], "photo.jpg"),
        r"photo\.jpg: cannot read the image, truncated or corrupt",
    ),
    "png_with_broken_chunk": (_file(_corrupt_png_chunk), r"truncated or corrupt \(SyntaxError"),
    "ppm_with_broken_header": (
        _file(b"P6\n3\x82 2\n255\n" + bytes(18), "image.ppm"),
        r"image\.ppm: cannot read the image.*ValueError",
    ),
    "random_bytes": (
        _file(np.random.default_rng(1).bytes(2048)),
        r"not an image format PIL can read",
    ),
    "empty_file": (_file(b""), r"image\.png: not an image format PIL can read"),
    "text_file": (_file(b"hello, world\n", "notes.jpg"), r"notes\.jpg: not an image format"),
    "a_folder": (_a_folder, r"photos: is a folder, not an image file"),
    "missing": (lambda folder: folder / "gone.png", r"gone\.png: no such image file"),
}


@pytest.mark.parametrize("name", FILE_CASES)
def test_bad_image_file(tmp_path: Path, name: str) -> None:
    build, fragment = FILE_CASES[name]
    path = build(tmp_path)
    with pytest.raises(ImageError, match=fragment) as info:
        open_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name", ["truncated_png", "random_bytes", "a_folder", "missing"])
def test_the_cli_reader_agrees(tmp_path: Path, name: str) -> None:
    build, _ = FILE_CASES[name]
    path = build(tmp_path)
    with pytest.raises(ImageError, match=f"^{path}: "):
        cli.open_image(path)


@pytest.mark.parametrize("reader", [open_image, cli.open_image], ids=["processing", "cli"])
def test_decompression_bomb_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: Callable[[Path], Any]
) -> None:
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)  # 10,000 pixels: a "bomb" under a 4,000 limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)
    with pytest.raises(ImageError, match=r"bomb\.png: refused as a possible decompression bomb"):
        reader(path)


@pytest.mark.parametrize("reader", [open_image, cli.open_image], ids=["processing", "cli"])
def test_exif_orientation_is_applied(tmp_path: Path, reader: Callable[[Path], Any]) -> None:
    """Orientation 6: the camera was turned; the stored 24x32 photo shows as 32x24."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(RGB).save(path, exif=exif, quality=95)
    upright = reader(path)
    assert upright.size == (24, 32)  # (width, height): turned a quarter
    stored = np.asarray(Image.open(path))
    assert np.abs(np.asarray(upright).astype(int) - np.rot90(stored, -1)).max() == 0


def test_a_lazily_opened_truncated_file_fails_in_the_processor(tmp_path: Path) -> None:
    """`Image.open` decodes nothing; the processor is where the damage shows."""
    path = tmp_path / "cut.png"
    path.write_bytes(_encoded("PNG")[:300])
    with pytest.raises(ImageError, match=r"cut\.png: cannot decode the RGB image .*truncated"):
        ViTImageProcessor()(Image.open(path))


def test_a_closed_image(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(RGB).save(path)
    image = Image.open(path)
    image.close()
    with pytest.raises(ImageError, match=r"cannot decode .*closed"):
        ViTImageProcessor()(image)


# ---------------------------------------------------------------- pixel objects
def _pil(mode: str, size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new(mode, size)


def _mode_i(low: int, high: int) -> Image.Image:
    return Image.fromarray(np.array([[low, high]], dtype=np.int32), mode="I")


# name -> (image, processor keyword arguments, message fragment)
PIXEL_CASES: dict[str, tuple[Any, dict[str, Any], str]] = {
    "zero_size_pil": (_pil("RGB", (0, 0)), {}, r"with pixels; got height x width \(0, 0\)"),
    "zero_width_array": (np.zeros((8, 0, 3), np.uint8), {}, r"with pixels"),
    "rank_0": (np.array(3, np.uint8), {}, r"rank 2 .*got shape \(\) \(rank 0\)"),
    "rank_1": (np.zeros(12, np.uint8), {}, r"got shape \(12,\) \(rank 1\)"),
    "rank_5": (np.zeros((1, 1, 8, 8, 3), np.uint8), {}, r"\(rank 5\)"),
    "two_channels": (np.zeros((8, 8, 2), np.uint8), {}, r"channel axis .*\(8, 8, 2\)"),
    "four_channels": (np.zeros((8, 8, 4), np.uint8), {}, r"\(RGBA: arr\[\.\.\., :3\]\)"),
    "four_channels_declared": (
        np.zeros((8, 8, 4), np.uint8),
        {"input_data_format": "channels_last"},
        r"expected 1 or 3 channels; got 4",
    ),
    "complex_dtype": (np.zeros((8, 8, 3), np.complex64), {}, r"numeric .*complex64"),
    "object_dtype": (np.empty((8, 8, 3), object), {}, r"numeric .*object"),
    "string_dtype": (np.full((8, 8), "x"), {}, r"numeric .*<U1"),
    "datetime_dtype": (np.zeros((8, 8), "datetime64[s]"), {}, r"numeric .*datetime64"),
    "nan_without_resize": (
        np.full((8, 8, 3), np.nan, np.float32),
        {"do_resize": False},
        r"finite pixel values; the image contains NaN or inf",
    ),
    "inf_float16": (np.full((8, 8), np.inf, np.float16), {}, r"NaN or inf"),
    "int_above_255": (np.full((8, 8, 3), 300, np.int32), {}, r"in \[0, 255\] .*300"),
    "negative_int": (np.full((8, 8, 3), -1, np.int8), {}, r"in \[0, 255\]"),
    "float_out_of_range": (np.full((8, 8, 3), 1.5), {}, r"in \[0, 1\] to resize"),
    "mode_i_beyond_16_bits": (_mode_i(0, 70_000), {}, r"values \[0, 70000\]; expected 16-bit"),
    "mode_i_negative": (_mode_i(-5, 10), {}, r"expected 16-bit values 0\.\.65535"),
    "palette_without_conversion": (
        _pil("P"),
        {"do_convert_rgb": False},
        r"PIL mode P with do_convert_rgb=False",
    ),
    "ycbcr_without_conversion": (
        _pil("YCbCr"),
        {"do_convert_rgb": False},
        r"got 3 in mode YCbCr",
    ),
    "cmyk_without_conversion": (
        _pil("CMYK"),
        {"do_convert_rgb": False},
        r"expected 1 or 3 channels; got 4",
    ),
    "la_without_conversion": (_pil("LA"), {"do_convert_rgb": False}, r"got 2 in shape"),
    "a_path_string": ("cat.jpg", {}, r"open files with PIL\.Image\.open first"),
    "bytes": (b"\x89PNG", {}, r"got builtins\.bytes"),
    "none": (None, {}, r"got builtins\.NoneType"),
    "empty_list": ([], {}, r"at least one image; got an empty list"),
    "empty_batch": (np.zeros((0, 8, 8, 3), np.uint8), {}, r"at least one image"),
}


@pytest.mark.parametrize("name", PIXEL_CASES)
def test_bad_pixels(name: str) -> None:
    image, kwargs, fragment = PIXEL_CASES[name]
    with pytest.raises(ImageError, match=fragment):
        ViTImageProcessor(size=8)(image, **kwargs)


# ------------------------------------------------------------ documented conversions
def _pixels(image: Any, **kwargs: Any) -> np.ndarray:
    """The processor's output before rescale/normalise, as (H, W, C) numbers."""
    return PLAIN(image, data_format="channels_last", **kwargs)["pixel_values"][0]


def test_16_bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 1, 128, 129, 257, 32896, 65278, 65535]], dtype=np.uint16)
    expected = np.array([0, 0, 0, 1, 1, 128, 254, 255])
    assert np.array_equal(scale_16_bit(values)[0], expected)
    clipped = np.asarray(Image.fromarray(values).convert("RGB"))[0, :, 0]
    assert clipped.tolist() == [0, 1, 128, 129, 255, 255, 255, 255]  # what PIL alone does
    for image in (
        Image.fromarray(values),  # "I;16"
        Image.fromarray(values.astype(np.int32), mode="I"),  # older Pillow's 16-bit PNG
        values,  # a uint16 array
        values.astype(">u2"),  # big-endian, as "I;16B" files hold it
    ):
        got = _pixels(image)
        assert got.shape == (1, 8, 3)
        assert np.array_equal(got[0, :, 0], expected) and np.array_equal(got[..., 0], got[..., 2])


def test_16_bit_png_file_end_to_end(tmp_path: Path) -> None:
    ramp = (np.arange(64, dtype=np.uint32) * 1040).astype(np.uint16).reshape(8, 8)
    path = tmp_path / "depth.png"
    Image.fromarray(ramp).save(path)
    opened = open_image(path)
    assert opened.mode == "I;16"
    assert np.array_equal(_pixels(opened)[..., 1], scale_16_bit(ramp))
    assert _pixels(opened).max() > 200  # PIL's convert("RGB") would give 255 nearly everywhere


def test_16_bit_rgb_array() -> None:
    rgb16 = RGB.astype(np.uint16) * 257  # the 8-bit image, widened exactly
    assert np.array_equal(_pixels(rgb16), RGB)


def test_bilevel_and_bool_are_black_and_white() -> None:
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    for image in (mask, Image.fromarray(mask)):
        got = _pixels(image)
        assert got[..., 0].tolist() == (mask * 255).tolist()


@pytest.mark.parametrize("mode", ["P", "CMYK", "LA", "RGBA", "PA", "YCbCr", "RGBX", "RGBa", "La"])
def test_other_modes_convert_through_pil(mode: str) -> None:
    base = Image.fromarray(RGB)
    source = base.convert("RGBA").convert(mode) if mode in ("RGBa", "La", "PA") else base
    image = source if source.mode == mode else base.convert(mode)
    via = {"La": ("LA", "RGB")}.get(mode, ("RGB",))  # PIL turns La into RGB only via LA
    expected = image
    for step in via:
        expected = expected.convert(step)
    got = _pixels(image)
    assert got.shape == (24, 32, 3) and np.array_equal(got, np.asarray(expected))


def test_alpha_is_dropped_not_composited() -> None:
    """As transformers does: a fully transparent pixel keeps its stored colour."""
    rgba = np.dstack([RGB, np.zeros(RGB.shape[:2], np.uint8)])
    assert np.array_equal(_pixels(Image.fromarray(rgba, mode="RGBA")), RGB)


def test_float_image_mode_f_follows_the_array_rules() -> None:
    fractions = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    image = Image.fromarray(fractions, mode="F")
    got = ViTImageProcessor(size=8, do_normalize=False, do_rescale=False)(image)
    assert got["pixel_values"].shape == (1, 3, 8, 8)
    assert np.abs(got["pixel_values"][0, 0] - fractions).max() <= 1 / 255
