"""Fine-tune the shipped digits ViT at a higher resolution than it was trained at (PyTorch).

The shipped model reads 8x8 digits in 2x2 patches: a 4x4 position grid. Loaded with
`image_size=16` its position embeddings are resampled (bicubic by default) to the 8x8
grid of 16x16 images, and the config says 16, so the model runs at 16x16 as it is. The
held-out accuracy is measured right after the resampling and again after a short
fine-tune (AdamW, warm-up + cosine) on the shipped model's own training split.

    python examples/finetune_torch.py [--epochs 4] [--out FOLDER]

`--out` writes the fine-tuned model with `save_pretrained` (and the processor at the new
size): the folder loads in either framework, e.g. `vit_core.load(FOLDER, backend="flax")`.
The Flax twin of this script is `examples/finetune_flax.py`.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from digits_data import (
    SHIPPED,
    Digits,
    Settings,
    batches,
    load_digits_data,
    lr_factor,
    parse_args,
    report,
    settings_from,
    total_steps,
    warmup_steps,
)
from tqdm import tqdm

from vit_core import load
from vit_torch import ViTForImageClassification


def load_model(settings: Settings) -> ViTForImageClassification:
    """The shipped model at `settings.image_size`, position grid resampled at load time."""
    return load(
        SHIPPED,
        backend="torch",
        image_size=settings.image_size,
        interpolation=settings.interpolation,
    )


def make_optimizer(
    model: torch.nn.Module, learning_rate: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices and the patch kernel only (Flax: the kernels)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if name.endswith(".weight") and p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=learning_rate,
    )


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    pixels: torch.Tensor,
    labels: torch.Tensor,
) -> float:
    """One optimizer step on the mean cross-entropy of a batch; returns the loss."""
    model.train()
    loss = model(pixels, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def predict(model: torch.nn.Module, pixels: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits (N, classes) in inference mode."""
    model.eval()
    return np.concatenate(
        [
            model(torch.from_numpy(pixels[i : i + batch_size])).logits.numpy()
            for i in range(0, len(pixels), batch_size)
        ]
    )


def accuracy(model: torch.nn.Module, pixels: np.ndarray, labels: np.ndarray) -> float:
    return float((predict(model, pixels).argmax(-1) == labels).mean())


def make_scheduler(
    optimizer: torch.optim.Optimizer, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine decay over `total` steps (optax's warmup_cosine_decay_schedule)."""
    warmup = warmup_steps(total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))


def one_step(
    model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, settings: Settings
) -> float:
    """One AdamW step from a fresh optimizer at the peak learning rate (no schedule): the
    step the data-parallel check compares (model may be wrapped in DDP)."""
    optimizer = make_optimizer(model, settings.learning_rate, settings.weight_decay)
    return train_step(model, optimizer, pixels, labels)


def finetune(
    model: ViTForImageClassification, data: Digits, settings: Settings, progress: bool = True
) -> list[float]:
    """Train `model` in place; returns the loss of every step."""
    torch.manual_seed(settings.seed)  # dropout masks, if the config has dropout
    total = total_steps(settings, len(data.train_labels))
    optimizer = make_optimizer(model, settings.learning_rate, settings.weight_decay)
    scheduler = make_scheduler(optimizer, total)
    rng = np.random.default_rng(settings.seed)  # the Flax example shuffles identically
    pixels, labels = torch.from_numpy(data.train_pixels), torch.from_numpy(data.train_labels)
    losses: list[float] = []
    epochs = tqdm(range(settings.epochs), desc="epochs", unit="epoch", disable=not progress)
    for _ in epochs:
        for index in batches(len(labels), settings.batch_size, rng):
            if len(losses) == total:
                return losses
            index = torch.from_numpy(index)
            losses.append(train_step(model, optimizer, pixels[index], labels[index]))
            scheduler.step()
        epochs.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__)
    settings = settings_from(args)
    torch.set_num_threads(1)  # a tiny model gains nothing from intra-op threads
    data = load_digits_data(settings)
    model = load_model(settings)
    before = accuracy(model, data.test_pixels, data.test_labels)
    start = time.perf_counter()
    losses = finetune(model, data, settings)
    elapsed = time.perf_counter() - start
    after = accuracy(model, data.test_pixels, data.test_labels)
    report("PyTorch", before, after, len(losses), elapsed, model, settings, args.out, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
