"""`ViTImageProcessor`: images to `pixel_values`, as transformers' ViT image processor does it.

The numbers match transformers' `ViTImageProcessor` (resize with PIL, rescale, normalize,
no centre crop) so a model fine-tuned behind the HF processor sees the same input here, and
`preprocessor_config.json` is read and written in HF's format. Only numpy and PIL are needed;
a framework is imported (through its backend) only when `return_tensors` asks for it. Where
HF fails on an input (grayscale, palette or RGBA images, 2-D arrays) this class converts it
to RGB instead.

What is done with each kind of image (docs/errors.md has the table):

- PIL modes RGB, L: used as they are (L repeated to 3 channels unless
  `do_convert_rgb=False`). "1" (bilevel): black 0, white 255.
- 16-bit: PIL "I;16" (any byte order), "I" (how older Pillow opens 16-bit PNGs; values
  must lie in 0..65535) and uint16 arrays are scaled to 8 bits, v * 255 / 65535 rounded
  (PIL's own `convert` would clip everything above 255 to white). "F" (32-bit float)
  follows the float-array rules below.
- P, PA, LA, RGBA, CMYK, YCbCr, LAB, HSV, RGBX, RGBa, La: converted by PIL to RGB, as
  transformers' `convert_rgb` does; alpha is dropped (not composited), CMYK uses PIL's
  formula (no ICC profile). With `do_convert_rgb=False` they are refused.
- numpy: HW, HWC or CHW with 1 or 3 channels; uint8 as is; bool as 0/255; other ints must
  hold 0..255; floats must be finite, and are resized through 8 bits like HF (integral
  values taken as 0..255, fractions as 0..1). Anything else is an `ImageError`.
- Files (`open_image`): decoded at once (a truncated or corrupt file fails there, naming
  it), the EXIF orientation applied, PIL's decompression-bomb guard kept on.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from vit_core._io import atomic_write_text, local_path, read_json_object
from vit_core.errors import CheckpointError, ConfigError, ImageError

if TYPE_CHECKING:
    from vit_core.config import ViTConfig

PROCESSOR_NAME = "preprocessor_config.json"
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
_FIELDS = (
    "do_resize", "size", "resample", "do_rescale", "rescale_factor",
    "do_normalize", "image_mean", "image_std", "do_convert_rgb",
)  # fmt: skip
# Written by old feature extractors or recomputed on save; keeping them would go stale.
_DROPPED_KEYS = ("feature_extractor_type", "image_processor_type")
_CHANNEL_FORMATS = ("channels_first", "channels_last")


class BatchFeature(dict):
    """A dict that also answers `batch.pixel_values`, like transformers' `BatchFeature`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _size_dict(size: int | Sequence[int] | Mapping[str, int]) -> dict[str, int]:
    """HF's size forms (int, (h, w), {"height", "width"}) reduced to the one ViT resizes to."""
    if isinstance(size, Mapping):
        if set(size) != {"height", "width"}:
            raise ConfigError(f"size must have the keys height and width; got {dict(size)!r}")
        height, width = size["height"], size["width"]
    elif isinstance(size, int):
        height = width = size
    elif isinstance(size, Sequence) and len(size) == 2:
        height, width = size
    else:
        raise ConfigError(f"size must be an int, (height, width) or a dict; got {size!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width)):
        raise ConfigError(f"size needs positive int height and width; got {height!r}, {width!r}")
    return {"height": height, "width": width}


def _as_array(obj: Any) -> np.ndarray:
    """numpy view of an array-like (torch/jax/tf tensors included), or a clear refusal."""
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        try:
            return np.asarray(obj.detach().cpu() if hasattr(obj, "detach") else obj)
        except (TypeError, RuntimeError, ValueError) as exc:
            raise ImageError(f"cannot read {type(obj).__name__} as a numpy array: {exc}") from None
    raise ImageError(
        "expected a PIL.Image.Image, a numpy array (HWC, CHW or HW) or a list of them; "
        f"got {type(obj).__module__}.{type(obj).__qualname__}"
        + (" (open files with PIL.Image.open first)" if isinstance(obj, (str, Path)) else "")
    )


def _flatten(images: Any) -> list[Any]:
    """One list of single images from an image, a 4-D batch, or (nested) lists of those."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageError("expected at least one image; got an empty list")
        return [img for item in images for img in _flatten(item)]
    if isinstance(images, Image.Image):
        return [images]
    array = _as_array(images)
    if array.ndim == 4:
        if array.shape[0] == 0:
            raise ImageError(f"expected at least one image; got a batch of shape {array.shape}")
        return list(array)
    return [array]


# PIL modes whose values are not intensities of one channel or of R, G, B: they mean
# something only after PIL's conversion to RGB.
_CONVERT_ONLY_MODES = ("P", "PA", "YCbCr", "LAB", "HSV")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# What a PIL decoder may raise on a corrupt or truncated file beyond OSError.
_DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, struct.error,
)  # fmt: skip


def _image_name(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    return f"{filename}: " if filename else ""


def scale_16_bit(array: np.ndarray) -> np.ndarray:
    """16-bit intensities (0..65535) as 8-bit ones: v * 255 / 65535, rounded half up."""
    wide = array.astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """PIL's conversion to RGB, through RGBA or LA for the modes it converts only that way
    (premultiplied "La")."""
    for route in (("RGB",), ("RGBA", "RGB"), ("LA", "RGB")):
        try:
            converted = image
            for mode in route:
                converted = converted.convert(mode)
            return converted
        except ValueError as exc:
            if "not supported" not in str(exc):
                raise
    raise ImageError(
        f"{_image_name(image)}PIL cannot convert mode {image.mode} to RGB; convert the image "
        "to RGB yourself first"
    )


def _pil_array(image: Image.Image, convert_rgb: bool) -> np.ndarray:
    """The pixels of a PIL image as an (H, W) or (H, W, C) array, per the module docstring."""
    mode = image.mode
    try:
        if mode in _SIXTEEN_BIT_MODES:
            array = np.asarray(image)
            if mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):
                raise ImageError(
                    f"{_image_name(image)}a 32-bit integer ('I') image with values "
                    f"[{array.min()}, {array.max()}]; expected 16-bit values 0..65535 "
                    "(rescale it to 8 or 16 bits first)"
                )
            return scale_16_bit(array)
        if mode == "1":
            return np.asarray(image.convert("L"))  # black 0, white 255
        if mode in ("RGB", "L", "F"):
            return np.asarray(image)
        if not convert_rgb:
            if mode in _CONVERT_ONLY_MODES:
                channels = len(image.getbands())
                raise ImageError(
                    f"{_image_name(image)}PIL mode {mode} with do_convert_rgb=False: expected 1 "
                    f"or 3 channels of intensities; got {channels} in mode {mode}, whose "
                    "values mean something only after conversion (leave do_convert_rgb unset)"
                )
            return np.asarray(image)  # LA, RGBA, CMYK...: refused below by channel count
        return np.asarray(_pil_to_rgb(image))  # as HF's convert_to_rgb: alpha dropped
    except ImageError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageError(
            f"{_image_name(image)}cannot decode the {mode} image ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupt, or the image was closed"
        ) from None


def _to_hwc(image: Any, convert_rgb: bool, input_format: str | None) -> np.ndarray:
    """The image as an (H, W, C) array, channels counted and checked as HF infers them."""
    if isinstance(image, Image.Image):
        array = _pil_array(image, convert_rgb)
        array = array[..., None] if array.ndim == 2 else array
    else:
        array = _as_array(image)
        if array.dtype.kind not in "biuf":
            raise ImageError(f"expected a numeric (bool/int/float) array; got dtype {array.dtype}")
        if array.dtype.kind == "u" and array.dtype.itemsize == 2:
            array = scale_16_bit(array)
        if array.ndim == 2:
            array = array[..., None]
        elif array.ndim != 3:
            raise ImageError(
                "expected an image of rank 2 (HW), 3 (HWC or CHW) or a batch of rank 4; "
                f"got shape {array.shape} (rank {array.ndim})"
            )
        else:
            first, last = array.shape[0] in (1, 3), array.shape[2] in (1, 3)
            if input_format is None and not (first or last):
                raise ImageError(
                    f"cannot tell the channel axis of an image of shape {array.shape}: expected 1 "
                    "or 3 channels first or last; convert to RGB first (RGBA: arr[..., :3])"
                )
            if input_format == "channels_first" or (input_format is None and first):
                array = array.transpose(1, 2, 0)  # HF also prefers channels-first on a tie
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"expected an image with pixels; got height x width {array.shape[:2]}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * np.uint8(255)  # as PIL's mode "1": True is white
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ImageError("expected finite pixel values; the image contains NaN or inf")
    channels = array.shape[2]
    if channels == 1 and convert_rgb:
        array = np.repeat(array, 3, axis=2)
    elif channels not in (1, 3):
        raise ImageError(
            f"expected 1 or 3 channels; got {channels} in shape {array.shape} "
            "(convert the image to RGB first)"
        )
    return array


def open_image(path: str | Path) -> Image.Image:
    """A decoded, upright PIL image from a file, or an `ImageError` that names the file.

    The pixels are decoded now, so a truncated or corrupt file fails here and not in the
    middle of a batch; any failure of PIL's decoders (which raise OSError, ValueError,
    SyntaxError, EOFError... on hostile files) is an `ImageError`. The EXIF orientation is
    applied (phones store photos sideways and say so in a tag), as an image viewer shows
    the photo; a corrupt EXIF block is ignored. PIL's decompression-bomb guard stays on:
    more than twice `PIL.Image.MAX_IMAGE_PIXELS` pixels is refused before decoding.
    """
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            try:
                upright = ImageOps.exif_transpose(image)
            except _DECODE_ERRORS:  # an unreadable orientation tag: keep the pixels as stored
                upright = image.copy()
            return upright if upright is not None else image.copy()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image format PIL can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({exc})") from None
    except _DECODE_ERRORS as exc:
        raise ImageError(
            f"{path}: cannot read the image, truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from None


def _pil_resize(array: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize through 8-bit PIL as HF does, including its quantisation of float images."""
    back_to_unit = False
    if array.dtype != np.uint8:
        if not np.isfinite(array).all():
            raise ImageError("expected finite pixel values; the image contains NaN or inf")
        if np.allclose(array, array.astype(np.int64)):  # integral values: taken as 0..255
            low, high = 0, 255
        else:  # fractions: taken as 0..1, scaled to 0..255 and truncated (not rounded) like HF
            low, high, back_to_unit = 0, 1, True
        if array.min() < low or array.max() > high:
            raise ImageError(
                f"expected pixel values in [{low}, {high}] to resize; got "
                f"[{array.min()}, {array.max()}] (scale to uint8 0..255 or float 0..1)"
            )
        if back_to_unit:
            array = (array.astype(np.float64) * 255).astype(np.float32)
        array = array.astype(np.uint8)
    squeeze = array.shape[2] == 1
    pil = Image.fromarray(array[..., 0] if squeeze else array)
    out = np.asarray(pil.resize((width, height), resample=resample))
    out = out[..., None] if out.ndim == 2 else out
    return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if back_to_unit else out


