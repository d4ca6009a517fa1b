"""`ViTImageProcessor`: images to `pixel_values`, as transformers' ViT image processor does it.

The numbers match transformers' `ViTImageProcessor` (resize with PIL, rescale, normalize,
no centre crop) so a model fine-tuned behind the HF processor sees the same input here, and
`preprocessor_config.json` is read and written in HF's format. Only numpy and PIL are needed;
torch and jax are imported only when `return_tensors` asks for them. Where HF fails on an
input (grayscale, palette or RGBA images, 2-D arrays) this class converts it to RGB instead.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vit_core._io import atomic_write_text, local_path, read_json_object
from vit_core.errors import CheckpointError, ConfigError, ImageError

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


def _to_hwc(image: Any, convert_rgb: bool, input_format: str | None) -> np.ndarray:
    """The image as an (H, W, C) array, channels counted and checked as HF infers them."""
    if isinstance(image, Image.Image):
        if convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")  # what HF's convert_to_rgb does: alpha is dropped
        array = np.asarray(image)
        array = array[..., None] if array.ndim == 2 else array
    else:
        array = _as_array(image)
        if array.dtype.kind not in "biuf":
            raise ImageError(f"expected a numeric (bool/int/float) array; got dtype {array.dtype}")
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
        array = array.astype(np.uint8)
    channels = array.shape[2]
    if channels == 1 and convert_rgb:
        array = np.repeat(array, 3, axis=2)
    elif channels not in (1, 3):
        raise ImageError(
            f"expected 1 or 3 channels; got {channels} in shape {array.shape} "
            "(convert the image to RGB first)"
        )
    return array


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
    if np.ndim(value) == 0:
        return [float(value)] * channels
    if len(value) != channels:
        raise ImageError(f"{name} has {len(value)} values but the image has {channels} channels")
    return list(value)


def _listify(value: float | Sequence[float]) -> float | list[float]:
    return value if np.ndim(value) == 0 else list(value)


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


def _convert(arrays: list[np.ndarray], return_tensors: Any) -> Any:
    """Stack into the requested framework's tensor; frameworks are imported only here."""
    if return_tensors is None:
        return arrays  # HF's default: a list of per-image arrays
    kind = str(getattr(return_tensors, "value", return_tensors)).lower()
    if len({a.shape for a in arrays}) > 1:
        shapes = sorted({a.shape for a in arrays})
        raise ImageError(f"cannot stack images of different shapes {shapes}; resize them first")
    batch = np.stack(arrays)
    if kind in ("np", "numpy"):
        return batch
    if kind in ("pt", "torch"):
        import torch

        return torch.from_numpy(batch)
    if kind == "jax":
        import jax.numpy as jnp

        return jnp.asarray(batch)
    raise ConfigError(f"return_tensors must be 'np', 'pt', 'jax' or None; got {return_tensors!r}")


ViTFeatureExtractor = ViTImageProcessor
