"""Images in, batches out, for `predict` over folders of any size.

Two concerns, each kept small (a backend adds how its framework runs them: a torch
`DataLoader`, or batches sharded over jax devices; see each twin's `backend.py`):

- **Finding the images**: files, globs and folders (walked recursively, image files told
  by extension) become one sorted list of paths. Only paths are ever listed in full.
- **Streaming**: images are decoded and preprocessed batch by batch, with at most a few
  batches in flight, so memory stays bounded whatever the folder's size: worker
  processes of a `DataLoader` (`ImageFiles` is its dataset), or a small thread pool, in
  which PIL's decoding and resizing release the GIL. An unreadable image never raises in
  a worker: it comes back as an error record, so the main process decides (stop with one
  clear line, or skip).

No framework is imported here.
"""

from __future__ import annotations

import functools
import glob
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vit_core.errors import ImageError, ViTError
from vit_core.processing import open_image

GLOB_CHARACTERS = frozenset("*?[")
PREFETCH_BATCHES = 1  # batches decoded ahead of the one the model is running on


# ------------------------------------------------------------------ decoding
# ------------------------------------------------------------- finding files
@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case suffixes of every format this PIL can open (".jpg", ".png", ".webp", ...)."""
    from PIL import Image

    Image.init()  # registers all plugins, so the list is complete
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_image_file(path: Path) -> bool:
    """An image by its extension; hidden files (e.g. macOS `._x.jpg` sidecars) are not."""
    return path.suffix.lower() in image_extensions() and not path.name.startswith(".")


def images_in_folder(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order; hidden folders skipped."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(p for p in (Path(root, f) for f in sorted(files)) if is_image_file(p))
    if not found:
        raise ImageError(f"{folder}: no image files in this folder or below it")
    return found


def _expand_one(item: Path) -> list[Path]:
    if item.is_dir():
        return images_in_folder(item)
    if item.exists():
        return [item]  # a file is taken as given, whatever its extension
    if not GLOB_CHARACTERS & set(str(item)):
        raise ImageError(f"{item}: no such image file")
    expanded: list[Path] = []
    for match in map(Path, sorted(glob.glob(str(item), recursive=True))):
        if match.is_dir():
            expanded.extend(images_in_folder(match))
        elif is_image_file(match):
            expanded.append(match)
    if not expanded:
        raise ImageError(f"{item}: no image files match this pattern")
    return expanded


def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Files, globs (`**` recurses) and folders as one list of image paths, in order given.

    Files named outright are kept even without an image extension (decoding will say
    if they are not images); a path that does not exist fails here, before any model is
    loaded. Globs and folders contribute only image files.
    """
    return [path for item in map(Path, items) for path in _expand_one(item)]


# ----------------------------------------------------------------- streaming
@dataclass
class Batch:
    """Decoded images of one batch: `pixels` (n, C, H, W) for the `indices` that decoded,
    and `errors` (index, message) for those that did not."""

    indices: list[int] = field(default_factory=list)
    pixels: np.ndarray | None = None
    errors: list[tuple[int, str]] = field(default_factory=list)


Item = tuple[int, np.ndarray | None, str | None]


def load_item(index: int, path: Path, processor: Any) -> Item:
    """(index, pixels (C, H, W) or None, error message or None); never raises a `ViTError`.

    An error is returned, not raised, so that it crosses a worker-process boundary as one
    line instead of a wrapped traceback.
    """
    try:
        return index, processor([open_image(path)])["pixel_values"][0], None
    except ViTError as exc:
        return index, None, str(exc)


def collate(items: Sequence[Item]) -> Batch:
    """Stack the decoded images of a batch; keep the failures aside."""
    batch = Batch(errors=[(i, error) for i, _, error in items if error is not None])
    decoded = [(i, pixels) for i, pixels, _ in items if pixels is not None]
    if decoded:
        batch.indices = [i for i, _ in decoded]
        batch.pixels = np.stack([pixels for _, pixels in decoded])
    return batch