def _channel_values(value: float | Sequence[float], channels: int, name: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * channels
    if len(value) != channels:
        raise ImageError(f"{name} has {len(value)} values but the image has {channels} channels")
    return list(value)


def _listify(value: float | Sequence[float]) -> float | list[float]:
    return value if isinstance(value, int | float) else list(value)


class ViTImageProcessor:
    """Turns images into the `pixel_values` a ViT takes; field names and defaults are HF's."""

    def __init__(
        self,
        do_resize: bool = True,
        size: int | Sequence[int] | Mapping[str, int] | None = None,
        resample: int = Image.Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        **extra: Any,
    ) -> None:
        self.do_resize = do_resize
        self.size = _size_dict(size if size is not None else 224)
        self.resample = int(resample)  # an int, so it serialises as HF writes it
        if self.resample not in {int(r) for r in Image.Resampling}:
            raise ConfigError(f"resample must be a PIL filter code 0..5; got {resample!r}")
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = _listify(IMAGENET_STANDARD_MEAN if image_mean is None else image_mean)
        self.image_std = _listify(IMAGENET_STANDARD_STD if image_std is None else image_std)
        self.do_convert_rgb = do_convert_rgb
        # Keys of someone else's config are carried through so that saving loses nothing.
        self.extra = {k: v for k, v in extra.items() if k not in _DROPPED_KEYS}

    def __call__(
        self, images: Any, return_tensors: str | None = "np", **kwargs: Any
    ) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "np",
        *,
        do_resize: bool | None = None,
        size: int | Sequence[int] | Mapping[str, int] | None = None,
        resample: int | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool | None = None,
        input_data_format: str | None = None,
        data_format: str = "channels_first",
    ) -> BatchFeature:
        """`pixel_values` (N, C, H, W) float32; keyword arguments override fields for this call.

        `do_convert_rgb=None` converts (HF would fail on non-RGB input instead); only an
        explicit False keeps single-channel images single-channel.
        """

        def pick(value: Any, field: str) -> Any:
            return getattr(self, field) if value is None else value

        formats = {}
        for name, fmt in (("input_data_format", input_data_format), ("data_format", data_format)):
            formats[name] = None if fmt is None else str(getattr(fmt, "value", fmt))
            if formats[name] not in (None, *_CHANNEL_FORMATS):
                raise ConfigError(f"{name} must be one of {_CHANNEL_FORMATS}; got {fmt!r}")
        height, width = _size_dict(pick(size, "size")).values()
        convert_rgb = pick(do_convert_rgb, "do_convert_rgb") is not False
        rescale = pick(do_rescale, "do_rescale")
        outputs = []
        for image in _flatten(images):
            array = _to_hwc(image, convert_rgb, formats["input_data_format"])
            if rescale and array.dtype.kind == "f" and array.min() >= 0 and array.max() <= 1:
                warnings.warn(  # HF warns too, and like HF we still rescale: 1/255 twice
                    "pixel values already lie in [0, 1] but do_rescale=True scales them again; "
                    "pass do_rescale=False for images scaled to [0, 1]",
                    stacklevel=3,
                )
            if pick(do_resize, "do_resize"):
                array = _pil_resize(array, height, width, int(pick(resample, "resample")))
            if rescale:
                scale = pick(rescale_factor, "rescale_factor")
                array = (array.astype(np.float64) * scale).astype(np.float32)  # HF's rounding
            if pick(do_normalize, "do_normalize"):
                array = array if array.dtype.kind == "f" else array.astype(np.float32)
                channels = array.shape[2]
                mean = _channel_values(pick(image_mean, "image_mean"), channels, "image_mean")
                std = _channel_values(pick(image_std, "image_std"), channels, "image_std")
                array = (array - np.array(mean, array.dtype)) / np.array(std, array.dtype)
            array = array.astype(np.float32)
            channels_last = formats["data_format"] == "channels_last"
            outputs.append(array if channels_last else array.transpose(2, 0, 1))
        return BatchFeature(pixel_values=_convert(outputs, return_tensors))

    # ------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """The `preprocessor_config.json` content, keys sorted as HF writes them."""
        out = {**self.extra, **{name: getattr(self, name) for name in _FIELDS}}
        out["image_processor_type"] = "ViTImageProcessor"
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> ViTImageProcessor:
        return cls(**{**data, **overrides})

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> ViTImageProcessor:
        """Read `preprocessor_config.json` from a local folder (or the file itself)."""
        try:
            resolved = local_path(path)
        except CheckpointError as exc:  # same message, but a config is what is missing
            raise ConfigError(str(exc)) from None
        file = resolved / PROCESSOR_NAME if resolved.is_dir() else resolved
        data = read_json_object(file)
        try:
            return cls.from_dict(data, **overrides)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(folder / PROCESSOR_NAME, self.to_json_string())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ViTImageProcessor) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


