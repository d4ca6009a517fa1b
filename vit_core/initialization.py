"""The weight initialisation both twins share, drawn once, in numpy.

Weights are normal, truncated at 2 standard deviations and rescaled so that the
truncated draws have std `initializer_range` (transformers' torch ViT truncates at +-2
absolute, i.e. practically not at all). jax's `nn.initializers.truncated_normal(s)` does
not rescale: its `s` is the std of the untruncated normal, so its draws have std
0.88 s; only `variance_scaling(..., "truncated_normal")` corrects. The Flax twin's linen
initializers therefore ask for `initializer_range / TRUNCATED_NORMAL_STD`.

`initial_weights` is the one init path of both twins (`ViTPreTrainedModel.init_weights`,
`FlaxViTPreTrainedModel.init_weights`): the same seed gives the same weights in both.
Drawing in numpy also spares XLA a slow compile of the sampler on CPU.
"""

from __future__ import annotations

import numpy as np

from vit_core.config import ViTConfig
from vit_core.layout import MASK_TOKEN, ModelKind, expected_shapes, to_internal

# The std of a unit normal truncated to [-2, 2]; dividing by it restores the asked-for std.
TRUNCATED_NORMAL_STD = 0.87962566103423978
# An element type of zero bytes: arrays with a shape and no storage, for `to_internal`.
_NO_STORAGE = np.dtype([])


def truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """float64 draws of a normal truncated at 2 standard deviations, with std `std`."""
    values = rng.standard_normal(shape)
    while (outside := np.abs(values) > 2).any():
        values[outside] = rng.standard_normal(int(outside.sum()))
    return values * (std / TRUNCATED_NORMAL_STD)


def internal_shapes(config: ViTConfig, kind: ModelKind) -> dict[str, tuple[int, ...]]:
    """Every internal-name tensor of (config, kind) with its shape, in the layout's order."""
    canonical = expected_shapes(config, kind)
    shaped = {key: np.empty(shape, _NO_STORAGE) for key, shape in canonical.items()}
    return {name: value.shape for name, value in to_internal(shaped, kind).items()}


def initial_weights(config: ViTConfig, kind: ModelKind, seed: int) -> dict[str, np.ndarray]:
    """Fresh float32 weights under the internal names (the torch twin's state-dict keys).

    Truncated normal(`initializer_range`) for every Linear and Conv weight, the learned
    tokens (class, distillation, registers, the MAP probe) and the position embeddings;
    zeros for biases and the mask token (as transformers starts it; it draws nothing);
    ones for LayerNorm scales; `layerscale_value` for LayerScale.
    One generator draws the tensors in the order of `vit_core.layout.TABLE` (each
    per-layer row for every layer, then the next row), so the heads come last: a base,
    a classification and a masked-image-modeling model from one seed share their
    encoder's weights.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in internal_shapes(config, kind).items():
        if name.endswith((".bias", MASK_TOKEN)):
            value = np.zeros(shape, np.float32)
        elif name.endswith(".gamma"):  # LayerScale
            value = np.full(shape, config.layerscale_value, np.float32)
        elif name.endswith(".weight") and len(shape) == 1:  # LayerNorm scales
            value = np.ones(shape, np.float32)
        else:
            value = truncated_normal(rng, shape, config.initializer_range).astype(np.float32)
        weights[name] = value
    return weights
