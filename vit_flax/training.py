"""Fine-tuning steps in JAX: the Flax backend's `vit_core.finetune.Training`.

The twin of `vit_torch/training.py`, with the same meaning for every hyper-parameter:
`optax.adamw` (learning rate 1, so its update is -(Adam's step + weight decay * param),
weight decay masked to the decayed groups), then each parameter moved by the step's
learning rate times its group's `lr_scale`, which is torch's AdamW over parameter groups
to the last term; cross-entropy on smoothed labels (`optax.smooth_labels`); dropout and
drop-path masks from the key (seed, step).

Data-parallel on JAX's own machinery: a one-axis `Mesh` over every device of every
process, params and optimizer state replicated, each global batch sharded along its
first axis (`jax.make_array_from_process_local_data`: each process hands over its share,
split again over its local devices); `jax.jit` partitions the step by those shardings and
all-reduces the gradients itself. Several processes (hosts) meet through
`jax.distributed.initialize`, started by `start_processes` before anything runs on a
device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_core.errors import InputError
from vit_core.finetune import MOMENTS, Launch, Processes, Recipe
from vit_core.flax_layout import to_torch
from vit_flax.backend import BATCH_AXIS, build
from vit_flax.modeling import FlaxViTForImageClassification
from vit_flax.weights import internal_weights, params_from_internal

# The core's names of AdamW's moments -> the fields of optax's `ScaleByAdamState`.
ADAM_FIELDS = dict(zip(MOMENTS, ("mu", "nu"), strict=True))


def start_processes(launch: Launch) -> Processes:
    """`jax.distributed.initialize` when several processes were asked for (it must come
    before any computation), then the group as jax sees it."""
    joined = launch.coordinator is not None
    if joined:
        jax.distributed.initialize(launch.coordinator, launch.world, launch.rank)
    devices = jax.devices()
    how = f"{len(devices)} {devices[0].platform} device{'s' if len(devices) > 1 else ''}"
    if not joined:
        return Processes(0, 1, how)
    how += f" in {jax.process_count()} processes (jax.distributed)"
    return Processes(
        jax.process_index(),
        jax.process_count(),
        how,
        barrier=_barrier,
        close=jax.distributed.shutdown,
    )


def _barrier() -> None:
    multihost_utils.sync_global_devices("vit_core finetune")


def trainer(model: FlaxViTForImageClassification, recipe: Recipe, processes: Processes) -> Trainer:
    return Trainer(model, recipe, processes)


def _host(tree: Any) -> Any:
    """A replicated pytree as numpy, from this process's own copy."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), tree)


