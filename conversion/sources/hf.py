"""Hugging Face transformers ViT checkpoints -> canonical tensors.

The canonical layout *is* transformers' PyTorch layout, so `model.safetensors`,
`pytorch_model.bin` and their sharded forms (`*.index.json` + shards) are read as they
are. transformers' Flax `flax_model.msgpack` holds the same tree in Flax conventions;
`vit_core.flax_layout` turns each leaf back (Dense kernel (in, out) -> weight (out, in),
Conv HWIO -> OIHW, LayerNorm scale -> weight), as it does for the Flax twin; the `vit/`
prefix and `layer/{i}` naming already match the PyTorch names once `/` becomes `.`.

The config is the folder's `config.json`; a lone weights file without one is described
from its shapes, with the head count and numerics stated as assumptions. The preprocessor
comes from `preprocessor_config.json` when present.

The ViT family's transformers models (DINOv2, CLIP, SigLIP, DeiT, ViT-MAE) are told by
their `config.json` model_type; this module reads their files and `hf_families` maps the
tensors by that family's key table (its docstring lists them). A family checkpoint without
its config.json is refused rather than read as a plain ViT.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from conversion.sources import (
    heads_for_width,
    is_timm_config,
    preview_keys,
    read_json,
    read_state_dict,
    sniff,
    state_dict_keys,
)
from conversion.sources.base import SourceWeights
from conversion.sources.hf_families import (
    FAMILIES,
    PATCH_KERNEL,
    family_for,
    head_of,
    read_family,
    refuse_lone_family,
)
from vit_core import flax_layout
from vit_core.config import CONFIG_NAME, ViTConfig, hw_pair
from vit_core.errors import CheckpointError, ConfigError
from vit_core.layout import BASE_PREFIX
from vit_core.processing import PROCESSOR_NAME, ViTImageProcessor

# transformers' interpolate_pos_encoding: bicubic, align_corners=False, no antialias.
DEFAULT_INTERPOLATION = "bicubic"
# In the order transformers prefers them when a folder holds several.
WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "flax_model.msgpack",
)
# The patch kernel's key in a ViT, its head models, and the family's models (`vit.` is
# both a ViT head model's prefix and ViTMAEForPreTraining's).
_MARKERS = frozenset({
    PATCH_KERNEL, BASE_PREFIX + PATCH_KERNEL,
    *(family.prefix + family.marker for family in FAMILIES.values()),
})  # fmt: skip


# transformers' Flax ViT leaves, (name, rank): the kernels and scales that
# `vit_core.flax_layout` translates, these two, and biases of any rank, as they are.
FLAX_LEAVES = {*flax_layout.WEIGHT_LEAVES, ("cls_token", 3), ("position_embeddings", 3)}


# --------------------------------------------------------------------- detect
def _folder_weights(folder: Path) -> Path | None:
    return next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)


def detect(path: Path) -> bool:
    """A transformers folder, or one of its weight files (judged by content or name)."""
    path = Path(path)
    if path.is_dir():
        config = path / CONFIG_NAME
        if config.is_file():
            try:
                data = read_json(config)
            except CheckpointError:
                return False
            if is_timm_config(data):
                return False  # a timm hub folder
        return _folder_weights(path) is not None
    try:
        kind = sniff(path)
        if path.name.endswith(".index.json"):
            return kind == "json" and "weight_map" in read_json(path)
        if kind == "msgpack" or path.suffix == ".msgpack":
            return kind == "msgpack"
        if kind not in ("safetensors", "torch-zip", "pickle"):
            return False
        keys = state_dict_keys(path)
    except (CheckpointError, OSError):
        return False
    return any(k in _MARKERS for k in keys)


# ----------------------------------------------------------------------- read
def read(path: Path, hints: dict[str, Any]) -> SourceWeights:
    """Canonical tensors, config and preprocessor of a transformers ViT (or family model)."""
    path = Path(path)
    weights = _weights_file(path)
    folder = weights.parent
    config_file = folder / CONFIG_NAME
    model_type = _model_type(config_file) if config_file.is_file() else None
    if model_type is not None and model_type != "vit":
        return _read_family(weights, config_file, model_type)
    tensors, fmt = _read_weights(weights)
    assumed: list[str] = []
    if model_type == "vit":
        config = _config_from_file(config_file)
    else:
        refuse_lone_family(tensors, weights)
        config = _infer_config(tensors, hints, weights, assumed)
    return SourceWeights(
        tensors=tensors,
        config=config,
        source_format=f"hf-{fmt}",
        assumed=assumed,
        processor=_processor(folder, config, assumed),
    )


def _model_type(config_file: Path) -> str:
    model_type = read_json(config_file).get("model_type", "vit")
    if not isinstance(model_type, str):
        raise ConfigError(f"{config_file}: model_type must be a string; got {model_type!r}")
    return model_type


def _read_family(weights: Path, config_file: Path, model_type: str) -> SourceWeights:
    """A ViT-family model's weights, mapped by its family (`hf_families.read_family`)."""
    family = family_for(model_type, config_file)
    if weights.suffix == ".msgpack":
        raise CheckpointError(
            f"{weights}: transformers' Flax {family.title} weights are not read; convert the "
            f"PyTorch weights ({family.base_class}.from_pretrained(folder, from_flax=True)"
            ".save_pretrained(out), then convert that folder)"
        )
    tensors, fmt = _read_weights(weights)
    return read_family(family, model_type, tensors, fmt, weights, config_file)


