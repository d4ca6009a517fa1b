"""Data-parallel fine-tuning in JAX: each batch sharded across devices (NamedSharding).

    python examples/data_parallel_flax.py --devices 2 [--epochs 4] [--out FOLDER]

The fine-tune of examples/finetune_flax.py (the shipped digits model at 16x16), run
data-parallel on JAX's own engine: a one-axis `Mesh` named "data" over the devices;
params and optimizer state replicated (`PartitionSpec()`), each batch split along its
first axis (`PartitionSpec("data")`). The jitted train step is finetune_flax's, unchanged:
XLA partitions it by the shardings of its inputs and all-reduces the gradients itself.
The global batch is --batch-size; each device computes on batch-size / N digits, so
the last, smaller batch of an epoch is dropped.

On a CPU, `--devices N` splits the host into N XLA devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set here before jax is
imported); `--devices 0` uses the devices jax finds (GPUs, TPUs).

`--check-step FOLDER` takes one AdamW step on the first --batch-size training digits,
sharded, and writes the updated model to FOLDER: tests/parity/test_data_parallel.py
compares it with the single-device step on the whole batch.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from digits_data import load_digits_data, make_parser, report, settings_from


def force_host_devices(count: int) -> None:
    """Ask XLA for `count` CPU devices; only possible before jax is first imported."""
    if "jax" in sys.modules:
        raise RuntimeError("set the host device count before importing jax")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--devices", type=int, default=2, help="host CPU devices (0: as found)")
    parser.add_argument("--check-step", type=Path, default=None, metavar="FOLDER")
    args = parser.parse_args(argv)
    if args.devices:
        force_host_devices(args.devices)

    import jax
    import numpy as np
    from finetune_flax import accuracy, finetune, load_model, one_step
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    replicated, sharded = (
        NamedSharding(mesh, PartitionSpec()),
        NamedSharding(mesh, PartitionSpec("data")),
    )

    def place(value: Any, batch: bool = True) -> Any:
        return jax.device_put(value, sharded if batch else replicated)

    settings = settings_from(args)
    if settings.batch_size % len(devices):
        parser.error(
            f"--batch-size {settings.batch_size} does not split over {len(devices)} devices"
        )
    print(f"{len(devices)} devices: {', '.join(str(d) for d in devices)}")
    if args.check_step is not None:
        data = load_digits_data(settings)
        pixels = place(data.train_pixels[: settings.batch_size])
        shards = [tuple(s.data.shape) for s in pixels.addressable_shards]
        print(f"batch {pixels.shape} in {len(shards)} shards of {shards[0]}")
        model = load_model(settings)
        model.params = one_step(
            model, pixels, data.train_labels[: settings.batch_size], settings, place
        )
        model.save_pretrained(args.check_step)
        print(f"wrote the model after one data-parallel step to {args.check_step}")
        return 0

    data = load_digits_data(settings)
    model = load_model(settings)
    before = accuracy(model, data.test_pixels, data.test_labels)
    start = time.perf_counter()
    losses = finetune(model, data, settings, place=place, drop_last=True)
    elapsed = time.perf_counter() - start
    after = accuracy(model, data.test_pixels, data.test_labels)
    report(
        f"Flax, data-parallel over {len(devices)} devices",
        before,
        after,
        len(losses),
        elapsed,
        model,
        settings,
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