# `return_tensors` names (transformers') -> the backend whose framework makes that tensor.
TENSOR_BACKENDS = {"pt": "torch", "torch": "torch", "jax": "flax"}


def _convert(arrays: list[np.ndarray], return_tensors: Any) -> Any:
    """Stack into the requested framework's tensor; its backend is imported only here."""
    if return_tensors is None:
        return arrays  # HF's default: a list of per-image arrays
    kind = str(getattr(return_tensors, "value", return_tensors)).lower()
    if len({a.shape for a in arrays}) > 1:
        shapes = sorted({a.shape for a in arrays})
        raise ImageError(f"cannot stack images of different shapes {shapes}; resize them first")
    batch = np.stack(arrays)
    if kind in ("np", "numpy"):
        return batch
    if kind in TENSOR_BACKENDS:
        from vit_core.backend import get_backend

        return get_backend(TENSOR_BACKENDS[kind]).as_tensor(batch)
    raise ConfigError(f"return_tensors must be 'np', 'pt', 'jax' or None; got {return_tensors!r}")


ViTFeatureExtractor = ViTImageProcessor


def processor_for(model_path: Path, config: ViTConfig) -> ViTImageProcessor:
    """The folder's `preprocessor_config.json`, or a default one sized for the model.

    The default is HF's ViT processor (resize, rescale 1/255, mean = std = 0.5) but at the
    model's `image_size`, not HF's 224, so that a folder without a processor still runs.
    """
    folder = model_path if model_path.is_dir() else model_path.parent
    if (folder / PROCESSOR_NAME).is_file():
        return ViTImageProcessor.from_pretrained(folder)
    height, width = config.image_hw
    return ViTImageProcessor(size={"height": height, "width": width})


def model_processor(model_path: Path, model: Any) -> ViTImageProcessor:
    """The processor of a loaded model: the one it carries where it carries one (an
    exported graph stores the processor it was exported with: `vit_onnx`), else the one
    `processor_for` finds for its file."""
    carried = getattr(model, "processor", None)
    if isinstance(carried, ViTImageProcessor):
        return carried
    return processor_for(model_path, model.config)
