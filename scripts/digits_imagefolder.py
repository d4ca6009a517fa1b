"""Write scikit-learn's digits as PNG files in ImageFolder layout: the README's fine-tuning data.

    python scripts/digits_imagefolder.py OUT [--size 32] [--force]
    python -m vit_core finetune --data OUT --model vit_core/assets/vit-digits -o digits-32

OUT/train/<digit>/NNNN.png and OUT/val/<digit>/NNNN.png hold the split the shipped model
was trained on (`scripts/train_digits.py`): train/ its 1437 training digits, val/ its 360
held-out ones, checked to be exactly `vit_core/assets/digits_heldout.npz`, so a fine-tune
from the shipped model is never validated on a digit it has seen. Each 8x8 digit (ink
0..16, scaled to 0..255) is upsampled to SIZE x SIZE with PIL's bicubic filter and saved
as an 8-bit grayscale PNG; no download is involved. The folder is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from train_digits import DEFAULT_HELDOUT, split_digits

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout even without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from vit_core._io import staged_folder  # noqa: E402


def write_split(
    folder: Path, images: np.ndarray, labels: np.ndarray, size: int, per_class: int | None
) -> int:
    """`folder/<label>/NNNN.png` for each image (the first `per_class` of each label, if
    given), upsampled to `size`; how many were written."""
    written = 0
    for label in np.unique(labels):
        (folder / str(label)).mkdir(parents=True)
        for n, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            image = Image.fromarray(images[index], mode="L")
            image.resize((size, size), Image.Resampling.BICUBIC).save(
                folder / str(label) / f"{n:04d}.png"
            )
            written += 1
    return written


def write_digits(
    out: Path,
    size: int = 32,
    *,
    per_class: int | None = None,
    classes: Sequence[int] | None = None,
    pooled: bool = False,
    force: bool = False,
) -> dict[str, int]:
    """The digits as an ImageFolder at `out` (train/ + val/, or with `pooled` every digit
    in one `out/<digit>/` pool); `per_class` and `classes` take a part (tests). Returns
    the image count per split."""
    x_train, y_train, x_test, y_test = split_digits()
    with np.load(DEFAULT_HELDOUT) as shipped:
        if not (
            np.array_equal(shipped["images"], x_test) and np.array_equal(shipped["labels"], y_test)
        ):
            raise RuntimeError(f"the split no longer reproduces {DEFAULT_HELDOUT}")
    if classes is not None:
        train, test = np.isin(y_train, classes), np.isin(y_test, classes)
        x_train, y_train, x_test, y_test = (
            x_train[train],
            y_train[train],
            x_test[test],
            y_test[test],
        )
    with staged_folder(out, replace=force) as staging:
        if pooled:
            images, labels = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
            return {"pool": write_split(staging, images, labels, size, per_class)}
        return {
            "train": write_split(staging / "train", x_train, y_train, size, per_class),
            "val": write_split(staging / "val", x_test, y_test, size, per_class),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="the folder to write")
    parser.add_argument("--size", type=int, default=32, help="side of each PNG (default: 32)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size must be at least 1; got {args.size}")
    counts = write_digits(args.out, args.size, force=args.force)
    print(
        f"wrote {args.out}: {counts['train']} training and {counts['val']} validation digits, "
        f"{args.size}x{args.size} PNG, one folder per digit"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
