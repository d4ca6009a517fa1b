"""Image embeddings (`python -m vit_core embed`): one vector per image, and the file it goes to.

Two jobs, both framework-neutral (a backend runs the model, `vit_core.backend`):

- **Pooling** (`EmbedSpec`, `embed_pixels`): one vector per image from the encoder's
  tokens: the model's own image embedding (`pooler_output`: a ViT's pooling layer, or the
  family's embedding as transformers returns it for DINOv2, CLIP, SigLIP), the class
  token, or the mean of the patch tokens; of the last block, or of any block (`layer`);
  optionally L2-normalised.
- **Writing** (`EmbeddingsOutput`): one row per input image, in input order, as Parquet
  (`path`, `embedding` as a fixed-size list of float32, `error`) or as `.npy` (N, D) with a
  CSV beside it (`index,path,error`); an unreadable image is a row with its error. Each
  finished batch is saved at once in a partial store beside the output (`OUT.partial/`),
  so a killed run resumes where it stopped (`--resume`); the output itself is assembled
  from the store at the end, block by block (memory stays bounded), and appears only
  complete.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_core._io import atomic_path, atomic_write_bytes, atomic_write_text, read_json_object
from vit_core.batching import chunks
from vit_core.errors import InputError, OutputExistsError, WriteError
from vit_core.info import family

if TYPE_CHECKING:
    from vit_core.backend import Backend
    from vit_core.config import ViTConfig
    from vit_core.layout import ModelKind

POOLS = ("auto", "cls", "mean", "pooler")
NORM_EPSILON = 1e-12  # as torch.nn.functional.normalize: a zero vector stays zero, not NaN
FORMATS = (".parquet", ".npy")
PARTIAL_SUFFIX = ".partial"  # the partial store: OUT.partial/ beside OUT
MANIFEST = "run.json"  # in the store: the settings a resume must repeat
BLOCK_ROWS = 4096  # rows assembled at a time when the output is written
CACHED_BATCHES = 4  # batches of the store held in memory while assembling


# ------------------------------------------------------------------ pooling
def has_pooler_output(config: ViTConfig, kind: ModelKind) -> bool:
    """Whether the base model returns `pooler_output`: it has a pooling layer (Dense +
    tanh), or belongs to a family whose transformers class returns its image embedding
    there; a transformers ViT without a pooling layer returns none (the twins' `unpooled`).
    """
    return kind.pooler or not config.transformers_compatible


def _auto_pool(has_pooled: bool, config: ViTConfig) -> str:
    """What "auto" stands for: the model's own embedding, else its class token, else the
    mean of the patch tokens."""
    if has_pooled:
        return "pooler"
    return "cls" if config.use_class_token else "mean"


@dataclass(frozen=True)
class EmbedSpec:
    """How an image becomes one vector.

    `pool`: "auto" (the model's `pooler_output` where it returns one, else the class
    token, else the mean of the patch tokens), "cls" (`last_hidden_state[:, 0]`), "mean"
    (the mean of the patch tokens, the class, distillation and register tokens left out)
    or "pooler" (`pooler_output`). `layer`: the tokens of block `layer` (0-based; negative
    counts from the end) instead of the last block's, with the final token norm applied to
    them (timm's `forward_intermediates(norm=True)`, DINOv2's convention for features of
    intermediate layers), so `layer=-1` gives the same tokens as `last_hidden_state`. The
    pooling layer runs on the last block only, so "pooler" takes no `layer`, and "auto"
    with a layer is the class token (or the patch mean). `normalize`: scale each vector to
    unit L2 norm.
    """

    pool: str = "auto"
    layer: int | None = None
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise InputError(f"unknown pool {self.pool!r}; choose one of {', '.join(POOLS)}")
        if self.layer is not None and self.pool == "pooler":
            raise InputError(
                f"pool='pooler' is the model's pooling head, which reads the last block only; "
                f"with layer={self.layer} choose 'cls', 'mean' or 'auto'"
            )

    def check(self, config: ViTConfig, kind: ModelKind, source: str = "the model") -> None:
        """Refuse, before any image is read, what this model cannot give (`kind`: the
        twin's `model.kind`; `source`: the folder, named in the message)."""
        name = family(config, kind)[0]
        if self.pool == "pooler" and not has_pooler_output(config, kind):
            raise InputError(
                f"{source}: pool='pooler' needs a pooler_output, and this {name} model has no "
                "pooling layer; use 'cls' or 'mean' (or 'auto': here the class token)"
            )
        if self.pool == "cls" and not config.use_class_token:
            raise InputError(
                f"{source}: pool='cls' needs a class token, and this {name} model has none "
                "(use_class_token=false); use 'mean' or 'auto'"
            )
        depth = config.num_hidden_layers
        if self.layer is not None and not -depth <= self.layer < depth:
            raise InputError(
                f"{source}: layer={self.layer} is out of range: this {name} model has {depth} "
                f"blocks, 0..{depth - 1} (or -{depth}..-1 counted from the end)"
            )

    def resolved_pool(self, config: ViTConfig, kind: ModelKind) -> str:
        """The pool "auto" stands for on this model; any other pool as given."""
        if self.pool != "auto":
            return self.pool
        return _auto_pool(self.layer is None and has_pooler_output(config, kind), config)

    def width(self, config: ViTConfig, kind: ModelKind) -> int:
        """Floats per embedding: the pooling layer's width, or the encoder's."""
        pooling_layer = kind.pooler and self.resolved_pool(config, kind) == "pooler"
        return config.pooler_output_size if pooling_layer else config.hidden_size

    def describe(self, config: ViTConfig, kind: ModelKind) -> str:
        """In words, for a summary line: "class token of the last block, L2-normalised"."""
        what = {
            "pooler": "the model's pooler_output",
            "cls": "class token",
            "mean": "mean of the patch tokens",
        }[self.resolved_pool(config, kind)]
        if self.layer is not None:
            what += f" of block {self.layer} (final norm applied)"
        elif what != "the model's pooler_output":
            what += " of the last block"
        return what + (", L2-normalised" if self.normalize else "")


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length; a zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, NORM_EPSILON)


def embed_pixels(
    backend: Backend, model: Any, config: ViTConfig, pixels: np.ndarray, spec: EmbedSpec
) -> np.ndarray:
    """(N, D) float32 embeddings of preprocessed pixels (N, C, H, W), as `spec` says.

    `model` is the encoder (`vit_core.load(folder, backend=..., model_type="base")`);
    check `spec` against it first (`EmbedSpec.check`) for messages that name the folder.
    """
    if spec.layer is None:
        out = backend.run(model, pixels)
        if "last_hidden_state" not in out:
            raise InputError(
                "embeddings are read from the encoder's tokens; load the folder as its "
                "encoder (vit_core.load(..., model_type='base'))"
            )
        tokens, pooled = out["last_hidden_state"], out.get("pooler_output")
    else:
        (tokens,) = backend.intermediates(model, pixels, [spec.layer], norm=True)
        pooled = None
    pool = _auto_pool(pooled is not None, config) if spec.pool == "auto" else spec.pool
    if pool == "pooler":
        if pooled is None:
            raise InputError("pool='pooler': this model returns no pooler_output")
        vectors = pooled
    elif pool == "cls":
        vectors = tokens[:, 0]
    else:
        vectors = tokens[:, config.num_prefix_tokens :].mean(axis=1)
    vectors = np.asarray(vectors, dtype=np.float32)
    return l2_normalize(vectors) if spec.normalize else vectors


# ------------------------------------------------------------------ writing
def import_pyarrow() -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet), or an ImportError that says how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError(
            "writing Parquet needs pyarrow, which is not installed; install it with "
            "`pip install 'vit-twin[parquet]'` (or write .npy + CSV: -o embeddings.npy)"
        ) from exc
    return pyarrow, pyarrow.parquet


