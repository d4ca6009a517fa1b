"""Data-parallel fine-tuning with PyTorch DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node=2 examples/ddp_torch.py [--epochs 4] [--out FOLDER]

The fine-tune of examples/finetune_torch.py (the shipped digits model at 16x16), run
data-parallel on PyTorch's own engine: one process per replica (gloo backend, on the
CPU), a `DistributedSampler` giving each process its share of every epoch, and
`DistributedDataParallel` averaging the gradients across processes during `backward`,
so every replica takes the same AdamW step. The global batch is --batch-size; each of
the N processes computes on batch-size / N digits (the last, smaller batch of an epoch
is dropped so that the shares stay equal). Run without torchrun it is one process.

`--check-step FOLDER` takes one AdamW step on the first --batch-size training digits,
split across the processes by the sampler, and rank 0 writes the updated model to
FOLDER: tests/parity/test_data_parallel.py compares it with the single-process step on
the whole batch.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from digits_data import Settings, load_digits_data, make_parser, report, settings_from
from finetune_torch import (
    accuracy,
    load_model,
    make_optimizer,
    make_scheduler,
    one_step,
    train_step,
)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm


def init_process_group() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; a group of one without torchrun."""
    if "RANK" not in os.environ:
        with socket.socket() as probe:  # a free port for the group's rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")  # CPU tensors; on GPUs: nccl, and the model on its device
    return dist.get_rank(), dist.get_world_size()


def loader(
    dataset: TensorDataset, settings: Settings, rank: int, world: int, shuffle: bool
) -> tuple[DataLoader, DistributedSampler]:
    """This process's share of each global batch of `settings.batch_size` digits."""
    if settings.batch_size % world:
        raise SystemExit(
            f"--batch-size {settings.batch_size} does not split over {world} processes"
        )
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=settings.seed, drop_last=True
    )
    return DataLoader(
        dataset, batch_size=settings.batch_size // world, sampler=sampler, drop_last=True
    ), sampler


def check_step(settings: Settings, out: Path, rank: int, world: int) -> None:
    """One data-parallel step on the first batch_size training digits; rank 0 saves."""
    data = load_digits_data(settings)
    batch = slice(0, settings.batch_size)
    dataset = TensorDataset(
        torch.from_numpy(data.train_pixels[batch]), torch.from_numpy(data.train_labels[batch])
    )
    share, _ = loader(dataset, settings, rank, world, shuffle=False)
    ((pixels, labels),) = list(share)  # this rank's batch_size / world digits
    print(f"rank {rank}/{world}: {len(labels)} of the batch's {settings.batch_size} digits")
    model = DistributedDataParallel(load_model(settings))
    one_step(model, pixels, labels, settings)
    if rank == 0:
        model.module.save_pretrained(out)
        print(f"wrote the model after one data-parallel step to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--check-step", type=Path, default=None, metavar="FOLDER")
    args = parser.parse_args(argv)
    settings = settings_from(args)
    torch.set_num_threads(1)  # one core per process; a tiny model gains nothing from threads
    rank, world = init_process_group()
    try:
        if args.check_step is not None:
            check_step(settings, args.check_step, rank, world)
            return 0
        train(settings, args.out, rank, world)
    finally:
        dist.destroy_process_group()
    return 0


def train(settings: Settings, out: Path | None, rank: int, world: int) -> None:
    torch.manual_seed(settings.seed + rank)  # each replica its own dropout masks
    data = load_digits_data(settings)
    dataset = TensorDataset(
        torch.from_numpy(data.train_pixels), torch.from_numpy(data.train_labels)
    )
    share, sampler = loader(dataset, settings, rank, world, shuffle=True)
    model = DistributedDataParallel(load_model(settings))  # broadcasts rank 0's weights
    total = settings.epochs * len(share)
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    optimizer = make_optimizer(model, settings.learning_rate, settings.weight_decay)
    scheduler = make_scheduler(optimizer, total)
    before = accuracy(model.module, data.test_pixels, data.test_labels)
    start, steps = time.perf_counter(), 0
    epochs = tqdm(range(settings.epochs), desc="epochs", unit="epoch", disable=rank != 0)
    for epoch in epochs:
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        for pixels, labels in share:
            if steps == total:
                break
            loss = train_step(model, optimizer, pixels, labels)
            scheduler.step()
            steps += 1
        epochs.set_postfix(loss=f"{loss:.3f}")
    elapsed = time.perf_counter() - start
    if rank != 0:
        return
    after = accuracy(model.module, data.test_pixels, data.test_labels)
    processes = f"{world} process" + ("es" if world > 1 else "")
    title = f"PyTorch DDP over {processes}"
    report(title, before, after, steps, elapsed, model.module, settings, out)


if __name__ == "__main__":
    sys.exit(main())
