"""`load`: a canonical folder -> a ready model in the framework asked for; `save_folder` back.

The one road in: find the files, read the config, read the tensors (safetensors, no
pickle), check every key and shape against the config, rename to the twins' internal
names, and only then import the backend's framework and build the model.

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from vit_core._io import atomic_write_bytes, local_path
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.errors import CheckpointError, ConfigError, LayoutError
from vit_core.initialization import truncated_normal
from vit_core.layout import (
    BASE_PREFIX,
    WEIGHTS_NAME,
    ModelKind,
    check_layout,
    model_kind,
    to_canonical,
    to_internal,
)
from vit_core.resample import (
    DEFAULT_INTERPOLATION,
    check_interpolation,
    resample_position_embeddings,
)

BACKENDS = {"torch": "vit_torch.weights", "flax": "vit_flax.weights"}
MODEL_TYPES = ("auto", "base", "classification")
# Files a user may hand us that are checkpoints, just not canonical ones.
_OTHER_FORMATS = ("pytorch_model.bin", "flax_model.msgpack", "model.safetensors.index.json")


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
    """All tensors of a safetensors file as numpy arrays (no code is ever executed)."""
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None


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
    labels = {"num_labels": num_labels, "id2label": None, "label2id": None}
    if id2label is not None:
        labels.update(num_labels=None, id2label=dict(id2label))
        if len(id2label) != num_labels:
            raise ConfigError(
                f"num_labels={num_labels} but id2label has {len(id2label)} entries; "
                "give one of them, or make them agree"
            )
    new_config = dataclasses.replace(config, **labels)  # type: ignore[arg-type]
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
    backend: Literal["torch", "flax"] = "torch",
    dtype: Any = None,
    model_type: Literal["auto", "base", "classification"] = "auto",
    image_size: int | tuple[int, int] | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    seed: int = 0,
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
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {MODEL_TYPES}")
    check_interpolation(interpolation)
    if num_labels is None and id2label is not None:
        num_labels = len(id2label)
    if num_labels is not None and model_type == "base":
        raise ValueError("num_labels replaces the classifier head; a base model has none")
    weights, config_file = resolve_files(path)
    config = ViTConfig.from_json_file(config_file)
    tensors = read_tensors(weights)
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
    return _build(backend, config, kind, to_internal(tensors, kind), dtype)


def _check_layout_with_hint(
    tensors: Mapping[str, np.ndarray], config: ViTConfig, kind: ModelKind, source: str
) -> None:
    """`check_layout`, pointing at `num_labels=` when the classifier is what disagrees."""
    try:
        check_layout(tensors, config, kind, source)
    except LayoutError as exc:
        if "classifier." not in str(exc):
            raise
        raise LayoutError(
            f"{exc} | to train a new head instead, load with num_labels=N "
            "(the classifier is then re-initialised, every other weight kept)"
        ) from None


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
    encoder_config = dataclasses.replace(config, num_labels=0, id2label=None, label2id=None)
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
    """Write internal-name weights as a canonical folder; each file replaced atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    canonical = to_canonical(internal, kind)
    check_layout(canonical, config, kind, f"weights to save in {folder}")
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(canonical.items())}
    atomic_write_bytes(folder / WEIGHTS_NAME, save(arrays, metadata={"format": "pt"}))
    config = ViTConfig.from_dict(
        config.to_dict(),
        architectures=["ViTForImageClassification" if kind.classifier else "ViTModel"],
    )
    config.save_pretrained(folder)
    return folder