def parquet_schema(width: int) -> Any:
    """The Parquet columns: `path` string, `embedding` fixed_size_list<float32, width>
    (null where the image could not be read), `error` string (null where it could)."""
    pa, _ = import_pyarrow()
    return pa.schema(
        [
            ("path", pa.string()),
            ("embedding", pa.list_(pa.float32(), width)),
            ("error", pa.string()),
        ]
    )


def parquet_table(paths: Sequence[str], vectors: np.ndarray, errors: Sequence[str | None]) -> Any:
    """Rows of `parquet_schema` as an Arrow table (also the blocks `vit_core.distributed`
    hands Ray to write): a row with an error gets a null embedding."""
    pa, _ = import_pyarrow()
    width = vectors.shape[1]
    failed = pa.array([e is not None for e in errors], pa.bool_())
    embedding = pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.reshape(-1), pa.float32()), width, mask=failed
    )
    columns = [pa.array(paths, pa.string()), embedding, pa.array(errors, pa.string())]
    return pa.Table.from_arrays(columns, schema=parquet_schema(width))


def listing_path(path: Path) -> Path:
    """Where the paths and errors of `path`'s rows are: the Parquet file itself, or the CSV
    beside an `.npy` (embeddings.npy -> embeddings.csv)."""
    return path if path.suffix.lower() == ".parquet" else path.with_suffix(".csv")