def family_of(path: Path) -> tuple[str, str] | None:
    """(model_type, head) of a transformers family source, head one of "base",
    "projection" (CLIP's visual_projection) or "teacher" (DeiT's two heads); None for a
    plain ViT. Reads only key names (for `--verify`, which picks the transformers class)."""
    weights = _weights_file(Path(path))
    config_file = weights.parent / CONFIG_NAME
    model_type = _model_type(config_file) if config_file.is_file() else "vit"
    if model_type == "vit":
        return None
    if weights.name.endswith(".index.json"):
        keys = set(map(str, read_json(weights).get("weight_map", {})))
    else:
        keys = set(state_dict_keys(weights))
    return model_type, head_of(keys)


def weight_files(path: Path) -> list[Path]:
    """The files whose bytes the conversion depends on (hashed into the metadata)."""
    weights = _weights_file(Path(path))
    if weights.name.endswith(".index.json"):
        return [weights, *(weights.parent / name for name in _shard_names(weights))]
    return [weights]


def source_folder(path: Path) -> Path:
    """The folder transformers' `from_pretrained` would read for this source."""
    return _weights_file(Path(path)).parent


def _weights_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    weights = _folder_weights(path)
    if weights is None:
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise CheckpointError(
            f"{path}: no transformers weights in this folder (looked for "
            f"{', '.join(WEIGHT_NAMES)}; found {found})"
        )
    return weights


def _read_weights(weights: Path) -> tuple[dict[str, np.ndarray], str]:
    """(tensors, format name) of a weights file, an index (+ shards) or a Flax msgpack."""
    if weights.name.endswith(".index.json"):
        return _read_sharded(weights)
    kind = sniff(weights)
    if kind == "msgpack" or weights.suffix == ".msgpack":
        return _read_msgpack(weights), "flax-msgpack"
    tensors, _ = read_state_dict(weights)
    return tensors, "safetensors" if kind == "safetensors" else "pytorch-bin"


