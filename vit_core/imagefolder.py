"""A labelled image data set in ImageFolder layout, and the training-time image transforms.

The layout is torchvision's `ImageFolder`, which every fine-tuning recipe reads: one
subfolder per class, its name the label, its image files (found recursively, told by
extension, as `predict` finds them) the examples. Either

    DIR/<class>/<image>                          one pool, split here (`split_pool`)
    DIR/train/<class>/<image> + DIR/val/<class>/<image>   the split given

Classes are the sorted folder names, so label i is the same on every machine and in
both backends. Every image is decoded once up front (`check_images`): an unreadable file
is listed, counted and left out before training starts, so the data order, and with it a
resumed run, never depends on which file failed when.

The training transform is timm's and torchvision's `RandomResizedCrop` + horizontal flip,
followed by the model's own processor (resize to the model's size, rescale, normalise);
validation images get the processor alone. Each image's crop is drawn from a generator
seeded by (seed, epoch, image index) and each epoch's order from (seed, epoch), so the
batches of an epoch are the same whatever the number of processes or decoding threads,
and an epoch can be replayed exactly after a restart. No framework is imported here.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vit_core.batching import Batch, Item, images_in_folder, is_image_file, threaded_batches
from vit_core.errors import ImageError, InputError, ViTError
from vit_core.processing import ViTImageProcessor, open_image

SPLIT_FOLDERS = ("train", "val")
SPLIT_SEED = 0  # the held-out part of a pool is the same whatever --seed trains with
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (timm, torchvision)
CROP_ATTEMPTS = 10  # tries at a crop that fits, before the central fallback (torchvision)


@dataclass(frozen=True)
class Example:
    """One image file and its class index."""

    path: Path
    label: int


@dataclass
class ImageFolderData:
    """The classes, the training and validation examples, and what was left out."""

    root: Path
    classes: list[str]
    train: list[Example]
    val: list[Example]
    split: str  # how train and val came about, in words
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, the error)

    def fingerprint(self) -> str:
        """sha256 of the classes and of every example's path (relative), label and size:
        what a resumed run checks to be training on the same data."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.classes).encode())
        for part, examples in (("train", self.train), ("val", self.val)):
            for example in examples:
                relative = example.path.relative_to(self.root).as_posix()
                size = example.path.stat().st_size
                digest.update(f"\n{part}\t{relative}\t{example.label}\t{size}".encode())
        return digest.hexdigest()

    def counts(self) -> str:
        """`N training images, M validation images, K classes` for the log."""
        return (
            f"{len(self.train)} training and {len(self.val)} validation images in "
            f"{len(self.classes)} classes"
        )


def class_folders(root: Path, at_least: int = 2) -> dict[str, list[Path]]:
    """Class name -> its image files, for a folder laid out one subfolder per class.

    An empty class folder, fewer than `at_least` classes (a classifier tells two apart;
    a validation folder may hold one), or no class folders at all are `InputError`s
    naming the folder; image files lying directly in `root` belong to no class and are
    refused too (they are usually a layout mistake, not data to drop silently).
    """
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (expected an ImageFolder data set)")
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and is_image_file(p))
    if loose:
        raise InputError(
            f"{root}: holds image files directly ({', '.join(loose[:3])}"
            f"{', ...' if len(loose) > 3 else ''}); ImageFolder layout puts each class's "
            "images in a subfolder named after the class: DIR/<class>/<image>"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(
            f"{root}: no class folders; expected DIR/<class>/<image>, or DIR/train/<class>/"
            "<image> with DIR/val/<class>/<image>"
        )
    classes = {}
    for folder in folders:
        try:
            classes[folder.name] = images_in_folder(folder)
        except ImageError:
            raise InputError(
                f"{folder}: class folder without image files; add images or remove the folder"
            ) from None
    if len(classes) < at_least:
        raise InputError(
            f"{root}: only one class folder ({folders[0].name}); a classifier needs at least "
            "two classes to tell apart"
        )
    return classes


def split_pool(
    files: dict[str, list[Path]], val_fraction: float
) -> tuple[list[Example], list[Example]]:
    """A stratified split: `val_fraction` of each class (rounded; at least one image where
    a class has two or more, never all of it) held out, drawn by `SPLIT_SEED`."""
    rng = np.random.default_rng(SPLIT_SEED)
    train: list[Example] = []
    val: list[Example] = []
    for label, paths in enumerate(files.values()):
        order = rng.permutation(len(paths))
        held = (
            0
            if val_fraction == 0
            else min(len(paths) - 1, max(1, round(val_fraction * len(paths))))
        )
        held_out = set(order[:held].tolist())
        for i, path in enumerate(paths):
            (val if i in held_out else train).append(Example(path, label))
    return train, val


def scan(root: Path, val_fraction: float, workers: int) -> ImageFolderData:
    """The data set under `root` (see the module docstring), every image checked."""
    root = Path(root)
    given = [root / name for name in SPLIT_FOLDERS]
    if any(folder.is_dir() for folder in given):
        missing = [str(folder) for folder in given if not folder.is_dir()]
        if missing:
            raise InputError(
                f"{root}: has {' or '.join(n for n in SPLIT_FOLDERS if (root / n).is_dir())}/ "
                f"but not {', '.join(missing)}; give both train/ and val/, or neither (then "
                "a part of each class is held out for validation)"
            )
        train_files, val_files = class_folders(given[0]), class_folders(given[1], 1)
        unknown = sorted(set(val_files) - set(train_files))
        if unknown:
            raise InputError(
                f"{given[1]}: class folders {', '.join(unknown)} are not in {given[0]}; the "
                "model can only learn the classes it trains on"
            )
        classes = list(train_files)
        label = {c: i for i, c in enumerate(classes)}
        train = [Example(p, label[c]) for c, paths in train_files.items() for p in paths]
        val = [Example(p, label[c]) for c, paths in val_files.items() for p in paths]
        split = "the train/ and val/ folders"
    else:
        files = class_folders(root)
        classes = list(files)
        train, val = split_pool(files, val_fraction)
        split = (
            f"a fixed seeded split holding out {100 * val_fraction:g} % of each class"
            if val_fraction
            else "no validation images (--val-fraction 0)"
        )
    data = ImageFolderData(root, classes, train, val, split)
    bad = dict(check_images([e.path for e in train + val], workers))
    if bad:
        data.skipped = sorted(bad.items())
        data.train = [e for e in train if e.path not in bad]
        data.val = [e for e in val if e.path not in bad]
    present = {e.label for e in data.train}
    empty = [c for i, c in enumerate(classes) if i not in present]
    if empty:
        raise InputError(
            f"{root}: no readable training images for class(es) {', '.join(empty)}; every "
            "class needs some"
        )
    return data


def _check_one(path: Path) -> str | None:
    try:
        open_image(path)
    except ViTError as exc:
        return str(exc)
    return None


def check_images(paths: Sequence[Path], workers: int) -> list[tuple[Path, str]]:
    """(file, reason) of every image that does not decode, each decoded once in full
    (`open_image`: a truncated file fails too), `workers` threads at a time."""
    if workers == 0:
        results = [_check_one(p) for p in paths]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="check") as pool:
            results = list(pool.map(_check_one, paths))
    return [(p, why) for p, why in zip(paths, results, strict=True) if why is not None]


