"""The digits fine-tuning data and settings the examples share (numpy only, no framework).

The split is the one `scripts/train_digits.py` trained the shipped model with
(`train_test_split(test_size=0.2, random_state=0, stratify=labels)` over
`sklearn.datasets.load_digits`), and `split_digits` checks that its held-out part is
exactly the shipped `vit_core/assets/digits_heldout.npz`, so a fine-tune never sees a
held-out digit. Images go through the shipped folder's own `ViTImageProcessor`, asked
for another size: 8x8 digits are resized (PIL bilinear, as the processor's config says)
to the resolution the fine-tuned model runs at.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout even without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from vit_core import ViTImageProcessor  # noqa: E402
from vit_core.resample import INTERPOLATIONS  # noqa: E402

SHIPPED = ROOT / "vit_core" / "assets" / "vit-digits"
HELDOUT = ROOT / "vit_core" / "assets" / "digits_heldout.npz"
DIGITS_MAX = 16  # load_digits counts ink in 4x4 blocks: values 0..16


@dataclass(frozen=True)
class Settings:
    """Fine-tuning hyper-parameters, the same in both frameworks' examples."""

    image_size: int = 16
    interpolation: str = "bicubic"
    epochs: int = 4
    batch_size: int = 64
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    seed: int = 0
    max_steps: int | None = None  # stop early (tests); None runs every epoch
    train_limit: int | None = None  # use only the first N training digits (tests)


@dataclass(frozen=True)
class Digits:
    """Processed pixel values (N, 3, H, W) float32 and int64 labels, train and held-out."""

    train_pixels: np.ndarray
    train_labels: np.ndarray
    test_pixels: np.ndarray
    test_labels: np.ndarray


def digits_as_uint8(data: np.ndarray) -> np.ndarray:
    """(N, 64) counts 0..16 -> (N, 8, 8) uint8 0..255, as train_digits.py stores them."""
    return np.rint(data.reshape(-1, 8, 8) * (255 / DIGITS_MAX)).astype(np.uint8)


def split_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, held-out images, held-out labels) as the shipped model's."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits_as_uint8(digits.data), digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    with np.load(HELDOUT) as shipped:
        if not (
            np.array_equal(shipped["images"], x_test) and np.array_equal(shipped["labels"], y_test)
        ):
            raise RuntimeError(f"the split no longer reproduces {HELDOUT}; the held-out set moved")
    return x_train, y_train, x_test, y_test


def processor(image_size: int) -> ViTImageProcessor:
    """The shipped model's processor, resizing to `image_size` instead of 8."""
    return ViTImageProcessor.from_pretrained(SHIPPED, size=image_size)


def load_digits_data(settings: Settings) -> Digits:
    x_train, y_train, x_test, y_test = split_digits()
    if settings.train_limit is not None:
        x_train, y_train = x_train[: settings.train_limit], y_train[: settings.train_limit]
    process = processor(settings.image_size)

    def pixels(images: np.ndarray) -> np.ndarray:
        return process(list(images), return_tensors="np")["pixel_values"]

    return Digits(pixels(x_train), y_train, pixels(x_test), y_test)


def batches(
    count: int, batch_size: int, rng: np.random.Generator, drop_last: bool = False
) -> Iterator[np.ndarray]:
    """Indices of one shuffled epoch, batch by batch (the last one smaller unless dropped)."""
    order = rng.permutation(count)
    for start in range(0, count - batch_size + 1 if drop_last else count, batch_size):
        yield order[start : start + batch_size]


def total_steps(settings: Settings, count: int, drop_last: bool = False) -> int:
    per_epoch = count // settings.batch_size if drop_last else -(-count // settings.batch_size)
    steps = settings.epochs * per_epoch
    return steps if settings.max_steps is None else min(steps, settings.max_steps)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total` (as optax's
    `warmup_cosine_decay_schedule` from 0 to the peak: the Flax example uses that)."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + np.cos(np.pi * progress))


def warmup_steps(total: int) -> int:
    """A tenth of the steps warm up (none in runs shorter than 10 steps)."""
    return total // 10


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def make_parser(description: str | None) -> argparse.ArgumentParser:
    """The command line the fine-tuning examples share (the data-parallel ones add to it)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Settings()
    parser.add_argument("--image-size", type=positive_int, default=defaults.image_size)
    parser.add_argument("--interpolation", choices=INTERPOLATIONS, default=defaults.interpolation)
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--max-steps", type=positive_int, default=None, help="stop after N steps")
    parser.add_argument("--out", type=Path, default=None, help="save the fine-tuned model here")
    return parser


def parse_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    return make_parser(description).parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        image_size=args.image_size,
        interpolation=args.interpolation,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        seed=args.seed,
        max_steps=args.max_steps,
    )


def report(
    title: str,
    before: float,
    after: float,
    steps: int,
    elapsed: float,
    model: Any,
    settings: Settings,
    out: Path | None,
    data: Digits | None = None,
) -> None:
    """The examples' common ending: accuracy before and after, and the saved folder."""
    size = settings.image_size
    print(f"{title}: fine-tuned at {size}x{size}")
    if data is not None:
        print(f"train digits: {len(data.train_labels)}, held-out digits: {len(data.test_labels)}")
    print(f"held-out accuracy before (resampled, not trained): {100 * before:.2f} %")
    print(f"held-out accuracy after {steps} steps ({elapsed:.1f} s): {100 * after:.2f} %")
    if out is not None:
        model.save_pretrained(out)
        processor(size).save_pretrained(out)
        print(f"wrote {out}")
