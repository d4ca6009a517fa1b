"""`load`: a canonical folder -> a ready model in the framework asked for; `save_folder` back.

The one road in: find the files, read the config, read the tensors (safetensors, no
pickle), check every key and shape against the config, rename to the twins' internal
names, and only then import the backend's framework and build the model.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from vit_core._io import atomic_write_bytes, local_path
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.errors import CheckpointError, ConfigError
from vit_core.layout import (
    BASE_PREFIX,
    WEIGHTS_NAME,
    ModelKind,
    check_layout,
    model_kind,
    to_canonical,
    to_internal,
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


def load(
    path: str | Path,
    backend: Literal["torch", "flax"] = "torch",
    dtype: Any = None,
    model_type: Literal["auto", "base", "classification"] = "auto",
) -> Any:
    """A model ready for inference from a canonical folder (or a `.safetensors` + config).

    `model_type="auto"` builds the classification model when the file has a classifier
    head (`vit.`-prefixed keys) and the base model otherwise. Loading is strict: every
    missing, unexpected or mis-shaped key is named in one `LayoutError`. A torch model
    comes back in eval mode; a Flax model holds its params and is called as
    `model(pixel_values)`. `dtype` (e.g. "bfloat16") casts the weights after checking.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {MODEL_TYPES}")
    weights, config_file = resolve_files(path)
    config = ViTConfig.from_json_file(config_file)
    tensors = read_tensors(weights)
    tensors, kind = _select(tensors, model_kind(tensors, config), model_type, weights)
    check_layout(tensors, config, kind, str(weights))
    internal = to_internal(tensors, kind)
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
