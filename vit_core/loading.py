"""`load`: a canonical folder -> a ready model in the framework asked for; `save_folder` back.

The one road in: find the files, read the config, check the safetensors header (sizes,
offsets, dtypes, names: `vit_core.safetensors_header`) before any tensor is read, read
the tensors (safetensors, no pickle), refuse non-finite values, check every key and shape
against the config, rename to the twins' internal names, and only then import the
backend's framework and build the model. What is done with each stored dtype is
`DTYPE_POLICY` (and docs/errors.md).

Two explicit changes can be asked for on the way, both done here in numpy so that the
PyTorch and the Flax model come out with the same weights:

- `image_size=`: the position table is resampled to the new grid (`vit_core.resample`)
  and the config gets the new size, so the model runs at that size without
  `interpolate_pos_encoding` and `save_pretrained` writes the resized model.
- `num_labels=`: the classifier is re-initialised for a new label set, the rest kept
  (transformers' `ignore_mismatched_sizes`, but asked for by name, never silent).
"""

from __future__ import annotations

import dataclasses
import importlib
import mmap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from vit_core._io import (
    can_write_in_place,
    files_in_place,
    local_path,
    read_json_object,
    staged_folder,
)
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    LayoutError,
    OutputExistsError,
    WriteError,
)
from vit_core.initialization import truncated_normal
from vit_core.layout import (
    BASE_PREFIX,
    WEIGHTS_NAME,
    ModelKind,
    check_layout,
    expected_shapes,
    model_kind,
    to_canonical,
    to_internal,
)
from vit_core.resample import (
    DEFAULT_INTERPOLATION,
    check_interpolation,
    resample_position_embeddings,
)
from vit_core.safetensors_header import Header, read_header

BACKENDS = {"torch": "vit_torch.weights", "flax": "vit_flax.weights"}
MODEL_TYPES = ("auto", "base", "classification")
QUANTIZATIONS = ("int8", "int8-static")  # `load(quantize=...)`, torch (vit_torch.quantization)
# Files a user may hand us that are checkpoints, just not canonical ones.
_OTHER_FORMATS = ("pytorch_model.bin", "flax_model.msgpack", "model.safetensors.index.json")
_CONVERT = "convert the original checkpoint with `python -m conversion SRC -o OUT`"

