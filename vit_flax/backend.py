"""The Flax backend (`vit_core.backend`): build the twin, run it on numpy, stream batches.

The core hands over a config and internal-name numpy tensors; they become the params
pytree (transposed to Flax's conventions, `vit_flax.weights`) of a model built without a
random init. `predict` runs the batches data-parallel over every local jax device
(`ShardedFlaxModel`) and decodes them in a thread pool, so this backend needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_core.backend import Outputs, as_numpy_outputs, class_to_build
from vit_core.batching import Batch, threaded_batches
from vit_core.config import ViTConfig
from vit_core.intermediates import BACKEND_OPTIONS, all_tokens
from vit_core.layout import ModelKind
from vit_flax.modeling import (
    FlaxViTForImageClassification,
    FlaxViTModel,
    FlaxViTPreTrainedModel,
)
from vit_flax.weights import params_from_internal

BATCH_AXIS = "batch"


def check_options(dtype: Any) -> None:
    """Nothing to refuse: every option of this backend is a `load` argument the core checks."""


def build(
    config: ViTConfig,
    kind: ModelKind,
    internal: Mapping[str, np.ndarray],
    dtype: Any = None,
    model_class: type | None = None,
) -> FlaxViTPreTrainedModel:
    """The Flax twin of `kind` (or `model_class`), holding `internal` as its params."""
    cls = class_to_build(kind, FlaxViTForImageClassification, FlaxViTModel, model_class)
    compute = jnp.dtype(dtype) if dtype is not None else jnp.float32
    model: FlaxViTPreTrainedModel
    if kind.classifier:
        model = cls(config, dtype=compute, _do_init=False)
    else:
        model = cls(config, add_pooling_layer=kind.pooler, dtype=compute, _do_init=False)
    model.params = params_from_internal(internal, compute)
    return model


def to_numpy(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def run(
    model: Any,
    pixels: np.ndarray,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    interpolate_pos_encoding: bool | str = False,
) -> Outputs:
    """The model's outputs on numpy pixels, as float32 numpy (waits for the device)."""
    out = model(
        pixels,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        interpolate_pos_encoding=interpolate_pos_encoding,
    )
    return as_numpy_outputs(out, to_numpy)


def intermediates(
    model: FlaxViTModel | FlaxViTForImageClassification,
    pixels: np.ndarray,
    indices: Sequence[int],
    norm: bool,
    interpolate_pos_encoding: bool | str = False,
) -> list[np.ndarray]:
    """The blocks' outputs (`vit_core.backend.Backend.intermediates`; waits for the device)."""
    taken = model.forward_intermediates(
        pixels,
        indices,
        norm=norm,
        interpolate_pos_encoding=interpolate_pos_encoding,
        **BACKEND_OPTIONS,
    )
    return [all_tokens(entry, to_numpy) for entry in taken]


def pad_to_multiple(pixels: np.ndarray, multiple: int) -> np.ndarray:
    """Zero images appended so the batch divides evenly over `multiple` devices.

    Zeros are a valid input; their outputs are sliced off by the caller.
    """
    missing = -len(pixels) % multiple
    if not missing:
        return pixels
    return np.concatenate([pixels, np.zeros((missing, *pixels.shape[1:]), pixels.dtype)])


class ShardedFlaxModel:
    """A Flax model run data-parallel: params replicated, each batch split over devices.

    Built on jax's own machinery: a one-axis `Mesh` of all local devices and
    `NamedSharding`s; jit then places one shard of the batch on each device.
    """

    def __init__(self, model: Any, devices: Sequence[Any] | None = None) -> None:
        self.model = model
        self.mesh = Mesh(np.array(devices or jax.devices()), (BATCH_AXIS,))
        self.data_sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
        self.params = jax.device_put(model.params, NamedSharding(self.mesh, PartitionSpec()))

    @property
    def device_count(self) -> int:
        return int(self.mesh.devices.size)

    def shard(self, pixels: np.ndarray) -> Any:
        """The padded batch as one jax array laid out over the mesh's batch axis."""
        return jax.device_put(pad_to_multiple(pixels, self.device_count), self.data_sharding)

    def __call__(self, pixels: np.ndarray) -> Outputs:
        """float32 outputs of the n images; the padding rows are dropped."""
        out = as_numpy_outputs(self.model(self.shard(pixels), params=self.params), to_numpy)
        return {name: value[: len(pixels)] for name, value in out.items()}

    def describe(self) -> str:
        platform = self.mesh.devices.flat[0].platform
        return f"{self.device_count} {platform} device{'s' if self.device_count > 1 else ''}"


def batch_runner(
    model: FlaxViTPreTrainedModel, workers: int
) -> tuple[Callable[[np.ndarray], Outputs], str]:
    sharded = ShardedFlaxModel(model)
    return sharded, f"{workers} decoding thread(s), batches sharded over {sharded.describe()}"


def batches(
    paths: Sequence[Path], processor: Any, batch_size: int, workers: int
) -> Iterator[Batch]:
    """Batches decoded by a thread pool (PIL releases the GIL), no torch needed."""
    return threaded_batches(paths, processor, batch_size, workers)


def parameter_count(model: FlaxViTPreTrainedModel) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(model.params))


def as_tensor(array: np.ndarray) -> jax.Array:
    return jnp.asarray(array)
