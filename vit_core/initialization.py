"""The weight initialisation both twins share, drawn in numpy where both must agree.

Weights are normal, truncated at 2 standard deviations and rescaled so that the
truncated draws have std `initializer_range`, as jax's `truncated_normal` does
(transformers' torch ViT truncates at +-2 absolute, i.e. practically not at all).
Drawing in numpy gives the same numbers to both frameworks from one seed, and spares
XLA a slow compile of the sampler on CPU.
"""

from __future__ import annotations

import numpy as np

# The std of a unit normal truncated to [-2, 2]; dividing by it restores the asked-for std.
TRUNCATED_NORMAL_STD = 0.87962566103423978


def truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """float64 draws of a normal truncated at 2 standard deviations, with std `std`."""
    values = rng.standard_normal(shape)
    while (outside := np.abs(values) > 2).any():
        values[outside] = rng.standard_normal(int(outside.sum()))
    return values * (std / TRUNCATED_NORMAL_STD)
