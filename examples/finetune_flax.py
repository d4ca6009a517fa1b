"""Fine-tune the shipped digits ViT at a higher resolution than it was trained at (Flax).

The twin of `examples/finetune_torch.py`, with optax: the shipped model loaded with
`image_size=16` (its 4x4 position grid resampled to 8x8 at load time), held-out
accuracy right after the resampling, a short fine-tune (`optax.adamw`, warm-up +
cosine, the same hyper-parameters and batch order as the PyTorch script), and held-out
accuracy again.

    python examples/finetune_flax.py [--epochs 4] [--out FOLDER]

`--out` writes the fine-tuned model with `save_pretrained` (and the processor at the new
size); the folder loads in PyTorch with `vit_core.load(FOLDER)` and predicts the same.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_data import (
    SHIPPED,
    Digits,
    Settings,
    batches,
    load_digits_data,
    parse_args,
    report,
    settings_from,
    total_steps,
    warmup_steps,
)
from tqdm import tqdm

from vit_core import load
from vit_flax import FlaxViTForImageClassification

Placement = Callable[..., Any]  # place(value, batch=True) -> value on its device(s)
TrainStep = Callable[[Any, Any, jax.Array, jax.Array, jax.Array], tuple[Any, Any, jax.Array]]


def load_model(settings: Settings) -> FlaxViTForImageClassification:
    """The shipped model at `settings.image_size`, position grid resampled at load time."""
    return load(
        SHIPPED,
        backend="flax",
        image_size=settings.image_size,
        interpolation=settings.interpolation,
    )


def make_optimizer(
    learning_rate: float | optax.Schedule, weight_decay: float
) -> optax.GradientTransformation:
    """AdamW; weight decay on the kernels only (PyTorch: the matrices and the patch kernel)."""

    def decay_mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)

    return optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask)


def make_train_step(
    model: FlaxViTForImageClassification, optimizer: optax.GradientTransformation
) -> TrainStep:
    """A jitted step: (params, opt_state, pixels NCHW, labels, dropout rng) -> new ones + loss.

    The model runs with `train=True`, so dropout from its config applies, masks drawn
    from the rng. Under `jax.jit` with a batch sharded across devices the same function
    is the data-parallel step (see examples/data_parallel_flax.py).
    """

    def loss_fn(params: Any, pixels: jax.Array, labels: jax.Array, rng: jax.Array) -> jax.Array:
        return model(pixels, labels=labels, params=params, dropout_rng=rng, train=True).loss

    @jax.jit
    def train_step(
        params: Any, opt_state: Any, pixels: jax.Array, labels: jax.Array, rng: jax.Array
    ) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, pixels, labels, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def predict(
    model: FlaxViTForImageClassification, pixels: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """Logits (N, classes) in inference mode."""
    return np.concatenate(
        [
            np.asarray(model(pixels[i : i + batch_size]).logits)
            for i in range(0, len(pixels), batch_size)
        ]
    )


def accuracy(model: FlaxViTForImageClassification, pixels: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, pixels).argmax(-1) == labels).mean())


def unplaced(value: Any, batch: bool = True) -> Any:
    """The default placement: the default device (jax.jit's own choice)."""
    return jax.tree_util.tree_map(jnp.asarray, value)


def one_step(
    model: FlaxViTForImageClassification,
    pixels: np.ndarray,
    labels: np.ndarray,
    settings: Settings,
    place: Placement = unplaced,
) -> Any:
    """The params after one AdamW step from a fresh optimizer at the peak learning rate (no
    schedule): the step the data-parallel check compares. `place` puts each array where
    the step should find it (params: replicated; the batch: sharded)."""
    optimizer = make_optimizer(settings.learning_rate, settings.weight_decay)
    params = place(model.params, batch=False)
    train_step = make_train_step(model, optimizer)
    params, _, _ = train_step(
        params,
        optimizer.init(params),
        place(pixels),
        place(labels),
        jax.random.PRNGKey(settings.seed),
    )
    return params


def finetune(
    model: FlaxViTForImageClassification,
    data: Digits,
    settings: Settings,
    progress: bool = True,
    place: Placement = unplaced,
    drop_last: bool = False,
) -> list[float]:
    """Train `model` (its `params` replaced at the end); returns the loss of every step.

    `place(value, batch=...)` puts params (batch=False) and each batch where the jitted
    step should find them; `drop_last` skips the epoch's last, smaller batch (a sharded
    batch must split evenly over the devices).
    """
    total = total_steps(settings, len(data.train_labels), drop_last)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.learning_rate, warmup_steps(total), total
    )
    optimizer = make_optimizer(schedule, settings.weight_decay)
    train_step = make_train_step(model, optimizer)
    params = place(model.params, batch=False)
    opt_state = optimizer.init(params)
    key = jax.random.PRNGKey(settings.seed)
    rng = np.random.default_rng(settings.seed)  # the PyTorch example shuffles identically
    losses: list[jax.Array] = []
    epochs = tqdm(range(settings.epochs), desc="epochs", unit="epoch", disable=not progress)
    for _ in epochs:
        for index in batches(len(data.train_labels), settings.batch_size, rng, drop_last):
            if len(losses) == total:
                break
            key, dropout = jax.random.split(key)
            params, opt_state, loss = train_step(
                params,
                opt_state,
                place(data.train_pixels[index]),
                place(data.train_labels[index]),
                dropout,
            )
            losses.append(loss)
        if losses:
            epochs.set_postfix(loss=f"{float(losses[-1]):.3f}")
    model.params = params
    return [float(loss) for loss in losses]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__)
    settings = settings_from(args)
    data = load_digits_data(settings)
    model = load_model(settings)
    before = accuracy(model, data.test_pixels, data.test_labels)
    start = time.perf_counter()
    losses = finetune(model, data, settings)
    elapsed = time.perf_counter() - start
    after = accuracy(model, data.test_pixels, data.test_labels)
    report("Flax", before, after, len(losses), elapsed, model, settings, args.out, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