# ------------------------------------------------------------------ transforms
@dataclass(frozen=True)
class Augmentation:
    """RandomResizedCrop (area fraction `scale`, aspect `ratio`) and a horizontal flip with
    probability `hflip`, timm's and torchvision's training defaults."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = CROP_RATIO
    hflip: float = 0.5

    def crop_box(
        self, width: int, height: int, rng: np.random.Generator
    ) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a random crop: torchvision's
        `RandomResizedCrop.get_params`, numpy's generator instead of torch's."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(CROP_ATTEMPTS):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, left + w, top + h
        in_ratio = width / height  # fallback: the central crop of the nearest allowed aspect
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        image = image.crop(self.crop_box(image.width, image.height, rng))
        if rng.random() < self.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def image_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one image's crop and flip in one epoch."""
    return np.random.default_rng((seed, epoch, index))


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of the training examples in `epoch` (the same on every rank)."""
    return np.random.default_rng((seed, epoch, count)).permutation(count)


def _augmented(
    chosen: Sequence[Example],
    indices: Sequence[int],
    augment: Augmentation,
    seed: int,
    epoch: int,
    position: int,
    path: Path,
    processor: ViTImageProcessor,
) -> Item:
    """`batching.load_item` with the crop and flip first, drawn by the generator of the
    example's index in the training list; never raises a `ViTError`."""
    try:
        image = augment(open_image(path), image_rng(seed, epoch, indices[position]))
        return position, processor([image])["pixel_values"][0], None
    except ViTError as exc:
        return position, None, str(exc)


def train_batches(
    examples: Sequence[Example],
    batches: Sequence[np.ndarray],
    augment: Augmentation,
    processor: ViTImageProcessor,
    seed: int,
    epoch: int,
    workers: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels, labels) of each batch of `batches` (positions in `examples`, all of one
    size), augmented, decoded by `workers` threads one batch ahead of the consumer."""
    indices = [int(i) for batch in batches for i in batch]
    chosen = [examples[i] for i in indices]
    sizes = {len(batch) for batch in batches}
    if len(sizes) != 1:
        raise ValueError(f"training batches must all have one size; got {sorted(sizes)}")
    load: Callable[[int, Path, Any], Item] = partial(
        _augmented, chosen, indices, augment, seed, epoch
    )
    paths = [e.path for e in chosen]
    for batch in threaded_batches(paths, processor, sizes.pop(), workers, load):
        yield _stacked(batch, chosen)


def _stacked(batch: Batch, examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]:
    """A batch's pixels and labels; an image that no longer decodes stops the run."""
    if batch.errors:
        raise ImageError(
            f"{batch.errors[0][1]} (it decoded when the run started: was it changed since?)"
        )
    assert batch.pixels is not None
    return batch.pixels, np.array([examples[i].label for i in batch.indices], np.int64)


def val_batches(
    examples: Sequence[Example], processor: ViTImageProcessor, batch_size: int, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(pixels, labels) of the validation images in order, the processor alone."""
    paths = [e.path for e in examples]
    for batch in threaded_batches(paths, processor, batch_size, workers):
        yield _stacked(batch, examples)
