"""Batch inference on a Ray cluster: `ray_embed` and `ray_predict` (Ray Data, actor pools).

The same call runs on this machine (a local Ray instance is started) or on a cluster of
many machines (`address=`, or `RAY_ADDRESS`); docs/distributed.md says how. Three steps:

1. **Paths, on the driver**: `vit_core.batching.expand_inputs` finds the images (files,
   globs, folders) as `predict` and `embed` do; they become a dataset of path strings
   (`ray.data.from_items`), one block per batch. Only paths travel; every node reads the
   images itself, so they must be on storage every node sees at the same path.
2. **Decoding and the model, in a pool of actors** (`Dataset.map_batches` with a callable
   class and a fixed pool size): each actor loads the model folder once, then per batch
   decodes and preprocesses its images (`vit_core.batching.load_item`, the folder's
   processor) and runs the model. Decoding happens there rather than in Ray's
   `read_binary_files`: it is then as parallel as the actors, the paths stay the strings
   given (a datasource rewrites them), and an unreadable image is a row with its error,
   the same one a single-process run writes, instead of a failed read task.
3. **Parquet, written by Ray** (`Dataset.write_parquet`, files of at least `ROWS_PER_FILE`
   rows) into a hidden folder beside the output, renamed into place once every row is
   written (`vit_core._io.staged_folder`): the output is a folder of Parquet files, or
   nothing.

Fault tolerance is Ray's own: an actor whose process dies is restarted, and the batches
it held are run again on the new one. Ray Data gives every actor pool these settings
itself (`max_restarts=-1`, `max_task_retries=-1`: no limit; see
`ActorPoolMapOperator._apply_default_remote_args`), and Ray 2.60 deprecates passing
remote arguments such as these to `map_batches`, so none are passed here. A batch's rows
reach the output only from a task that completed, so each image is written once. Row
order within the output is not guaranteed.

Ray is imported here only, and only when a function runs (the rest of the package never
imports this module); a missing Ray is one error naming the `[ray]` extra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import vit_core
from vit_core._io import check_target, staged_folder
from vit_core.backend import get_backend
from vit_core.batching import expand_inputs, softmax, threaded_batches, top_k
from vit_core.embedding import EmbedSpec, embed_pixels, import_pyarrow, parquet_table
from vit_core.errors import InputError
from vit_core.processing import model_processor

EXTRA = "pip install 'vit-twin[ray]'"
DEFAULT_SPEC = EmbedSpec()  # "auto" pooling of the last block, as `embed` does by default
ROWS_PER_FILE = 4096  # at least this many rows per Parquet file (the last one: what is left)


def import_ray() -> Any:
    """The `ray` module with Ray Data, or an ImportError that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(
            f"vit_core.distributed runs on Ray Data, which is not installed ({exc}); "
            f"install it with `{EXTRA}`"
        ) from exc
    return ray