# What `load` does with each dtype a safetensors file can store (header dtype names).
# Accepted dtypes are computed in float32 unless `load(dtype=...)` asks otherwise.
DTYPE_POLICY: dict[str, str] = {
    "F32": "loaded as is",
    "F16": "accepted; cast to float32 (exact) unless dtype= asks otherwise",
    "BF16": "accepted; cast to float32 (exact) unless dtype= asks otherwise",
    "F64": "accepted; cast to float32 (rounded); a value beyond float32's range is refused",
    "F8_*, F6_*, F4": "refused (LayoutError): quantised weights; dequantise them first",
    "I8..I64, U8..U64, BOOL": "refused (LayoutError): integer tensors are not ViT weights",
    "C64": "refused (LayoutError): complex tensors are not ViT weights",
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# A config asking for more classes than this is refused before the label map is built.
MAX_LABELS = 1_000_000


def resolve_files(path: str | Path) -> tuple[Path, Path]:
    """(weights file, config file) of a canonical folder, or of a `.safetensors` file."""
    path = local_path(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            found = sorted(p.name for p in path.iterdir())
            hint = (
                " It holds a checkpoint in another format: convert it first with "
                f"`python -m conversion {path} -o OUT`."
                if any(name in found for name in _OTHER_FORMATS)
                else ""
            )
            raise CheckpointError(
                f"{path}: no {WEIGHTS_NAME} in this folder "
                f"(found: {', '.join(found) or 'nothing'})." + hint
            )
    elif path.suffix == ".safetensors":
        weights = path
    else:
        raise CheckpointError(
            f"{path}: expected a model folder or a .safetensors file; for other formats run "
            f"`python -m conversion {path} -o OUT` first"
        )
    config = weights.parent / CONFIG_NAME
    if not config.is_file():
        raise ConfigError(f"{weights}: no {CONFIG_NAME} beside it; the architecture is unknown")
    return weights, config


def read_tensors(weights: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (no code is ever executed).

    The header is checked first (`read_header`: sizes, offsets, duplicate names), then
    the dtypes (`DTYPE_POLICY`), then the values (`check_finite`). The arrays are views
    of a copy-on-write memory map (`map_tensors`): the file is read once, by the page
    cache, and never copied whole into memory.
    """
    header = read_header(weights)
    check_dtypes(header)
    tensors = map_tensors(header)
    check_finite(tensors, str(weights))
    return tensors


def map_tensors(header: Header) -> dict[str, np.ndarray]:
    """The tensors of a checked header as views into a copy-on-write map of its file.

    Nothing is read until a tensor is used and nothing is copied until one is written
    (a model that trains gets private copies of the pages it changes; the file is never
    written). The header check guarantees every byte range lies inside the file.
    """
    start = 8 + header.header_bytes
    if header.file_bytes == start:  # every tensor is empty: there is nothing to map
        return {
            name: np.zeros(info.shape, _numpy_dtype(info.dtype))
            for name, info in header.tensors.items()
        }
    try:
        with open(header.path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{header.path}: cannot map the file ({exc})") from None
    data = np.frombuffer(mapping, dtype=np.uint8)[start:]
    tensors = {}
    for name, info in header.tensors.items():
        array = data[info.begin : info.end].view(_numpy_dtype(info.dtype)).reshape(info.shape)
        tensors[name] = array if array.flags.aligned else array.copy()  # frameworks want alignment
    return tensors


def release_pages(array: np.ndarray) -> None:
    """Drop the pages that lie wholly inside a mapped tensor from this process's memory.

    For tensors that were copied into another buffer and are never read again (query, key
    and value, once fused): their pages would otherwise stay resident for as long as the
    model holds the rest of the map. A tensor that is not mapped is left alone.
    """
    owner: Any = array
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    mapping = owner.base.obj if isinstance(owner.base, memoryview) else None
    if not isinstance(mapping, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    begin = array.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
    first = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours stay
    last = (begin + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def _numpy_dtype(name: str) -> np.dtype[Any]:
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"F32": np.float32, "F16": np.float16, "F64": np.float64}[name])


def check_dtypes(header: Header) -> None:
    """Refuse, before reading them, tensors whose dtype `DTYPE_POLICY` does not accept."""
    if not header.tensors:
        raise CheckpointError(
            f"{header.path}: holds no tensors (an empty safetensors file); {_CONVERT}, or "
            "save the model again"
        )
    bad = {k: info.dtype for k, info in header.tensors.items() if info.dtype not in FLOAT_DTYPES}
    if not bad:
        return
    kinds = set(bad.values())
    if any(d.startswith(("F8", "F6", "F4")) for d in kinds):
        why = "low-precision floats are quantised weights: dequantise them to float32 first"
    elif "C64" in kinds:
        why = "complex numbers are not ViT weights"
    else:
        why = (
            "integers are quantised weights or not weights at all (step counters, indices): "
            f"use a floating-point checkpoint, or {_CONVERT}"
        )
    listed = ", ".join(f"{k} ({d})" for k, d in list(bad.items())[:5])
    more = f", ... ({len(bad)} in all)" if len(bad) > 5 else ""
    raise LayoutError(
        f"{header.path}: {len(bad)} tensor(s) of a dtype ViT weights cannot have: {listed}"
        f"{more}; expected a float dtype ({', '.join(FLOAT_DTYPES)}); {why}"
    )


def non_finite_report(tensors: Mapping[str, np.ndarray]) -> str | None:
    """'N tensor(s) hold non-finite values: key: 2 NaN of 768 values; ...', or None.

    Counted in each float tensor: NaN, +-inf, and float64 values beyond float32's range
    (they would become inf in the float32 model).
    """
    problems = []
    for key, value in tensors.items():
        if value.dtype.name not in ("float32", "float16", "bfloat16", "float64"):
            continue
        nan = int(np.count_nonzero(np.isnan(value)))
        inf = int(np.count_nonzero(np.isinf(value)))
        big = 0
        if value.dtype == np.float64:
            big = int(np.count_nonzero(np.abs(np.nan_to_num(value)) > _FLOAT32_MAX)) - inf
        if nan or inf or big:
            parts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n]
            parts += [f"{big} beyond float32's range"] if big else []
            problems.append(f"{key}: {', '.join(parts)} of {value.size} values")
    if not problems:
        return None
    more = f"; ... ({len(problems)} tensors in all)" if len(problems) > 5 else ""
    return f"{len(problems)} tensor(s) hold non-finite values: {'; '.join(problems[:5])}{more}"


def check_finite(tensors: Mapping[str, np.ndarray], source: str) -> None:
    """Refuse NaN or infinite weights, and float64 values that overflow float32.

    A trained checkpoint never holds them: the model would answer NaN for every input.
    The error names each tensor and how many values are bad.
    """
    report = non_finite_report(tensors)
    if report:
        raise CheckpointError(
            f"{source}: {report}. A usable model never does (the file is corrupt, or "
            "training diverged): re-export it from a good checkpoint"
        )


def read_config(config_file: Path) -> ViTConfig:
    """`ViTConfig` from a `config.json`; every problem is a `ConfigError` naming the file.

    Beyond `ViTConfig.validate`, JSON types are checked (`check_config_types`) so that a
    string where a bool belongs, or a huge label count, fails here with the field's name.
    """
    data = read_json_object(config_file)
    check_config_types(data, config_file)
    try:
        return ViTConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{config_file}: {exc}") from None
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        raise ConfigError(
            f"{config_file}: a field has a value of the wrong kind ({type(exc).__name__}: "
            f"{exc}); compare it with a config.json written by save_pretrained"
        ) from None


_BOOL_FIELDS = ("qkv_bias", "use_class_token", "classifier_uses_pooler")
_REAL_FIELDS = (
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
)
_STR_FIELDS = ("hidden_act", "pooler_act", "pooling_type")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def check_config_types(data: Mapping[str, Any], source: str | Path) -> None:
    """Refuse JSON values of the wrong type for the fields `ViTConfig` does not type-check."""

    def fail(name: str, expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: {name} must be {expected}; found {data[name]!r}; fix config.json"
        )

    for name in _BOOL_FIELDS:
        if name in data and not isinstance(data[name], bool):
            raise fail(name, "true or false")
    for name in _REAL_FIELDS:
        value = data.get(name)
        if name in data and not (
            isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
        ):
            raise fail(name, "a finite number")
    for name in _STR_FIELDS:
        if name in data and not isinstance(data[name], str):
            raise fail(name, "a string")
    for name in ("image_size", "patch_size"):
        value = data.get(name)
        if name in data and not (
            _is_positive_int(value)
            or (isinstance(value, list) and len(value) == 2 and all(map(_is_positive_int, value)))
        ):
            raise fail(name, "a positive int or [height, width] of positive ints")
    if "num_labels" in data and data["num_labels"] is not None:
        value = data["num_labels"]
        if not _is_int(value) or value < 0:
            raise fail("num_labels", "an int >= 0")
        if value > MAX_LABELS:
            raise fail("num_labels", f"at most {MAX_LABELS:,}")
    if data.get("id2label") is not None:
        labels = data["id2label"]
        if not isinstance(labels, dict) or not all(
            isinstance(v, str) and str(k).lstrip("-").isdigit() for k, v in labels.items()
        ):
            raise fail("id2label", 'an object of "index": "name" strings')
    if data.get("label2id") is not None:
        names = data["label2id"]
        if not isinstance(names, dict) or not all(_is_int(v) for v in names.values()):
            raise fail("label2id", 'an object of "name": index')
    architectures = data.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)
    ):
        raise fail("architectures", "a list of strings")


def _select(
    tensors: dict[str, np.ndarray], kind: ModelKind, model_type: str, source: Path
) -> tuple[dict[str, np.ndarray], ModelKind]:
    """Narrow a classification checkpoint to its encoder when a base model is asked for."""
    if model_type == "classification" and not kind.classifier:
        raise CheckpointError(
            f"{source}: has no classifier head (keys have no `vit.` prefix); "
            "load it with model_type='base', or convert a classification checkpoint"
        )
    if model_type == "base" and kind.classifier:
        encoder = {
            k[len(BASE_PREFIX) :]: v for k, v in tensors.items() if k.startswith(BASE_PREFIX)
        }
        return encoder, ModelKind(classifier=False, pooler=kind.pooler)
    return tensors, kind


def resize_for_image_size(
    tensors: dict[str, np.ndarray],
    config: ViTConfig,
    kind: ModelKind,
    image_size: int | tuple[int, int],
    interpolation: str = DEFAULT_INTERPOLATION,
) -> tuple[dict[str, np.ndarray], ViTConfig]:
    """Canonical tensors and config for another input size: the position grid resampled.

    The patch size is part of the trained weights and cannot change, so the new size
    must be a multiple of it (`ConfigError` otherwise, from the new config's validation).
    """
    check_interpolation(interpolation)
    if isinstance(image_size, list | tuple):
        image_size = tuple(int(v) for v in image_size)  # type: ignore[assignment]
    try:
        resized = dataclasses.replace(config, image_size=image_size)
    except ConfigError as exc:
        raise ConfigError(
            f"cannot load at image_size={image_size}: {exc} "
            f"(the patch size {config.patch_hw} is fixed by the trained weights)"
        ) from None
    if resized.grid_hw == config.grid_hw:
        return tensors, resized
    key = kind.prefix + "embeddings.position_embeddings"
    table = resample_position_embeddings(
        tensors[key], config.grid_hw, resized.grid_hw, config.num_prefix_tokens, interpolation
    )
    return {**tensors, key: table}, resized


def replace_head(
    tensors: dict[str, np.ndarray],
    config: ViTConfig,
    kind: ModelKind,
    num_labels: int,
    id2label: Mapping[int, str] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], ViTConfig, ModelKind]:
    """Canonical tensors, config and kind with a fresh classifier for `num_labels` classes.

    Every other weight is kept. The new head is truncated normal(initializer_range) with
    a zero bias, drawn from `seed`. A base-model checkpoint (no head) gains one: its keys
    take the `vit.` prefix, and an unused pooler is dropped.
    """
    labels: dict[str, Any] = {"num_labels": num_labels, "id2label": None, "label2id": None}
    if id2label is not None:
        labels.update(num_labels=None, id2label=dict(id2label))
        if len(id2label) != num_labels:
            raise ConfigError(
                f"num_labels={num_labels} but id2label has {len(id2label)} entries; "
                "give one of them, or make them agree"
            )
    new_config = dataclasses.replace(config, **labels)
    kept = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
    if kind.classifier:
        new_kind = kind
    else:  # the classification twin has a pooler only when its classifier reads it
        new_kind = ModelKind(classifier=True, pooler=config.classifier_uses_pooler)
        kept = {
            BASE_PREFIX + k: v
            for k, v in kept.items()
            if new_kind.pooler or not k.startswith("pooler.")
        }
    if num_labels > 0:
        dtype = kept[BASE_PREFIX + "layernorm.weight"].dtype
        rng = np.random.default_rng(seed)
        weight = truncated_normal(rng, (num_labels, config.hidden_size), config.initializer_range)
        kept["classifier.weight"] = weight.astype(dtype)
        kept["classifier.bias"] = np.zeros(num_labels, dtype)
    return kept, new_config, new_kind


def load(
    path: str | Path,
    backend: str = "torch",
    dtype: Any = None,
    model_type: str = "auto",
    image_size: int | tuple[int, int] | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    seed: int = 0,
    quantize: str | None = None,
    calibration: Any = None,
) -> Any:
    """A model ready for inference from a canonical folder (or a `.safetensors` + config).

    `model_type="auto"` builds the classification model when the file has a classifier
    head (`vit.`-prefixed keys) and the base model otherwise. Loading is strict: every
    missing, unexpected or mis-shaped key is named in one `LayoutError`. A torch model
    comes back in eval mode; a Flax model holds its params and is called as
    `model(pixel_values)`. `dtype` (e.g. "bfloat16") casts the weights after checking.

    `image_size` (int or (height, width), a multiple of the patch size) builds the model
    for that input size: the position embeddings are resampled with `interpolation`
    (see `vit_core.resample.INTERPOLATIONS`; "bicubic", the default, gives the same
    model as transformers' run-time `interpolate_pos_encoding`).

    `num_labels` (optionally with `id2label`; labels default to LABEL_i) replaces the
    classifier with a new one drawn from `seed` (same seed, same head in both backends);
    without it a checkpoint whose head disagrees with its config is a `LayoutError`.

    `quantize="int8"` (torch backend) runs the encoder's Linear layers as int8 matmuls
    (dynamic quantization, `vit_torch.quantization`): faster on CPUs, for inference only,
    at a small accuracy cost (`make bench` reports both). `quantize="int8-static"` with
    `calibration=` pixel values (N, C, H, W) of representative images is faster still:
    activations get fixed scales from those images and inductor compiles the int8 graph
    (needs torchao and a C++ compiler; each new batch size compiles on its first call).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check_quantize(quantize, backend, dtype, calibration)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {MODEL_TYPES}")
    check_interpolation(interpolation)
    if num_labels is None and id2label is not None:
        num_labels = len(id2label)
    if num_labels is not None and model_type == "base":
        raise ValueError("num_labels replaces the classifier head; a base model has none")
    weights, config_file = resolve_files(path)
    config = read_config(config_file)
    tensors = read_tensors(weights)
    _check_depth(tensors, config, weights)
    tensors, kind = _select(
        tensors,
        model_kind(tensors, config),
        "auto" if num_labels is not None else model_type,
        weights,
    )
    if num_labels is not None:
        tensors, config, kind = _checked_new_head(
            tensors, config, kind, num_labels, id2label, seed, str(weights)
        )
    _check_layout_with_hint(tensors, config, kind, str(weights))
    if image_size is not None:
        tensors, config = resize_for_image_size(tensors, config, kind, image_size, interpolation)
    # q/k/v pages are given back as each layer is fused: peak memory stays one model's
    internal = to_internal(tensors, kind, consumed=release_pages)
    model = _build(backend, config, kind, internal, dtype)
    if quantize == "int8":
        from vit_torch.quantization import quantize_encoder

        model = quantize_encoder(model)
    elif quantize == "int8-static":
        from vit_torch.quantization import quantize_static

        model = quantize_static(model, calibration)
    return model


def _check_quantize(quantize: str | None, backend: str, dtype: Any, calibration: Any) -> None:
    """A package error (so the CLIs print it as one line) for what int8 cannot do."""
    if calibration is not None and quantize != "int8-static":
        raise InputError(
            "calibration= sets the activation scales of quantize='int8-static'; "
            f"with quantize={quantize!r} it would be ignored"
        )
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise InputError(f"unknown quantize {quantize!r}; choose one of {QUANTIZATIONS}")
    if backend != "torch":
        raise InputError(
            f"quantize={quantize!r} runs on the torch backend (fbgemm/oneDNN int8 kernels); "
            f"the {backend} backend computes in float32 or dtype= (e.g. 'bfloat16')"
        )
    if dtype is not None:
        raise InputError(
            f"quantize={quantize!r} keeps activations in float32; it cannot be combined "
            f"with dtype={dtype!r}"
        )
    if calibration is None and quantize == "int8-static":
        raise InputError(
            "quantize='int8-static' needs calibration=: pixel values (N, C, H, W) of a few "
            "dozen to a few hundred images like those the model will see, made by its "
            "image processor (ViTImageProcessor(...)(images)['pixel_values'])"
        )


def _check_depth(tensors: Mapping[str, np.ndarray], config: ViTConfig, source: Path) -> None:
    """Fail fast on a config whose depth the file cannot hold (each layer is >= 10 tensors),
    before a hostile `num_hidden_layers` makes the layout check enumerate billions of keys."""
    if config.num_hidden_layers * 10 > len(tensors):
        raise LayoutError(
            f"{source}: config.json says num_hidden_layers={config.num_hidden_layers}, but the "
            f"file holds only {len(tensors)} tensors (each layer has at least 10); the config "
            "does not belong to these weights: use the config.json saved with them"
        )


# Key shapes of other layouts, to say what a mixed or unconverted file holds.
_FOREIGN_LAYOUTS = (
    (r"^(module\.)?(blocks\.\d+\.|patch_embed\.|pos_embed$|cls_token$|head\.|fc_norm\.)", "timm"),
    (r"(^|/)(Transformer|encoderblock_\d+|embedding|head)(/|$)", "original JAX / big_vision"),
    (r"^(module|model)\.(vit\.|embeddings\.|encoder\.)", "a wrapped (DDP or Lightning) state dict"),
    (r"\.(kernel|scale)$", "Flax"),
)


def _foreign_hint(keys: set[str]) -> str:
    """' N of the unexpected keys look like timm's layout (e.g. ...)' or ''."""
    import re

    for pattern, name in _FOREIGN_LAYOUTS:
        hits = sorted(k for k in keys if re.search(pattern, k))
        if hits:
            return (
                f" | {len(hits)} of the unexpected keys look like {name} keys (e.g. {hits[0]}): "
                f"this file is not in the canonical layout, or mixes layouts; {_CONVERT}"
            )
    return ""


def _check_layout_with_hint(
    tensors: Mapping[str, np.ndarray], config: ViTConfig, kind: ModelKind, source: str
) -> None:
    """`check_layout`, with the next step: `num_labels=` when only the classifier
    disagrees, conversion when keys of another layout are present, else the config."""
    try:
        check_layout(tensors, config, kind, source)
    except LayoutError as exc:
        message = str(exc)
        expected = expected_shapes(config, kind)
        unexpected = set(tensors) - set(expected)
        wrong = (set(expected) ^ set(tensors)) | {
            k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]
        }
        if all(k.startswith("classifier.") for k in wrong):
            raise LayoutError(
                f"{message} | to train a new head instead, load with num_labels=N "
                "(the classifier is then re-initialised, every other weight kept)"
            ) from None
        hint = _foreign_hint(unexpected) or (
            " | next step: check that config.json belongs to these weights "
            "(`python -m vit_core info FOLDER` shows both side by side)"
        )
        raise LayoutError(message + hint) from None


def _checked_new_head(
    tensors: dict[str, np.ndarray],
    config: ViTConfig,
    kind: ModelKind,
    num_labels: int,
    id2label: Mapping[int, str] | None,
    seed: int,
    source: str,
) -> tuple[dict[str, np.ndarray], ViTConfig, ModelKind]:
    """`replace_head` after checking everything but the old head (which is discarded)."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 0:
        raise ConfigError(f"num_labels must be an int >= 0; got {num_labels!r}")
    # The old head may have any size (that is the point), but the rest must fit the config.
    encoder = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
    no_labels: dict[str, Any] = {"num_labels": 0, "id2label": None, "label2id": None}
    encoder_config = dataclasses.replace(config, **no_labels)
    check_layout(encoder, encoder_config, kind, source)
    return replace_head(tensors, config, kind, num_labels, id2label, seed)


def _build(
    backend: str, config: ViTConfig, kind: ModelKind, internal: dict[str, np.ndarray], dtype: Any
) -> Any:
    """Import the backend's framework only now, and build its twin around `internal`."""
    try:
        twin = importlib.import_module(BACKENDS[backend])
    except ImportError as exc:
        extra = backend
        raise ImportError(
            f"backend {backend!r} needs its framework ({exc.name} is not installed); "
            f"install it with `pip install 'vit-twin[{extra}]'`"
        ) from exc
    return twin.build_model(config, kind, internal, dtype)


def save_folder(
    folder: str | Path, config: ViTConfig, internal: dict[str, np.ndarray], kind: ModelKind
) -> Path:
    """Write internal-name weights as a canonical folder, atomically as a whole.

    The folder is written beside `folder` and renamed into place
    (`vit_core._io.staged_folder`): a reader, or a process killed mid-write, sees the old
    folder or the complete new one, never a mix. An existing folder is replaced by the
    new one, carrying over (hard links, else copies) every file the save does not write:
    `model.safetensors` and `config.json` are new, a `preprocessor_config.json` or any
    other file already there is kept. A path that is a file is refused; a symlink to a
    folder is followed (the link keeps pointing at the new folder). Non-finite weights
    are written with a warning (a diverged model is still worth keeping), but `load`
    refuses them.
    """
    import warnings

    folder = Path(folder)
    if folder.is_symlink() and folder.is_dir():
        folder = folder.resolve()
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(
            f"{folder}: is a file, not a folder; save_pretrained writes a folder there: "
            "choose another path, or remove the file"
        )
    canonical = to_canonical(internal, kind)
    check_layout(canonical, config, kind, f"weights to save in {folder}")
    report = non_finite_report(canonical)
    if report:
        warnings.warn(
            f"saving to {folder}: {report}; saved anyway (a diverged model is worth a "
            "post-mortem), but vit_core.load refuses the folder",
            RuntimeWarning,
            stacklevel=3,
        )
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(canonical.items())}
    config = ViTConfig.from_dict(
        config.to_dict(),
        architectures=["ViTForImageClassification" if kind.classifier else "ViTModel"],
    )

    def write(staging: Path) -> None:
        try:
            save_file(arrays, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        except (OSError, SafetensorError) as exc:
            raise WriteError(
                f"{folder}: cannot write {WEIGHTS_NAME} ({exc}); the folder is unchanged"
            ) from exc
        config.save_pretrained(staging)

    try:
        with staged_folder(folder, replace=True, keep_other_files=True) as staging:
            write(staging)
    except WriteError as exc:
        if not can_write_in_place(exc, folder):
            raise
        warnings.warn(
            f"{folder} cannot be replaced as a whole ({exc.__cause__}): it is a mount point "
            "or its parent folder is not writable; its files were replaced one by one "
            "instead (each atomically, not the pair). Save into a subfolder to get the "
            "all-or-nothing write.",
            RuntimeWarning,
            stacklevel=3,
        )
        with files_in_place(folder) as staging:
            write(staging)
    return folder
