"""Internal-name numpy weights (see `vit_core.layout`) <-> a Flax params pytree.

The internal names are PyTorch's, so the translation is PyTorch -> Flax conventions,
decided by the leaf name and rank alone:

    *.weight, 4-D (O, I, H, W)  -> kernel (H, W, I, O)   the patch convolution
    *.weight, 2-D (out, in)     -> kernel (in, out)      every Dense
    *.weight, 1-D               -> scale                 every LayerNorm
    *.bias, cls_token, position_embeddings                unchanged
    layers.N                    -> layers_N               linen's name for list members
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

_TO_FLAX = {4: ("kernel", (2, 3, 1, 0)), 2: ("kernel", (1, 0)), 1: ("scale", None)}
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}


def _flax_path(name: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    *parents, leaf = name.split(".")
    path: list[str] = []
    parts = iter(parents)
    for part in parts:
        path.append(f"layers_{next(parts)}" if part == "layers" else part)
    if leaf == "weight":
        leaf, axes = _TO_FLAX[value.ndim]
        value = value if axes is None else np.transpose(value, axes)
    return (*path, leaf), value


def params_from_internal(internal: Mapping[str, np.ndarray], dtype: Any = None) -> dict[str, Any]:
    """Nested Flax params from internal-name arrays, transposed to Flax conventions."""
    flat = {}
    for name, value in internal.items():
        path, array = _flax_path(name, np.asarray(value))
        flat[path] = jnp.asarray(array, dtype=dtype)
    return traverse_util.unflatten_dict(flat)


def internal_weights(params: Any) -> dict[str, np.ndarray]:
    """The params as float32 numpy arrays under internal (PyTorch) names and conventions."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        array = np.asarray(value, dtype=np.float32)
        *parents, leaf = path
        names = []
        for part in parents:
            names += ["layers", part.split("_")[1]] if part.startswith("layers_") else [part]
        if leaf in ("kernel", "scale"):
            leaf = "weight"
            if array.ndim in _TO_TORCH:
                array = np.transpose(array, _TO_TORCH[array.ndim])
        out[".".join([*names, leaf])] = np.ascontiguousarray(array)
    return out


def build_model(
    config: Any, kind: Any, internal: Mapping[str, np.ndarray], dtype: Any = None
) -> Any:
    """The Flax twin of `kind`, holding `internal` as its params (no random init is run)."""
    from vit_flax.modeling import (
        FlaxViTForImageClassification,
        FlaxViTModel,
        FlaxViTPreTrainedModel,
    )

    compute = jnp.dtype(dtype) if dtype is not None else jnp.float32
    model: FlaxViTPreTrainedModel
    if kind.classifier:
        model = FlaxViTForImageClassification(config, dtype=compute, _do_init=False)
    else:
        model = FlaxViTModel(config, add_pooling_layer=kind.pooler, dtype=compute, _do_init=False)
    model.params = params_from_internal(internal, compute)
    return model