def _shard_names(index: Path) -> list[str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no `weight_map` in this index")
    names = sorted(set(map(str, weight_map.values())))
    for name in names:
        if Path(name).name != name:
            raise CheckpointError(f"{index}: shard name {name!r} points outside the folder")
    return names


def _read_sharded(index: Path) -> tuple[dict[str, np.ndarray], str]:
    """Every shard of a sharded checkpoint, checked against the index's weight map."""
    weight_map = read_json(index)["weight_map"]
    tensors: dict[str, np.ndarray] = {}
    kinds = set()
    for name in _shard_names(index):
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index}: shard {name} is missing from {index.parent}")
        part, _ = read_state_dict(shard)
        kinds.add(sniff(shard))
        for key, value in part.items():
            if weight_map.get(key) != name:
                raise CheckpointError(
                    f"{shard}: holds {key}, which the index puts in {weight_map.get(key)!r}"
                )
            tensors[key] = value
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(
            f"{index}: the shards lack {len(missing)} indexed tensors: {preview_keys(missing)}"
        )
    fmt = "safetensors" if kinds == {"safetensors"} else "pytorch-bin"
    return tensors, f"sharded-{fmt}"


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
    """transformers' Flax params -> PyTorch-named, PyTorch-oriented numpy arrays."""
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict

    try:
        tree = msgpack_restore(path.read_bytes())
    except Exception as exc:  # msgpack raises its own family of errors
        raise CheckpointError(
            f"{path}: not a readable Flax msgpack file, truncated or corrupt ({exc})"
        ) from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: holds a {type(tree).__name__}, not a params tree")
    if set(tree) == {"params"}:
        tree = tree["params"]
    out: dict[str, np.ndarray] = {}
    for keys, leaf in flatten_dict(tree).items():
        value = np.asarray(leaf)
        if keys[-1] != "bias" and (keys[-1], value.ndim) not in FLAX_LEAVES:
            raise CheckpointError(
                f"{path}: Flax leaf {'/'.join(map(str, keys))} (shape {value.shape}) is not "
                "part of transformers' Flax ViT"
            )
        name, array = flax_layout.to_torch(keys, value)
        out[name] = np.ascontiguousarray(array)
    return out


def _config_from_file(path: Path) -> dict[str, Any]:
    """config.json as ViTConfig fields (validated: model_type must be "vit")."""
    config = ViTConfig.from_json_file(path)
    fields = config.to_dict()
    fields.pop("model_type", None)
    return fields


def _processor(folder: Path, config: Mapping[str, Any], assumed: list[str]) -> dict[str, Any]:
    if (folder / PROCESSOR_NAME).is_file():
        return ViTImageProcessor.from_pretrained(folder / PROCESSOR_NAME).to_dict()
    height, width = hw_pair(config.get("image_size", 224), "image_size")
    assumed.append(
        f"preprocessing: no {PROCESSOR_NAME}; wrote transformers' ViT defaults (bilinear "
        f"resize to {height}x{width}, rescale 1/255, mean = std = 0.5)"
    )
    return {"size": {"height": height, "width": width}}


def _infer_config(
    tensors: Mapping[str, np.ndarray], hints: Mapping[str, Any], path: Path, assumed: list[str]
) -> dict[str, Any]:
    """Config fields of a weights file that has no config.json beside it, from its shapes."""
    prefix = BASE_PREFIX if any(k.startswith(BASE_PREFIX) for k in tensors) else ""

    def get(key: str) -> np.ndarray:
        if prefix + key not in tensors:
            raise CheckpointError(f"{path}: no {prefix + key}; not a transformers ViT checkpoint")
        return tensors[prefix + key]

    width, channels, ph, pw = (int(s) for s in get(PATCH_KERNEL).shape)
    has_cls = prefix + "embeddings.cls_token" in tensors
    cells = int(get("embeddings.position_embeddings").shape[1]) - int(has_cls)
    side = round(cells**0.5)
    image = hints.get("image_size")
    if image is None and side * side != cells:
        raise CheckpointError(
            f"{path}: {cells} patch positions are no square grid and there is no config.json; "
            "give the image size with --set image_size=[H,W]"
        )
    layers = {int(m[1]) for k in tensors if (m := re.search(r"encoder\.layer\.(\d+)\.", k))}
    heads, note = heads_for_width(width, hints, f"{path.name} has no {CONFIG_NAME} beside it")
    classifier = tensors.get("classifier.weight")
    assumed += [note] if note else []
    assumed.append(
        f"numerics: no {CONFIG_NAME}, so transformers' defaults (layer_norm_eps 1e-12, exact "
        "GELU); pass --config or --set if the model was trained otherwise"
    )
    return {
        "hidden_size": width,
        "num_hidden_layers": len(layers),
        "num_attention_heads": heads,
        "intermediate_size": int(get("encoder.layer.0.intermediate.dense.weight").shape[0]),
        "patch_size": ph if ph == pw else [ph, pw],
        "image_size": image if image is not None else side * ph,
        "num_channels": channels,
        "encoder_stride": ph,
        "qkv_bias": prefix + "encoder.layer.0.attention.attention.query.bias" in tensors,
        "num_labels": int(classifier.shape[0]) if classifier is not None else 0,
        "use_class_token": has_cls,
        "pooling_type": "cls" if has_cls else "mean",
    }
