"""The Flax backend (`vit_core.backend`): build the twin, run it on numpy, stream batches.

The core hands over a config and internal-name numpy tensors; they become the params
pytree (transposed to Flax's conventions, `vit_flax.weights`) of a model built without a
random init, on the device asked for (committed there, so jit runs every call there) or,
by default, uncommitted on jax's default device. `predict` runs the batches data-parallel
over every local device of the default platform (`ShardedFlaxModel`), or on the one
device a model was loaded on, and decodes them in a thread pool, so this backend needs
no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_core.backend import Outputs, as_numpy_outputs, class_to_build, warn_if_slow_dtype
from vit_core.batching import Batch, threaded_batches
from vit_core.config import ViTConfig
from vit_core.errors import InputError
from vit_core.intermediates import BACKEND_OPTIONS, all_tokens, check_has_blocks_to_read
from vit_core.layout import MASKED_IMAGE_MODELING, ModelKind
from vit_flax.modeling import (
    FlaxViTForImageClassification,
    FlaxViTForMaskedImageModeling,
    FlaxViTModel,
    FlaxViTPreTrainedModel,
)
from vit_flax.weights import params_from_internal

BATCH_AXIS = "batch"
# The class `build` makes for each kind of model (`ModelKind.model_type`).
TWINS = {
    "base": FlaxViTModel,
    "classification": FlaxViTForImageClassification,
    MASKED_IMAGE_MODELING: FlaxViTForMaskedImageModeling,
}
DEVICE_EXAMPLES = (
    "'cpu', 'gpu' (or 'cuda'), 'tpu', 'cpu:1' (a platform's second device) or a jax Device"
)


def compute_dtype(dtype: Any) -> np.dtype:
    """`dtype=` as the jax dtype the model computes in: None is float32 whatever the
    file stores (as transformers and the twin do); else a floating dtype or its name."""
    try:
        found = jnp.dtype(jnp.float32 if dtype is None else dtype)
    except TypeError:
        found = None
    if found is None or not jnp.issubdtype(found, jnp.floating):
        raise InputError(
            f"dtype={dtype!r} is not a floating-point jax dtype; choose 'float32' (the "
            "default), 'bfloat16' or 'float16'"
        )
    return found


def available_devices() -> list[str]:
    """The local devices jax can use here, as `device=` names them (platform:index)."""
    platforms = dict.fromkeys([jax.default_backend(), "cpu"])
    return [f"{p}:{i}" for p in platforms for i in range(len(jax.local_devices(backend=p)))]


def _absent(platform: str) -> str:
    """Why jax has no `platform` device here, as far as we can tell."""
    if platform in ("gpu", "cuda", "rocm"):
        return (
            "jax sees no GPU (its jaxlib is CPU-only, or there is no GPU or driver; for "
            "NVIDIA GPUs: pip install 'jax[cuda12]')"
        )
    if platform == "tpu":
        return "jax sees no TPU"
    return "not a jax platform (cpu, gpu, cuda, rocm, tpu)"


def resolve_device(device: Any, dtype: Any) -> jax.Device | None:
    """The jax device `device` names, checked to exist before any tensor is read: a
    `jax.Device`, a platform ("cpu", "gpu", "cuda", "tpu": its first local device) or
    "platform:N" (its N-th). None stays None: the params go uncommitted to jax's default
    device. Half precision on the CPU warns (it is slow there)."""
    resolved: jax.Device | None
    if device is None or isinstance(device, jax.Device):
        resolved = device
    elif isinstance(device, str):
        platform, _, number = device.partition(":")
        try:
            devices = jax.local_devices(backend=platform)
        except RuntimeError:  # jax's message lists backends, not devices
            raise InputError(
                f"device={device!r}: {_absent(platform)}; available here: "
                f"{', '.join(available_devices())}"
            ) from None
        if not number.isdigit() and number:
            raise InputError(
                f"device={device!r}: a device number follows the colon; jax takes {DEVICE_EXAMPLES}"
            )
        if int(number or 0) >= len(devices):
            raise InputError(
                f"device={device!r}: jax has {len(devices)} {platform} device"
                f"{'s' if len(devices) > 1 else ''} here ({', '.join(available_devices())}), "
                "numbered from 0"
            )
        resolved = devices[int(number or 0)]
    else:
        raise InputError(f"device={device!r} is not a jax device; jax takes {DEVICE_EXAMPLES}")
    target = resolved or jax.local_devices()[0]
    if target.platform == "cpu":
        warn_if_slow_dtype(compute_dtype(dtype).name, f"jax, device {target}")
    return resolved


def check_options(dtype: Any, device: jax.Device | None = None) -> None:
    """Nothing to refuse: every option of this backend is a `load` argument checked
    already (`dtype` and `device` by `resolve_device`)."""


def build(
    config: ViTConfig,
    kind: ModelKind,
    internal: Mapping[str, np.ndarray],
    dtype: Any = None,
    model_class: type | None = None,
    device: jax.Device | None = None,
) -> FlaxViTPreTrainedModel:
    """The Flax twin of `kind` (or `model_class`), holding `internal` as its params,
    committed to `device` when one is given."""
    cls = class_to_build(kind, TWINS, model_class)
    compute = compute_dtype(dtype)
    model: FlaxViTPreTrainedModel
    if kind.model_type == "base":
        model = cls(
            config,
            add_pooling_layer=kind.pooler,
            use_mask_token=kind.mask_token,
            dtype=compute,
            _do_init=False,
        )
    else:
        model = cls(config, dtype=compute, _do_init=False)
    model.params = params_from_internal(internal, compute, device)
    return model


def committed_device(params: Any) -> jax.Device | None:
    """The one device `params` are committed to (`load(device=...)`), else None:
    uncommitted (or numpy) params follow jax's default placement."""
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves or not getattr(leaves[0], "committed", False):
        return None
    devices = leaves[0].devices()
    return next(iter(devices)) if len(devices) == 1 else None


def as_input(model: FlaxViTPreTrainedModel, pixels: np.ndarray) -> Any:
    """Numpy pixels as `model` computes them: in its compute dtype (cast before they
    travel), on the device its params are committed to (else jit places them)."""
    pixels = np.asarray(pixels).astype(model.module.dtype, copy=False)
    device = committed_device(model.params)
    return pixels if device is None else jax.device_put(pixels, device)


def to_numpy(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def run(
    model: Any,
    pixels: np.ndarray,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    interpolate_pos_encoding: bool | str = False,
) -> Outputs:
    """The model's outputs on numpy pixels (moved to its device and dtype), as float32
    numpy (waits for the device)."""
    out = model(
        as_input(model, pixels),
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
    check_has_blocks_to_read(model)
    taken = model.forward_intermediates(
        as_input(model, pixels),
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
        """The padded batch, in the compute dtype, as one jax array laid out over the
        mesh's batch axis."""
        pixels = np.asarray(pixels).astype(self.model.module.dtype, copy=False)
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
    device = committed_device(model.params)  # loaded on one device: it runs there alone
    sharded = ShardedFlaxModel(model, None if device is None else [device])
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
