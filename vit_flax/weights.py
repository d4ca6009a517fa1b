"""Internal-name numpy weights (see `vit_core.layout`) <-> a Flax params pytree.

The internal names are PyTorch's; `vit_core.flax_layout` holds the one translation
(Dense kernel (in, out), convolution kernel HWIO, LayerNorm `scale`, `layers_N`),
decided by the leaf name and rank alone. This module only adds the pytree and jax arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from vit_core.flax_layout import to_flax, to_torch


def params_from_internal(
    internal: Mapping[str, np.ndarray], dtype: Any = None, device: jax.Device | None = None
) -> dict[str, Any]:
    """Nested Flax params from internal-name arrays, transposed to Flax conventions, cast
    to `dtype` on the host (half the bytes travel) and put on `device` (None: jax's
    default device, uncommitted)."""
    flat = {}
    for name, value in internal.items():
        path, array = to_flax(name, np.asarray(value))
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        flat[path] = jax.device_put(array, device)
    return traverse_util.unflatten_dict(flat)


def internal_weights(params: Any) -> dict[str, np.ndarray]:
    """The params as float32 numpy arrays under internal (PyTorch) names and conventions."""
    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        name, array = to_torch(path, np.asarray(value, dtype=np.float32))
        out[name] = np.ascontiguousarray(array)
    return out
