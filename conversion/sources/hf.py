"""Hugging Face transformers ViT checkpoints -> canonical tensors.

The canonical layout *is* transformers' PyTorch layout, so `model.safetensors`,
`pytorch_model.bin` and their sharded forms (`*.index.json` + shards) are read as they
are. transformers' Flax `flax_model.msgpack` holds the same tree in Flax conventions;
`vit_core.flax_layout` turns each leaf back (Dense kernel (in, out) -> weight (out, in),
Conv HWIO -> OIHW, LayerNorm scale -> weight), as it does for the Flax twin; the `vit/`
prefix and `layer/{i}` naming already match the PyTorch names once `/` becomes `.`.

The config is the folder's `config.json` (it must say model_type "vit"); a lone weights
file without one is described from its shapes, with the head count and numerics stated
as assumptions. The preprocessor comes from `preprocessor_config.json` when present.
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
from vit_core import flax_layout
from vit_core.config import CONFIG_NAME, ViTConfig, hw_pair
from vit_core.errors import CheckpointError
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
_MARKER = "embeddings.patch_embeddings.projection.weight"


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
    return any(k in (_MARKER, BASE_PREFIX + _MARKER) for k in keys)


# ----------------------------------------------------------------------- read
def read(path: Path, hints: dict[str, Any]) -> SourceWeights:
    """Canonical tensors (as stored), config and preprocessor of a transformers ViT."""
    path = Path(path)
    weights = _weights_file(path)
    folder = weights.parent
    tensors, fmt = _read_weights(weights)
    assumed: list[str] = []
    if (folder / CONFIG_NAME).is_file():
        config = _config_from_file(folder / CONFIG_NAME)
    else:
        config = _infer_config(tensors, hints, weights, assumed)
    return SourceWeights(
        tensors=tensors,
        config=config,
        source_format=f"hf-{fmt}",
        assumed=assumed,
        processor=_processor(folder, config, assumed),
    )


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

    width, channels, ph, pw = (int(s) for s in get(_MARKER).shape)
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