Block = tuple[range, np.ndarray, list[str | None]]  # rows, their embeddings, their errors


class EmbeddingsOutput:
    """The embeddings file of a run, written atomically, with resumable progress.

    Each finished batch is saved (`add`) as one `batch-NNNNNN.npz` in the partial store
    `OUT.partial/`, atomically, so a kill loses at most the batch in flight. `finish`
    writes OUT (and the CSV of an `.npy`) from the store in input order, under temp
    names renamed into place, then removes the store. `settings` (model, backend, pool,
    ...) are kept in the store: a resume must repeat them.

    Refused on construction: an OUT (or its CSV) that exists, unless `force`; a partial
    store, unless `resume` (finish it) or `force` (start over).
    """

    def __init__(
        self,
        path: str | Path,
        settings: Mapping[str, Any],
        *,
        resume: bool = False,
        force: bool = False,
    ) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in FORMATS:
            raise InputError(
                f"{self.path}: embeddings are written as {' or '.join(FORMATS)}; choose a "
                "name ending in one of them"
            )
        self.is_parquet = self.path.suffix.lower() == ".parquet"
        if self.is_parquet:
            import_pyarrow()  # before any work: a missing extra is said at once
        self.listing = listing_path(self.path)
        for file in dict.fromkeys((self.path, self.listing)):
            if (file.exists() or file.is_symlink()) and not force:
                raise OutputExistsError(
                    f"{file}: already exists; choose another output file, or pass --force "
                    "to replace it"
                )
        self.store = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.settings = dict(settings)
        self.rows: dict[str, tuple[int, int]] = {}  # path -> (batch number, row)
        self.errors: dict[str, str] = {}  # path -> why it could not be read
        self.batches = 0
        if not self.store.exists():
            return
        if resume:
            self._read_store()
        elif force:
            shutil.rmtree(self.store)
        else:
            raise OutputExistsError(
                f"{self.store}: the partial output of an unfinished run; pass --resume to "
                "finish it, or --force to start over"
            )

    @property
    def done(self) -> set[str]:
        """The paths (as strings) already in the store: embedded, or recorded as failed."""
        return self.rows.keys() | self.errors.keys()

    def _batch_file(self, number: int) -> Path:
        return self.store / f"batch-{number:06d}.npz"

    def _read_store(self) -> None:
        started = read_json_object(self.store / MANIFEST)
        if started != self.settings:
            keys = sorted(started.keys() | self.settings.keys())
            changed = [k for k in keys if started.get(k) != self.settings.get(k)]
            raise InputError(
                f"{self.store} was started with "
                + ", ".join(f"{k}={started.get(k)!r}" for k in changed)
                + "; this run has "
                + ", ".join(f"{k}={self.settings.get(k)!r}" for k in changed)
                + ": resume with the same options, or pass --force to start over"
            )
        for file in sorted(self.store.glob("batch-*.npz")):
            number = int(file.stem.removeprefix("batch-"))
            try:
                with np.load(file, allow_pickle=False) as data:
                    paths, failed, errors = data["paths"], data["failed"], data["errors"]
            except (OSError, ValueError, KeyError) as exc:
                raise InputError(
                    f"{file}: unreadable ({exc}); delete it to redo its batch, or pass --force "
                    "to start over"
                ) from None
            self.rows.update((str(p), (number, row)) for row, p in enumerate(paths))
            self.errors.update(zip(map(str, failed), map(str, errors), strict=True))
            self.batches = max(self.batches, number + 1)

    def add(
        self, paths: Sequence[str], embeddings: np.ndarray, failed: Sequence[tuple[str, str]]
    ) -> None:
        """Save one finished batch: `embeddings` (n, D) of `paths`, and (path, error) of
        the images of the batch that could not be read."""
        if not self.store.exists():
            try:
                self.store.mkdir(parents=True)
            except OSError as exc:
                raise WriteError(f"{self.store}: cannot create the partial output ({exc})") from exc
            atomic_write_text(self.store / MANIFEST, json.dumps(self.settings, indent=2) + "\n")
        buffer = io.BytesIO()
        np.savez(
            buffer,
            paths=np.array(paths, dtype=str),
            embeddings=np.asarray(embeddings, dtype=np.float32),
            failed=np.array([p for p, _ in failed], dtype=str),
            errors=np.array([e for _, e in failed], dtype=str),
        )
        atomic_write_bytes(self._batch_file(self.batches), buffer.getvalue())
        self.rows.update((p, (self.batches, row)) for row, p in enumerate(paths))
        self.errors.update(failed)
        self.batches += 1

    def finish(self, paths: Sequence[str | Path], width: int) -> tuple[int, int]:
        """Write the output, one row per path in this order (each path must be in the
        store), then remove the store: (images embedded, images that could not be read).
        `width` is the embedding's (the column's type, even if no image was readable)."""
        keys = [str(p) for p in paths]
        missing = [k for k in keys if k not in self.rows and k not in self.errors]
        if missing:
            raise ValueError(f"{len(missing)} path(s) not embedded yet, the first {missing[0]}")
        if self.is_parquet:
            self._write_parquet(keys, self._blocks(keys, width), width)
        else:
            self._write_npy(keys, self._blocks(keys, width), width)
        shutil.rmtree(self.store, ignore_errors=True)
        failed = sum(k in self.errors for k in keys)
        return len(keys) - failed, failed

    def _blocks(self, keys: list[str], width: int) -> Iterator[Block]:
        """The rows in order, `BLOCK_ROWS` at a time; NaN rows for unreadable images."""

        @functools.lru_cache(maxsize=CACHED_BATCHES)
        def embeddings(number: int) -> np.ndarray:
            with np.load(self._batch_file(number), allow_pickle=False) as data:
                return np.asarray(data["embeddings"])

        for rows in chunks(len(keys), BLOCK_ROWS):
            block = np.full((len(rows), width), np.nan, np.float32)
            for offset, key in enumerate(keys[rows.start : rows.stop]):
                where = self.rows.get(key)
                if where is not None:
                    block[offset] = embeddings(where[0])[where[1]]
            yield rows, block, [self.errors.get(k) for k in keys[rows.start : rows.stop]]

    def _write_npy(self, keys: list[str], blocks: Iterator[Block], width: int) -> None:
        with atomic_path(self.listing) as listing, atomic_path(self.path) as array_file:
            array = np.lib.format.open_memmap(
                array_file, mode="w+", dtype=np.float32, shape=(len(keys), width)
            )
            with listing.open("w", newline="", encoding="utf-8") as file:
                writer = csv.writer(file)
                writer.writerow(["index", "path", "error"])
                for rows, block, errors in blocks:
                    array[rows.start : rows.stop] = block
                    writer.writerows(
                        [i, keys[i], error or ""] for i, error in zip(rows, errors, strict=True)
                    )
            array.flush()
            del array  # unmapped before the rename

    def _write_parquet(self, keys: list[str], blocks: Iterator[Block], width: int) -> None:
        _, pq = import_pyarrow()
        with atomic_path(self.path) as tmp, pq.ParquetWriter(tmp, parquet_schema(width)) as writer:
            for rows, block, errors in blocks:
                writer.write_table(parquet_table(keys[rows.start : rows.stop], block, errors))