class Trainer:
    """`optax.adamw` on a `FlaxViTForImageClassification`, the batch sharded over every
    device of `processes`."""

    def __init__(self, model: Any, recipe: Recipe, processes: Processes) -> None:
        """`model`: a `FlaxViTForImageClassification`."""
        rate = recipe.drop_path_rate
        if rate is not None and rate != model.config.drop_path_rate:
            # Drop path holds no weights: the same params in a model built at that rate.
            config = dataclasses.replace(model.config, drop_path_rate=rate)
            model = build(config, model.kind, internal_weights(model.params))
        if recipe.grad_checkpointing:
            model.gradient_checkpointing_enable()
        self.model, self.recipe, self.processes = model, recipe, processes
        self.config, self.kind = model.config, model.kind
        mesh = Mesh(np.array(jax.devices()), (BATCH_AXIS,))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.sharded = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
        host = jax.tree_util.tree_map(np.asarray, model.params)
        flat = traverse_util.flatten_dict(host)
        names = {path: to_torch(path, leaf)[0] for path, leaf in flat.items()}
        groups = recipe.groups({names[path]: leaf.shape for path, leaf in flat.items()})
        decays = {g.weight_decay for g in groups.values()} - {0.0}
        if len(decays) > 1:
            raise InputError(f"one weight decay for every decayed group; got {sorted(decays)}")
        scales = traverse_util.unflatten_dict({p: groups[n].lr_scale for p, n in names.items()})
        decayed = traverse_util.unflatten_dict(
            {p: groups[n].weight_decay > 0 for p, n in names.items()}
        )
        optimizer = optax.adamw(
            1.0,
            b1=recipe.betas[0],
            b2=recipe.betas[1],
            eps=recipe.eps,
            weight_decay=decays.pop() if decays else 0.0,
            mask=decayed,
        )
        self.params = self._replicate(host)
        self.opt_state = jax.jit(optimizer.init, out_shardings=self.replicated)(self.params)
        classes, smoothing = self.config.num_labels, recipe.label_smoothing
        key = jax.random.PRNGKey(recipe.seed)

        def loss_fn(params: Any, pixels: jax.Array, labels: jax.Array, rng: jax.Array) -> Any:
            logits = model(pixels, params=params, dropout_rng=rng, train=True).logits
            targets = optax.smooth_labels(jax.nn.one_hot(labels, classes), smoothing)
            return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()

        def train_step(
            params: Any, opt_state: Any, pixels: Any, labels: Any, lr: Any, step: Any
        ) -> tuple[Any, Any, Any]:
            rng = jax.random.fold_in(key, step)
            loss, grads = jax.value_and_grad(loss_fn)(params, pixels, labels, rng)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = jax.tree_util.tree_map(
                lambda p, u, s: p + (lr * s) * u, params, updates, scales
            )
            return params, opt_state, loss

        self._step = jax.jit(train_step, out_shardings=self.replicated, donate_argnums=(0, 1))
        self._local: tuple[int, Any] | None = None  # (steps, params on a local device)
        self.steps = 0

    def _replicate(self, tree: Any) -> Any:
        """Host arrays as global arrays held whole by every device."""
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_callback(a.shape, self.replicated, lambda i: a[i]),
            tree,
        )

    def step(self, pixels: np.ndarray, labels: np.ndarray, lr: float, step: int) -> float:
        local = len(jax.local_devices())
        if len(pixels) % local:
            raise InputError(
                f"this process's share of the batch, {len(pixels)} images, does not split "
                f"over its {local} devices; choose a --batch-size that is a multiple of "
                f"{local * self.processes.world}"
            )
        x = jax.make_array_from_process_local_data(self.sharded, pixels)
        y = jax.make_array_from_process_local_data(self.sharded, labels.astype(np.int32))
        scalars = self._replicate({"lr": np.float32(lr), "step": np.int32(step)})
        self.params, self.opt_state, loss = self._step(
            self.params, self.opt_state, x, y, scalars["lr"], scalars["step"]
        )
        self.steps += 1
        return float(np.asarray(loss.addressable_data(0)))

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        if self._local is None or self._local[0] != self.steps:  # once per set of weights
            self._local = (self.steps, jax.device_put(_host(self.params), jax.local_devices()[0]))
        out: Any = self.model(pixels, params=self._local[1])
        return np.asarray(out.logits, np.float32)

    def weights(self) -> dict[str, np.ndarray]:
        return internal_weights(_host(self.params))

    def optimizer_state(self) -> dict[str, np.ndarray]:
        out = {}
        for moment, field in ADAM_FIELDS.items():
            tree = _host(optax.tree_utils.tree_get(self.opt_state, field))
            out.update({f"{moment}.{n}": v for n, v in internal_weights(tree).items()})
        return out

    def load_optimizer_state(self, arrays: Mapping[str, np.ndarray], step: int) -> None:
        moments = {
            field: self._replicate(
                params_from_internal(
                    {
                        k.removeprefix(f"{moment}."): v
                        for k, v in arrays.items()
                        if k.startswith(f"{moment}.")
                    }
                )
            )
            for moment, field in ADAM_FIELDS.items()
        }
        count = self._replicate(np.int32(step))
        self.opt_state = optax.tree_utils.tree_set(self.opt_state, count=count, **moments)