class ImageFiles:
    """A map-style dataset of image files for `torch.utils.data.DataLoader`.

    A plain class (DataLoader needs only `__len__` and `__getitem__`), so that this
    module imports no torch; it is pickled to the workers with the processor.
    """

    def __init__(self, paths: Sequence[Path], processor: Any) -> None:
        self.paths = list(paths)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        return load_item(index, self.paths[index], self.processor)


def useful_workers(requested: int, num_items: int, batch_size: int) -> int:
    """Workers beyond the number of batches would idle; one batch is decoded in-process."""
    batches = -(-num_items // batch_size)
    return 0 if batches <= 1 else min(requested, batches)


def chunks(count: int, size: int) -> Iterator[range]:
    """range(count) cut into consecutive ranges of at most `size`."""
    for start in range(0, count, size):
        yield range(start, min(start + size, count))


def threaded_batches(
    paths: Sequence[Path],
    processor: Any,
    batch_size: int,
    workers: int,
    load: Callable[[int, Path, Any], Item] = load_item,
) -> Iterator[Batch]:
    """Batches decoded by a thread pool, at most `PREFETCH_BATCHES` ahead of the consumer.

    Needs no framework (the flax backend uses it). With `workers=0` decoding happens in
    the calling thread, one batch at a time.
    """
    if workers == 0:
        for indices in chunks(len(paths), batch_size):
            yield collate([load(i, paths[i], processor) for i in indices])
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque[list[Future[Item]]] = deque()
        for indices in chunks(len(paths), batch_size):
            pending.append([pool.submit(load, i, paths[i], processor) for i in indices])
            if len(pending) > PREFETCH_BATCHES:
                yield collate([future.result() for future in pending.popleft()])
        while pending:
            yield collate([future.result() for future in pending.popleft()])


# ------------------------------------------------------------------- results
RESULT_FORMATS = (".csv", ".json")
TopK = list[tuple[str, float]]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise probabilities, computed in float64 so tiny ones do not underflow to 0."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(probabilities: np.ndarray, k: int, id2label: dict[int, str]) -> TopK:
    """(label, probability) of the k most probable classes; ties keep the lower index."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(id2label[int(i)], float(probabilities[i])) for i in order]


class ResultsWriter:
    """Writes predictions to CSV or JSON as they come, so no result list builds up.

    The file appears only when the run completes (written to `NAME.part`, then renamed):
    an interrupted run never leaves a truncated file under the name asked for.
    CSV: `path,label_1,probability_1,...,label_k,probability_k`. JSON: a list of
    `{"path": ..., "top_k": [{"label": ..., "probability": ...}, ...]}`.
    """

    def __init__(self, path: Path, k: int) -> None:
        if path.suffix.lower() not in RESULT_FORMATS:
            raise ValueError(f"{path}: results are written as {' or '.join(RESULT_FORMATS)}")
        self.path, self.k, self.count = path, k, 0
        self.partial = path.with_name(path.name + ".part")
        self.is_json = path.suffix.lower() == ".json"
        self.file: Any = None

    def __enter__(self) -> ResultsWriter:
        import csv

        self.file = self.partial.open("w", newline="", encoding="utf-8")
        if self.is_json:
            self.file.write("[")
        else:
            self.csv = csv.writer(self.file)
            ranks = range(1, self.k + 1)
            self.csv.writerow(
                ["path", *(f"{c}_{r}" for r in ranks for c in ("label", "probability"))]
            )
        return self

    def write(self, path: Path, predictions: TopK) -> None:
        import json

        if self.is_json:
            record = {
                "path": str(path),
                "top_k": [{"label": label, "probability": p} for label, p in predictions],
            }
            self.file.write(("," if self.count else "") + "\n  " + json.dumps(record))
        else:
            self.csv.writerow(
                [str(path), *(v for pair in predictions for v in (pair[0], repr(pair[1])))]
            )
        self.count += 1

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self.is_json:
            self.file.write("\n]\n")
        self.file.close()
        if exc_type is None:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)
