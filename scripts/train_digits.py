"""Train the small ViT shipped in `vit_core/assets/vit-digits` on scikit-learn's digits.

Reproducible by construction: fixed seeds, one CPU thread and
`torch.use_deterministic_algorithms(True)`, so a re-run on the same library versions writes
the same weights. The images go through the project's `ViTImageProcessor` exactly as a
user's images will (uint8 0..255, RGB, rescale, normalise with mean = std = 0.5), so the
shipped `preprocessor_config.json` is the one the model was trained behind. The held-out
split is written beside the model (`vit_core/assets/digits_heldout.npz`) so that the demo
needs no scikit-learn at run time.

    python scripts/train_digits.py --out vit_core/assets/vit-digits --force
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout even without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from vit_core.config import ViTConfig  # noqa: E402
from vit_core.processing import ViTImageProcessor  # noqa: E402
from vit_torch import ViTForImageClassification  # noqa: E402

DEFAULT_HELDOUT = ROOT / "vit_core" / "assets" / "digits_heldout.npz"
IMAGE_SIZE = 8
DIGITS_MAX = 16  # load_digits counts ink in 4x4 blocks: values 0..16


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters; the defaults are the ones the shipped model was trained with."""

    seed: int = 0
    epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.05
    shift_prob: float = 0.5


def model_config() -> ViTConfig:
    """A ViT small enough to train in seconds on a CPU, big enough for >= 97 % held-out."""
    return ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=2,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        encoder_stride=2,
        id2label={i: str(i) for i in range(10)},
        architectures=["ViTForImageClassification"],
    )


def make_processor() -> ViTImageProcessor:
    """The processor users' images go through: 8x8, rescale 1/255, mean = std = 0.5, RGB."""
    return ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def digits_as_uint8(data: np.ndarray) -> np.ndarray:
    """(N, 64) counts 0..16 -> (N, 8, 8) uint8 0..255, as a user's 8-bit image would hold them."""
    scaled = np.rint(data.reshape(-1, IMAGE_SIZE, IMAGE_SIZE) * (255 / DIGITS_MAX))
    return scaled.astype(np.uint8)


def split_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels): fixed and stratified."""
    digits = load_digits()
    images = digits_as_uint8(digits.data)
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    return x_train, y_train, x_test, y_test


def pixel_values(processor: ViTImageProcessor, images: np.ndarray) -> torch.Tensor:
    """(N, 3, 8, 8) float32 through the processor; a list, so each 8x8 array is one image."""
    return torch.from_numpy(processor(list(images), return_tensors="np")["pixel_values"])


def seed_everything(seed: int) -> None:
    """Fix every source of randomness and of run-to-run numeric drift (threads included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def shift_batch(
    batch: torch.Tensor, background: torch.Tensor, prob: float, generator: torch.Generator
) -> torch.Tensor:
    """Move some images by up to one pixel each way, filling with the processed value of 0.

    Only a fraction `prob` is moved: one pixel is an eighth of a digit, and shifting every
    image costs more accuracy on the (centred) held-out digits than it buys.

    The processor is per-pixel once the 8x8 resize is the identity, so shifting processed
    pixels equals processing a shifted uint8 image with black filled in.
    """
    n, _, h, w = batch.shape
    padded = background.view(1, -1, 1, 1).expand(n, -1, h + 2, w + 2).clone()
    padded[:, :, 1 : h + 1, 1 : w + 1] = batch
    offsets = torch.randint(0, 3, (n, 2), generator=generator)
    keep = torch.rand(n, generator=generator) >= prob
    offsets[keep] = 1  # (1, 1) is the unshifted crop
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def accuracy(model: ViTForImageClassification, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = model(pixels).logits.argmax(dim=-1)
    return float((predictions == labels).float().mean())


def train(
    pixels: torch.Tensor,
    labels: torch.Tensor,
    background: torch.Tensor,
    settings: TrainSettings,
) -> ViTForImageClassification:
    """AdamW with warm-up + cosine schedule, random 1-pixel shifts, label smoothing."""
    model = ViTForImageClassification(model_config())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embeddings" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.learning_rate,
    )
    steps_per_epoch = math.ceil(len(labels) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    warmup = settings.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total)
    )
    generator = torch.Generator().manual_seed(settings.seed)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
    progress = tqdm(range(settings.epochs), desc="epochs", unit="epoch", file=sys.stderr)
    for _ in progress:
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), settings.batch_size):
            index = order[start : start + settings.batch_size]
            batch = shift_batch(pixels[index], background, settings.shift_prob, generator)
            loss = loss_fn(model(batch).logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def prepare_out(out: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty folder unless asked to; `--force` still writes first."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SystemExit(f"error: {out} is not empty; pass --force to replace it")


def write_folder(out: Path, model: ViTForImageClassification, processor: ViTImageProcessor) -> None:
    """Write into a temp folder beside `out`, then swap it in, so `out` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        # mkdtemp and the atomic writers make private files; a model folder is meant to be shared.
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_heldout(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The held-out split as uint8 (N, 8, 8) 0..255 images and int64 labels, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        np.savez_compressed(handle, images=images.astype(np.uint8), labels=labels.astype(np.int64))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--heldout", type=Path, default=DEFAULT_HELDOUT, help="where to write the held-out split"
    )
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_out(args.out, args.force)
    settings = TrainSettings(seed=args.seed, epochs=args.epochs)
    seed_everything(settings.seed)
    processor = make_processor()
    x_train, y_train, x_test, y_test = split_digits()
    train_pixels, test_pixels = pixel_values(processor, x_train), pixel_values(processor, x_test)
    background = pixel_values(processor, np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.uint8))[
        0, :, 0, 0
    ]

    start = time.perf_counter()
    model = train(train_pixels, torch.from_numpy(y_train), background, settings)
    elapsed = time.perf_counter() - start
    held_out = accuracy(model, test_pixels, torch.from_numpy(y_test))

    write_folder(args.out, model, processor)
    write_heldout(args.heldout, x_test, y_test)
    params = sum(p.numel() for p in model.parameters())
    size = (args.out / "model.safetensors").stat().st_size
    print(f"train images: {len(y_train)}, held-out images: {len(y_test)}")
    print(f"parameters: {params:,}; model.safetensors: {size / 1024:.1f} KiB")
    print(f"train time: {elapsed:.1f} s ({settings.epochs} epochs)")
    print(
        f"held-out accuracy: {100 * held_out:.2f} % ({round(held_out * len(y_test))}/{len(y_test)})"
    )
    print(f"wrote {args.out} and {args.heldout}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