# -------------------------------------------------------------------- actors
class ModelActor:
    """What every actor of the pool does: load the folder once, then decode each batch of
    paths and hand the readable images to `rows`, which subclasses define.

    `working_dir` is the driver's folder when some path is relative: the actor reads from
    there, so relative paths mean on every node what they mean to the caller (and rows
    and error messages name them as given). `decoders`: threads decoding a batch (0:
    in the actor's own thread); the model gets the actor's CPUs, since Ray sets
    `OMP_NUM_THREADS` to them.
    """

    def __init__(
        self,
        model: str,
        backend: str,
        model_type: str,
        decoders: int,
        working_dir: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        if working_dir is not None:
            try:
                os.chdir(working_dir)
            except OSError as exc:
                raise InputError(
                    f"relative paths are read from the caller's folder {working_dir}, which "
                    f"this node ({os.uname().nodename}) cannot enter ({exc}); pass absolute "
                    "paths on storage every node mounts"
                ) from None
        self.backend = get_backend(backend)
        self.model = vit_core.load(
            model, backend=backend, model_type=model_type, device=device, dtype=dtype
        )
        self.config = self.model.config
        self.processor = model_processor(Path(model), self.model)
        self.decoders = decoders

    def __call__(self, batch: Any) -> Any:
        """An Arrow table of paths in, an Arrow table of the rows `rows` makes out."""
        paths = [str(p) for p in batch.column("path").to_pylist()]
        decoded = next(
            threaded_batches([Path(p) for p in paths], self.processor, len(paths), self.decoders)
        )
        errors: list[str | None] = [None] * len(paths)
        for index, message in decoded.errors:
            errors[index] = message
        return self.rows(paths, decoded.indices, decoded.pixels, errors)

    def rows(
        self,
        paths: list[str],
        indices: list[int],
        pixels: np.ndarray | None,
        errors: list[str | None],
    ) -> Any:
        """The output rows of one batch: `pixels` are those of `paths[i]` for i in `indices`."""
        raise NotImplementedError


class EmbedActor(ModelActor):
    """Rows of `vit_core.embedding.parquet_schema`: path, embedding (null where the image
    could not be read), error (null where it could)."""

    def __init__(self, spec: EmbedSpec, **common: Any) -> None:
        super().__init__(model_type="base", **common)
        self.spec = spec
        self.width = spec.width(self.config, self.model.kind)

    def rows(
        self,
        paths: list[str],
        indices: list[int],
        pixels: np.ndarray | None,
        errors: list[str | None],
    ) -> Any:
        vectors = np.full((len(paths), self.width), np.nan, np.float32)
        if pixels is not None:
            vectors[indices] = embed_pixels(
                self.backend, self.model, self.config, pixels, self.spec
            )
        return parquet_table(paths, vectors, errors)


class PredictActor(ModelActor):
    """Rows of `predict_schema(k)`: path, label_1, probability_1, ..., label_k,
    probability_k (as `predict -o FILE.csv` writes them; null where the image could not
    be read), error."""

    def __init__(self, k: int, **common: Any) -> None:
        super().__init__(model_type="classification", **common)
        self.k = k

    def rows(
        self,
        paths: list[str],
        indices: list[int],
        pixels: np.ndarray | None,
        errors: list[str | None],
    ) -> Any:
        pa, _ = import_pyarrow()
        ranked: list[list[tuple[str, float]] | None] = [None] * len(paths)
        if pixels is not None:
            probabilities = softmax(self.backend.run(self.model, pixels)["logits"])
            for index, row in zip(indices, probabilities, strict=True):
                ranked[index] = top_k(row, self.k, self.config.id2label)
        columns: dict[str, list[Any]] = {"path": paths}
        for rank in range(self.k):
            columns[f"label_{rank + 1}"] = [None if r is None else r[rank][0] for r in ranked]
            columns[f"probability_{rank + 1}"] = [None if r is None else r[rank][1] for r in ranked]
        columns["error"] = errors
        return pa.Table.from_pydict(columns, schema=predict_schema(self.k))


def predict_schema(k: int) -> Any:
    """path, label_1, probability_1 (float64, as `predict` computes them), ..., error."""
    pa, _ = import_pyarrow()
    ranks = [
        (f"{name}_{rank}", kind)
        for rank in range(1, k + 1)
        for name, kind in (("label", pa.string()), ("probability", pa.float64()))
    ]
    return pa.schema([("path", pa.string()), *ranks, ("error", pa.string())])


# -------------------------------------------------------------------- driver
def connect(address: str | None) -> Any:
    """Ray, connected: the session already open in this process, else `ray.init(address)`
    (None: the cluster `RAY_ADDRESS` names, or a new local one; "auto": the running
    cluster this machine belongs to; "ray://HOST:10001": a remote one through Ray Client)."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address)
    return ray


def actor_pool(
    ray: Any, num_actors: int | None, num_gpus_per_actor: float, batches: int
) -> tuple[int, int]:
    """(actors, CPUs each) that fit the cluster as Ray sees it now.

    By default one actor per CPU (or per `num_gpus_per_actor` GPUs), never more than there
    are batches; the CPUs are shared out among the actors, but no actor gets more than the
    largest node holds (an actor lives on one node).
    """
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    largest = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=0)
    if num_gpus_per_actor:
        room = int(gpus // num_gpus_per_actor)
        needs = f"{num_gpus_per_actor:g} GPU(s) each; the Ray cluster has {gpus:g} GPU(s)"
    else:
        room, needs = cpus, f"1 CPU each; the Ray cluster has {cpus} CPU(s)"
    actors = num_actors or room
    if actors > room or room == 0:
        raise InputError(f"num_actors={actors} needs {needs}")
    actors = min(actors, batches)
    return actors, max(1, min(cpus // actors, largest))


@dataclass(frozen=True)
class Pool:
    """How the actor pool runs: the arguments `ray_embed` and `ray_predict` share."""

    backend: str
    batch_size: int
    num_actors: int | None
    num_gpus_per_actor: float
    address: str | None
    force: bool
    device: str | None = None  # `load`'s, in every actor (Ray gives each its own GPUs)
    dtype: str | None = None

    def check(self) -> None:
        """Refuse, before a model is loaded or a cluster started, what cannot run."""
        if self.batch_size < 1:
            raise InputError(f"batch_size={self.batch_size}: needs at least 1 image per batch")
        if self.num_actors is not None and self.num_actors < 1:
            raise InputError(f"num_actors={self.num_actors}: needs at least 1 actor")
        if self.num_gpus_per_actor < 0:
            raise InputError(f"num_gpus_per_actor={self.num_gpus_per_actor}: must be 0 or more")
        on_cpu = self.device is None or str(self.device).startswith("cpu")
        if self.num_gpus_per_actor and self.backend == "torch" and on_cpu:
            raise InputError(
                f"num_gpus_per_actor={self.num_gpus_per_actor:g} reserves GPUs for actors "
                f"whose torch model would run on the CPU (device={self.device!r}): pass "
                "device='cuda' (each actor sees its own GPUs from cuda:0 on)"
            )


def find_images(
    images: Sequence[str | Path] | str | Path, output: str | Path, pool: Pool
) -> tuple[list[str], Path]:
    """(the image paths, the output), once every argument is checked and Ray imported:
    what can be refused is refused before a model is loaded or a cluster started."""
    pool.check()
    out = Path(output)
    check_target(out, pool.force)
    import_ray()
    import_pyarrow()
    items = [images] if isinstance(images, str | Path) else images
    return list(dict.fromkeys(map(str, expand_inputs(items)))), out  # named twice: one row


def run_pool(
    paths: list[str],
    model: str | Path,
    output: Path,
    actor_class: type[ModelActor],
    actor_kwargs: dict[str, Any],
    pool: Pool,
) -> Path:
    """Steps 1-3 of the module docstring, with either actor class."""
    ray = connect(pool.address)
    batches = -(-len(paths) // pool.batch_size)
    actors, cpus = actor_pool(ray, pool.num_actors, pool.num_gpus_per_actor, batches)
    # A relative path is read from the caller's folder (see `ModelActor`).
    relative = any(not os.path.isabs(p) for p in [*paths, str(model)])
    kwargs = {
        **actor_kwargs,
        "model": str(model),
        "backend": pool.backend,
        "decoders": cpus if cpus > 1 else 0,
        "working_dir": os.getcwd() if relative else None,
        "device": pool.device,
        "dtype": pool.dtype,
    }
    dataset = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=batches)
    results = dataset.map_batches(
        actor_class,
        fn_constructor_kwargs=kwargs,
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=pool.num_gpus_per_actor,
    )
    with staged_folder(output, replace=pool.force) as staging:
        # Writing is light: without CPUs of its own it streams beside actors that hold them
        # all, instead of the rows piling up in the object store until the actors finish.
        results.write_parquet(
            str(staging), min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": 0}
        )
    return output


def ray_embed(
    images: Sequence[str | Path] | str | Path,
    model: str | Path,
    output: str | Path,
    *,
    backend: str = "torch",
    spec: EmbedSpec = DEFAULT_SPEC,
    batch_size: int = 8,
    num_actors: int | None = None,
    num_gpus_per_actor: float = 0,
    address: str | None = None,
    force: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    actor_class: type[EmbedActor] = EmbedActor,
) -> Path:
    """Embed every image on a Ray cluster; `output` becomes a folder of Parquet files.

    Its rows are those of `python -m vit_core embed -o X.parquet` (path, embedding as a
    fixed-size list of float32 or null, error), in no particular order:
    `pyarrow.parquet.read_table(output)` reads either. `images`: files, globs and folders,
    as `embed` takes them; `model`: the folder, loaded as its encoder in every actor. The
    images and the folder must be readable at the same paths on every node (a relative
    path is read from the caller's current folder there too).

    `num_actors`: the pool's size (default: one actor per CPU of the cluster, or per
    `num_gpus_per_actor` GPUs); `address`: as `ray.init` takes it (None: `RAY_ADDRESS` or
    a new local instance; ignored when this process is connected already). An existing
    `output` is an error unless `force`. `device` and `dtype`: `vit_core.load`'s, in each
    actor (the driver checks the folder on its default device). `actor_class`: a
    subclass of `EmbedActor` to run instead (to add logging, or a failure in tests).
    """
    pool = Pool(backend, batch_size, num_actors, num_gpus_per_actor, address, force, device, dtype)
    paths, out = find_images(images, output, pool)
    encoder = vit_core.load(model, backend=backend, model_type="base")
    spec.check(encoder.config, encoder.kind, str(model))
    return run_pool(paths, model, out, actor_class, {"spec": spec}, pool)


def ray_predict(
    images: Sequence[str | Path] | str | Path,
    model: str | Path,
    output: str | Path,
    *,
    top_k: int = 5,
    backend: str = "torch",
    batch_size: int = 8,
    num_actors: int | None = None,
    num_gpus_per_actor: float = 0,
    address: str | None = None,
    force: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    actor_class: type[PredictActor] = PredictActor,
) -> Path:
    """`predict` on a Ray cluster: the top-k labels and probabilities of every image, as
    a folder of Parquet files with the columns of `predict -o FILE.csv` (path, label_1,
    probability_1, ..., label_k, probability_k) and `error` (then the labels are null).
    k is `top_k`, or the number of labels if fewer. `actor_class`: a subclass of
    `PredictActor` to run instead. The other arguments are `ray_embed`'s.
    """
    if top_k < 1:
        raise InputError(f"top_k={top_k}: needs at least 1")
    pool = Pool(backend, batch_size, num_actors, num_gpus_per_actor, address, force, device, dtype)
    paths, out = find_images(images, output, pool)
    classifier = vit_core.load(model, backend=backend, model_type="classification")
    k = min(top_k, classifier.config.num_labels)
    return run_pool(paths, model, out, actor_class, {"k": k}, pool)
