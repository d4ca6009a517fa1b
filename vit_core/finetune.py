"""Fine-tuning: `python -m vit_core finetune --data DIR --model FOLDER -o OUT`, both backends.

Everything a recipe means is decided here, once, in numpy, and handed to the backend's
training module (`vit_torch.training`, `vit_flax.training`, named by
`vit_core.backend.REGISTRY`), which only takes the steps:

- the data: an ImageFolder (`vit_core.imagefolder`), its sorted class names the labels,
  written to the model's `config.json` (`id2label`, `label2id`);
- the model: `vit_core.load` with `image_size=` (positions resampled once) and a new head
  sized from the classes (`num_labels=`, drawn from the seed, so the same in both
  backends), unless the folder's head already has exactly these labels;
- the schedule: AdamW (betas 0.9/0.999, eps 1e-8: torch's and optax's defaults) at a
  learning rate that warms up linearly from 0 and then decays by a half cosine to 0, per
  step (`learning_rates`: timm's `CosineLRScheduler` with `warmup_prefix`, and optax's
  `warmup_cosine_decay_schedule`);
- the parameter groups (`parameter_groups`): timm's `param_groups_layer_decay` semantics,
  layer ids from the blocks' order, learning-rate scale `layer_decay ** (last - id)`,
  no weight decay on 1-D tensors, positions and prefix tokens;
- label smoothing, stochastic depth (`drop_path_rate`), gradient checkpointing;
- reproducibility: each epoch's order and every image's crop are drawn from the seed
  (`vit_core.imagefolder`), and the dropout masks of each step from (seed, step), so a
  run stopped after any epoch and resumed (`--resume`) ends with the same weights;
- data-parallel training: each global batch is cut into equal contiguous shares, one per
  process (torch DDP under torchrun; JAX processes with `jax.distributed`), whose
  gradients the framework averages, so N processes take the steps one process would.

After each epoch rank 0 measures validation top-1 and writes a checkpoint folder,
`OUT/checkpoints/epoch-NNN/`, atomically (`vit_core._io.staged_folder`): a model folder
(weights, config, processor) that loads as it is, the optimizer state under the weights'
own internal names (`optimizer.safetensors`, no pickles) and `trainer_state.json` (the
step, the settings, the model's and the data's fingerprints, the history). When the last
epoch is done, OUT itself becomes the fine-tuned model folder (the last checkpoint's
files, hard-linked) with `finetune.json`, the run's record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load_file, save_file

from vit_core import loading
from vit_core._io import _link_or_copy, atomic_write_text, read_json_object, staged_folder
from vit_core.backend import REGISTRY, check_backend_name
from vit_core.checkpoint import resolve_files
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.errors import InputError, OutputExistsError, WriteError
from vit_core.imagefolder import (
    Augmentation,
    ImageFolderData,
    epoch_order,
    scan,
    train_batches,
    val_batches,
)
from vit_core.layout import WEIGHTS_NAME, ModelKind, model_kind
from vit_core.processing import PROCESSOR_NAME, ViTImageProcessor, processor_for
from vit_core.progress import progress_bar
from vit_core.resample import DEFAULT_INTERPOLATION, check_interpolation
from vit_core.safetensors_header import read_header

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
SUMMARY_NAME = "finetune.json"
STATE_FORMAT = 1
# AdamW's two moments per weight, torch's names: `optimizer.safetensors` holds
# MOMENT.NAME for each moment and weight NAME, whichever backend wrote it.
MOMENTS = ("exp_avg", "exp_avg_sq")
BETAS = (0.9, 0.999)  # AdamW's, torch's and optax's defaults
EPS = 1e-8
# timm's `VisionTransformer.no_weight_decay()` (pos_embed, cls_token, dist_token,
# reg_token) under the internal names; 1-D tensors (biases, norms) are never decayed either.
NO_WEIGHT_DECAY = (
    "embeddings.position_embeddings",
    "embeddings.cls_token",
    "embeddings.distillation_token",
    "embeddings.register_tokens",
)
_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.")
_EPOCH_FOLDER = re.compile(r"epoch-(\d+)")


# --------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Everything that decides the weights a run ends with (with the model, the data and
    the backend): saved in every checkpoint, and required unchanged by `--resume`."""

    epochs: int = 10
    batch_size: int = 64  # global: all processes together
    lr: float = 5e-4  # the peak learning rate, after warm-up
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    warmup_steps: int | None = None  # instead of warmup_epochs
    label_smoothing: float = 0.1
    layer_decay: float | None = None  # None: every layer at the full learning rate
    drop_path_rate: float | None = None  # None: the model config's
    image_size: tuple[int, int] | None = None  # None: the model's
    interpolation: str = DEFAULT_INTERPOLATION
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    val_fraction: float = 0.1  # of each class, when DIR has no train/ and val/
    new_head: bool = False  # a new head even where the model's labels are the classes
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            (self.epochs >= 1, "epochs", "at least 1"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "lr", "a positive number"),
            (0 <= self.weight_decay < math.inf, "weight_decay", ">= 0"),
            (0 <= self.warmup_epochs < math.inf, "warmup_epochs", ">= 0"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", ">= 0"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
            (
                self.layer_decay is None or 0 < self.layer_decay <= 1,
                "layer_decay",
                "in (0, 1]",
            ),
            (
                self.drop_path_rate is None or 0 <= self.drop_path_rate < 1,
                "drop_path_rate",
                "in [0, 1)",
            ),
            (
                0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
                "crop_scale",
                "MIN MAX with 0 < MIN <= MAX <= 1",
            ),
            (0 <= self.hflip <= 1, "hflip", "a probability in [0, 1]"),
            (0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)"),
        )
        for ok, name, expected in checks:
            if not ok:
                raise InputError(f"{name} must be {expected}; got {getattr(self, name)!r}")
        check_interpolation(self.interpolation)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (tuples as lists), as checkpoints store them."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(scale=self.crop_scale, hflip=self.hflip)


@dataclass(frozen=True)
class Launch:
    """How this process was started: alone, by torchrun (its `WORLD_SIZE` and `RANK`), or
    as one of `num_processes` JAX processes meeting at `coordinator` (HOST:PORT)."""

    world: int = 1
    rank: int = 0
    coordinator: str | None = None

    @classmethod
    def detect(
        cls,
        backend: str,
        coordinator: str | None = None,
        num_processes: int | None = None,
        process_id: int | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> Launch:
        """The launch of a `backend` run: torchrun's environment for torch, the
        `jax.distributed` coordinates for flax; a mismatch is an `InputError`."""
        jax_flags = (coordinator, num_processes, process_id)
        under_torchrun = "WORLD_SIZE" in environ and "RANK" in environ
        if backend == "flax":
            if under_torchrun and int(environ["WORLD_SIZE"]) > 1:
                raise InputError(
                    "the flax backend does not read torchrun's environment; start one process "
                    "per host with --coordinator HOST:PORT --num-processes N --process-id I"
                )
            if all(v is None for v in jax_flags):
                return cls()
            if any(v is None for v in jax_flags):
                raise InputError(
                    "JAX processes need all three of --coordinator, --num-processes and "
                    "--process-id (jax.distributed.initialize's arguments)"
                )
            assert num_processes is not None and process_id is not None
            if not 0 <= process_id < num_processes:
                raise InputError(
                    f"--process-id {process_id} is not in 0..{num_processes - 1} "
                    f"(--num-processes {num_processes})"
                )
            return cls(num_processes, process_id, coordinator)
        if any(v is not None for v in jax_flags):
            raise InputError(
                f"--coordinator, --num-processes and --process-id start JAX processes; the "
                f"{backend} backend is started data-parallel by torchrun "
                "(torchrun --nproc_per_node N -m vit_core finetune ...)"
            )
        if under_torchrun:
            return cls(int(environ["WORLD_SIZE"]), int(environ["RANK"]))
        return cls()


def _nothing() -> None:
    return None


@dataclass
class Processes:
    """The started process group: this process's rank, their number, how they run (in
    words); `barrier` waits for every process, `close` leaves the group."""

    rank: int
    world: int
    how: str
    barrier: Callable[[], Any] = _nothing
    close: Callable[[], Any] = _nothing


@dataclass(frozen=True)
class ParamGroup:
    """A parameter's learning-rate scale and weight decay (a torch param group's)."""

    lr_scale: float
    weight_decay: float


@dataclass(frozen=True)
class Recipe:
    """What a backend's `Trainer` needs besides the model and each step's learning rate."""

    groups: Callable[[Mapping[str, Sequence[int]]], dict[str, ParamGroup]]
    label_smoothing: float
    seed: int
    drop_path_rate: float | None
    grad_checkpointing: bool
    betas: tuple[float, float] = BETAS
    eps: float = EPS


class Trainer(Protocol):
    """A backend's training of one model (each twin's `training.Trainer`)."""

    config: ViTConfig
    kind: ModelKind

    def step(self, pixels: np.ndarray, labels: np.ndarray, lr: float, step: int) -> float:
        """One AdamW step on this process's share of a global batch at learning rate `lr`
        (each group's scale applied); the global batch's mean loss."""
        ...

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """The model's logits in inference mode, on this process alone."""
        ...

    def weights(self) -> dict[str, np.ndarray]:
        """The weights as float32 numpy under their internal names."""
        ...

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW's moments (`MOMENTS`) as `MOMENT.NAME` for each weight NAME, float32 in
        the internal layout (torch's conventions), whichever the backend."""
        ...

    def load_optimizer_state(self, arrays: Mapping[str, np.ndarray], step: int) -> None:
        """Continue from `optimizer_state()`'s arrays after `step` steps."""
        ...


class Training(Protocol):
    """A backend's training module (`BackendEntry.training`)."""

    def start_processes(self, launch: Launch) -> Processes: ...

    def trainer(self, model: Any, recipe: Recipe, processes: Processes) -> Trainer:
        """The trainer of `model` (as `vit_core.load` built it) in this process group."""
        ...


def training_backends() -> tuple[str, ...]:
    """The backends that can fine-tune (those with a training module)."""
    return tuple(name for name, entry in REGISTRY.items() if entry.training)


def get_training(backend: str) -> Training:
    """The training module of `backend`, importing its framework now."""
    check_backend_name(backend)
    module = REGISTRY[backend].training
    if module is None:
        raise InputError(
            f"the {backend} backend runs models but does not train them; fine-tune with "
            f"{' or '.join(training_backends())}"
        )
    loaded: Any = importlib.import_module(module)
    return loaded


# ------------------------------------------------------------ schedule, groups
def warmup_steps(settings: Settings, steps_per_epoch: int) -> int:
    if settings.warmup_steps is not None:
        return settings.warmup_steps
    return round(settings.warmup_epochs * steps_per_epoch)


def learning_rates(peak: float, total: int, warmup: int) -> np.ndarray:
    """The learning rate of each of `total` steps: linear from 0 over `warmup` steps, then
    a half cosine from `peak` to 0 over the rest (as timm's `CosineLRScheduler` with
    `warmup_prefix=True`, `warmup_lr_init=0`, `lr_min=0` stepped per update, and as
    optax's `warmup_cosine_decay_schedule(0, peak, warmup, total)`)."""
    if not 0 <= warmup < total:
        raise InputError(
            f"{warmup} warm-up steps leave none of the run's {total} steps for the cosine "
            "decay; warm up for fewer epochs or steps, or train for more"
        )
    step = np.arange(total, dtype=np.float64)
    decay = 0.5 * peak * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))
    return np.where(step < warmup, peak * step / max(warmup, 1), decay)


def _layer_ordinal(name: str, num_blocks: int) -> tuple[float, ...]:
    """timm's `VisionTransformer.group_matcher(coarse=False)` on an internal name: the
    stem (embeddings, pre-norm), each block, the final norm in the last block's group
    (timm's `MATCH_PREV_GROUP`), and last everything else (fc_norm, pooler, MAP head,
    classifiers)."""
    name = name.removeprefix("vit.")
    if name.startswith(("embeddings.", "norm_pre.")):
        return (0.0,)
    block = _BLOCK.match(name)
    if block:
        return (1.0, float(block[1]))
    if name.startswith("layernorm."):
        return (1.0, float(num_blocks - 1))
    return (math.inf,)


def parameter_groups(
    shapes: Mapping[str, Sequence[int]], weight_decay: float, layer_decay: float | None
) -> dict[str, ParamGroup]:
    """Each parameter's (lr scale, weight decay), by internal name, as timm's
    `param_groups_layer_decay` gives them (its `param_groups_weight_decay` when
    `layer_decay` is None: every scale 1).

    Layer ids number the distinct groups of `_layer_ordinal` in order (stem 0, blocks
    1..L with the final norm in L, then the head where the model has one); the scale of id i is
    `layer_decay ** (last id - i)`, so the head learns at the full rate and each earlier
    layer at `layer_decay` times the next one's.
    """
    blocks = {int(m[1]) for n in shapes if (m := _BLOCK.match(n.removeprefix("vit.")))}
    ordinals = {name: _layer_ordinal(name, len(blocks)) for name in shapes}
    ids = {o: i for i, o in enumerate(sorted(set(ordinals.values())))}
    last = len(ids) - 1
    groups = {}
    for name, shape in shapes.items():
        decays = len(shape) > 1 and name.removeprefix("vit.") not in NO_WEIGHT_DECAY
        scale = 1.0 if layer_decay is None else layer_decay ** (last - ids[ordinals[name]])
        groups[name] = ParamGroup(scale, weight_decay if decays else 0.0)
    return groups


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for the random masks (dropout, drop path) of one step on one rank."""
    return int(np.random.SeedSequence((seed, step, rank)).generate_state(2, np.uint64)[0] >> 1)


# ----------------------------------------------------------------- checkpoints
def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checkpoint_folder(out: Path, epoch: int) -> Path:
    return out / CHECKPOINTS / f"epoch-{epoch:03d}"


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(epoch, folder) of every finished checkpoint under OUT, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _EPOCH_FOLDER.fullmatch(entry.name)
        if match and (entry / TRAINER_STATE).is_file():
            found.append((int(match[1]), entry))
    return sorted(found)


def write_checkpoint(
    folder: Path,
    trainer: Trainer,
    processor: ViTImageProcessor,
    state: dict[str, Any],
) -> None:
    """One checkpoint folder, all of it or nothing: the model folder, the optimizer state
    and `trainer_state.json`."""
    optimizer = {k: np.ascontiguousarray(v) for k, v in trainer.optimizer_state().items()}
    with staged_folder(folder, replace=True) as staging:
        loading.save_folder(staging, trainer.config, trainer.weights(), trainer.kind)
        processor.save_pretrained(staging)
        try:
            save_file(optimizer, staging / OPTIMIZER_NAME, metadata={"step": str(state["step"])})
        except OSError as exc:
            raise WriteError(f"{folder}: cannot write {OPTIMIZER_NAME} ({exc})") from exc
        atomic_write_text(staging / TRAINER_STATE, json.dumps(state, indent=1) + "\n")


def _prune(out: Path, keep: int | None) -> None:
    """Delete all but the `keep` newest checkpoints (None keeps every one)."""
    if keep is None:
        return
    for _, folder in checkpoints(out)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def write_final(out: Path, checkpoint: Path, summary: dict[str, Any]) -> None:
    """OUT as the fine-tuned model folder: the last checkpoint's model files (hard links
    where the file system allows) and `finetune.json`; `checkpoints/` is kept."""
    with staged_folder(out, replace=True, keep_other_files=True) as staging:
        for name in (WEIGHTS_NAME, CONFIG_NAME, PROCESSOR_NAME):
            _link_or_copy(str(checkpoint / name), str(staging / name))
        atomic_write_text(staging / SUMMARY_NAME, json.dumps(summary, indent=1) + "\n")


def check_resumable(
    state_file: Path, state: Mapping[str, Any], expected: Mapping[str, Any]
) -> None:
    """Refuse a checkpoint whose run differs from this one: its format, backend, model or
    data (by content: their sha256, wherever they now lie) or settings (an `InputError`
    naming the file and every difference)."""
    if state.get("format") != STATE_FORMAT:
        raise InputError(
            f"{state_file}: not a checkpoint this version writes (format "
            f"{state.get('format')!r}, expected {STATE_FORMAT})"
        )
    differences = []
    if state.get("backend") != expected["backend"]:
        differences.append(f"backend {state.get('backend')!r} -> {expected['backend']!r}")
    for key in ("model", "data"):
        record = state.get(key)
        fingerprint: Mapping[str, Any] = record if isinstance(record, dict) else {}
        if fingerprint.get("sha256") != expected[key]["sha256"]:
            differences.append(f"{key} {_short(fingerprint)} -> {_short(expected[key])}")
    saved, wanted = state.get("settings", {}), expected["settings"]
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            differences.append(f"{key} {saved.get(key)!r} -> {wanted.get(key)!r}")
    if differences:
        raise InputError(
            f"{state_file}: --resume continues a run only with the same model, data, backend "
            f"and settings; this one differs: {'; '.join(differences)} (start afresh in "
            "another -o folder, or with --force)"
        )


def _short(record: Mapping[str, Any]) -> str:
    """A fingerprint record in a line: its path, and its digest's first characters."""
    return f"{record.get('path')} (sha256 {str(record.get('sha256', ''))[:12]})"


# ----------------------------------------------------------------------- run
@dataclass(frozen=True)
class Options:
    """How a run is carried out, without changing the weights it ends with."""

    backend: str = "torch"
    grad_checkpointing: bool = False
    workers: int = 2  # decoding threads
    progress: bool | None = None  # None: a bar when stderr is a terminal
    keep_checkpoints: int | None = None  # None: every epoch's
    resume: bool = False
    force: bool = False
    launch: Launch = field(default_factory=Launch)


@dataclass
class Result:
    """What a finished (or already finished) run reports."""

    out: Path
    history: list[dict[str, Any]]
    data: ImageFolderData
    resumed_from: int | None = None  # the epoch of the checkpoint it continued from


def _say(rank: int) -> Callable[..., None]:
    """print on rank 0, nothing elsewhere (every process computes, one reports)."""

    def say(*parts: Any, file: Any = None) -> None:
        if rank == 0:
            print(*parts, file=file or sys.stdout, flush=True)

    return say


def _fresh_model(
    model_path: Path, backend: str, data: ImageFolderData, settings: Settings
) -> tuple[Any, bool]:
    """The model to start from, and whether it kept its own head: kept when the folder
    has a classifier whose labels are the data set's classes in order (`new_head` aside)."""
    weights, config_file = resolve_files(model_path)
    config = ViTConfig.from_json_file(config_file)
    kind = model_kind(set(read_header(weights).tensors), config)
    labels = [config.id2label[i] for i in range(config.num_labels)] if config.num_labels else []
    keep = kind.classifier and labels == data.classes and not settings.new_head
    head: dict[str, Any] = (
        {"model_type": "classification"}
        if keep
        else {"id2label": dict(enumerate(data.classes)), "seed": settings.seed}
    )
    model = loading.load(
        model_path,
        backend,
        image_size=settings.image_size,
        interpolation=settings.interpolation,
        **head,
    )
    return model, keep


def _processor(folder: Path, config: ViTConfig) -> ViTImageProcessor:
    """The folder's processor (or the default one) resizing to the model's input size."""
    height, width = config.image_hw
    base = processor_for(folder, config)
    return ViTImageProcessor.from_dict(base.to_dict(), size={"height": height, "width": width})


def _top1(
    trainer: Trainer, data: ImageFolderData, processor: Any, batch_size: int, workers: int
) -> tuple[int, int] | None:
    """(correct, total) of the validation images, or None without any."""
    if not data.val:
        return None
    correct = 0
    for pixels, labels in val_batches(data.val, processor, batch_size, workers):
        correct += int((trainer.logits(pixels).argmax(-1) == labels).sum())
    return correct, len(data.val)


def _top1_text(top1: tuple[int, int] | None) -> str:
    if top1 is None:
        return "no validation images"
    correct, total = top1
    return f"val top-1 {100 * correct / total:.2f} % ({correct}/{total})"


def finetune(
    data_dir: str | Path,
    model_path: str | Path,
    out: str | Path,
    settings: Settings | None = None,
    options: Options | None = None,
) -> Result:
    """Fine-tune the model in `model_path` on the ImageFolder `data_dir` into `out`
    (the module docstring says what and how). Prints its progress on rank 0."""
    settings = settings or Settings()
    options = options or Options()
    data_dir, model_path, out = Path(data_dir), Path(model_path), Path(out)
    training = get_training(options.backend)
    resume_from = _resume_point(out, options)
    processes = training.start_processes(options.launch)
    try:
        result = _run(
            training, processes, data_dir, model_path, out, settings, options, resume_from
        )
        processes.barrier()  # no process leaves before rank 0 has written OUT
        return result
    finally:
        processes.close()


def _resume_point(out: Path, options: Options) -> tuple[int, Path] | None:
    """The checkpoint to continue from, or None to start afresh; refuses an existing OUT
    that is not asked to be resumed or replaced."""
    found = checkpoints(out)
    exists = out.exists() or out.is_symlink()
    if options.resume:
        if found:
            return found[-1]
        if exists and not (out.is_dir() and not any(out.iterdir())):
            raise InputError(
                f"{out}: holds no checkpoint to resume ({CHECKPOINTS}/epoch-NNN/{TRAINER_STATE})"
                "; choose another -o folder, or pass --force instead of --resume to replace it"
            )
        return None
    if exists and not options.force:
        raise OutputExistsError(
            f"{out}: already exists; pass --resume to continue the run it holds, --force to "
            "replace it, or choose another -o folder"
        )
    return None


@dataclass
class _Start:
    """Where a run begins: its model, whether that kept its own head, the epoch it starts
    after, the history so far, and what its checkpoints must record."""

    model: Any
    kept_head: bool
    epoch: int
    history: list[dict[str, Any]]
    expected: dict[str, Any]
    checkpoint: Path | None  # the one resumed from


def _start(
    data: ImageFolderData,
    model_path: Path,
    settings: Settings,
    options: Options,
    resume_from: tuple[int, Path] | None,
    say: Callable[..., None],
) -> _Start:
    """The model to train (fresh, or the checkpoint's after checking it is this run's)."""
    weights, _ = resolve_files(model_path)
    expected = {
        "format": STATE_FORMAT,
        "backend": options.backend,
        "model": {"path": str(model_path), "sha256": file_sha256(weights)},
        "data": {"path": str(data.root), "sha256": data.fingerprint(), "classes": data.classes},
        "settings": settings.to_json(),
    }
    if resume_from is None:
        model, kept = _fresh_model(model_path, options.backend, data, settings)
        return _Start(model, kept, 0, [], expected, None)
    epoch, folder = resume_from
    state = read_json_object(folder / TRAINER_STATE)
    check_resumable(folder / TRAINER_STATE, state, expected)
    model = loading.load(folder, options.backend, model_type="classification")
    say(f"resuming after epoch {epoch} of {settings.epochs} from {folder}")
    history = list(state.get("history", []))
    return _Start(model, bool(state.get("kept_head")), epoch, history, expected, folder)


def _resume_optimizer(trainer: Trainer, checkpoint: Path, step: int) -> None:
    """The checkpoint's AdamW moments into `trainer`, after checking they are its model's."""
    optimizer_file = checkpoint / OPTIMIZER_NAME
    arrays = load_file(str(optimizer_file))
    wanted = {f"{moment}.{name}" for moment in MOMENTS for name in trainer.weights()}
    if set(arrays) != wanted:
        raise InputError(
            f"{optimizer_file}: holds the moments of {len(arrays)} tensors, not the "
            f"{len(wanted)} this model's AdamW keeps; the checkpoint is damaged"
        )
    trainer.load_optimizer_state(arrays, step)


def _run(
    training: Training,
    processes: Processes,
    data_dir: Path,
    model_path: Path,
    out: Path,
    settings: Settings,
    options: Options,
    resume_from: tuple[int, Path] | None,
) -> Result:
    say = _say(processes.rank)
    data = scan(data_dir, settings.val_fraction, options.workers)
    for _, error in data.skipped:  # each error names its file
        say(f"warning: skipped {error}", file=sys.stderr)
    if data.skipped:
        say(f"warning: skipped {len(data.skipped)} unreadable image(s)", file=sys.stderr)
    say(f"data: {data.counts()} ({data.split})")
    share = _share(settings.batch_size, processes.world, len(data.train))
    steps_per_epoch = len(data.train) // settings.batch_size
    total = settings.epochs * steps_per_epoch
    rates = learning_rates(settings.lr, total, warmup_steps(settings, steps_per_epoch))
    start = _start(data, model_path, settings, options, resume_from, say)
    processor = _processor(start.checkpoint or model_path, start.model.config)
    recipe = Recipe(
        groups=lambda shapes: parameter_groups(shapes, settings.weight_decay, settings.layer_decay),
        label_smoothing=settings.label_smoothing,
        seed=settings.seed,
        drop_path_rate=settings.drop_path_rate,
        grad_checkpointing=options.grad_checkpointing,
    )
    trainer = training.trainer(start.model, recipe, processes)
    if start.checkpoint is not None:
        _resume_optimizer(trainer, start.checkpoint, start.epoch * steps_per_epoch)
    elif processes.rank == 0 and (out.exists() or out.is_symlink()):
        # --force, and every check has passed: the old OUT goes only now
        shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
    height, width = trainer.config.image_hw
    head = "its own head" if start.kept_head else f"a new head for {len(data.classes)} classes"
    say(
        f"model: {model_path} at {height}x{width}, {head}; {options.backend}, "
        f"{processes.how}; {steps_per_epoch} steps of {settings.batch_size} images per epoch"
    )
    if start.checkpoint is None and processes.rank == 0:
        top1 = _top1(trainer, data, processor, settings.batch_size, options.workers)
        say(f"epoch 0/{settings.epochs}: {_top1_text(top1)}")
    history = start.history
    for epoch in range(start.epoch, settings.epochs):
        record = _train_epoch(
            trainer, data, processor, settings, options, processes, epoch, share, rates
        )
        if processes.rank:
            continue  # rank 0 alone measures and writes
        record["val_top1"] = _top1(trainer, data, processor, settings.batch_size, options.workers)
        history.append(record)
        state = {
            **start.expected,
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "kept_head": start.kept_head,
            "skipped": [[str(p), why] for p, why in data.skipped],
            "history": history,
        }
        folder = checkpoint_folder(out, epoch + 1)
        write_checkpoint(folder, trainer, processor, state)
        _prune(out, options.keep_checkpoints)
        say(
            f"epoch {epoch + 1}/{settings.epochs}: loss {record['loss']:.4f}, "
            f"{_top1_text(record['val_top1'])}, {record['images_per_second']:.0f} img/s, "
            f"{record['seconds']:.1f} s; checkpoint {folder}"
        )
    if processes.rank == 0:
        last = checkpoints(out)[-1][1]
        summary = {**start.expected, "epochs": settings.epochs, "history": history}
        summary["skipped"] = [[str(p), why] for p, why in data.skipped]
        write_final(out, last, summary)
        say(f"wrote {out}: the model after epoch {settings.epochs} ({last.name})")
    return Result(out, history, data, None if resume_from is None else resume_from[0])


def _share(batch_size: int, world: int, train_count: int) -> int:
    """How many images of every global batch this process takes: one of `world` equal
    contiguous parts (the global batch must split evenly). A batch larger than the
    training set is refused: every step takes a full batch."""
    if batch_size > train_count:
        raise InputError(
            f"--batch-size {batch_size} is more than the {train_count} training images; "
            "every step takes a full batch (an epoch's last, incomplete one is dropped): "
            "choose a smaller batch"
        )
    if batch_size % world:
        raise InputError(
            f"--batch-size {batch_size} does not split evenly over {world} processes; "
            "choose a multiple of the process count"
        )
    return batch_size // world


def _train_epoch(
    trainer: Trainer,
    data: ImageFolderData,
    processor: ViTImageProcessor,
    settings: Settings,
    options: Options,
    processes: Processes,
    epoch: int,
    share: int,
    rates: np.ndarray,
) -> dict[str, Any]:
    """One epoch of steps on this process's shares of the global batches; its record."""
    per_epoch = len(data.train) // settings.batch_size
    order = epoch_order(len(data.train), settings.seed, epoch)
    first = [b * settings.batch_size + processes.rank * share for b in range(per_epoch)]
    batches = [order[i : i + share] for i in first]
    bar = progress_bar(
        per_epoch * settings.batch_size,
        enabled=False if processes.rank else options.progress,
        unit="img",
        desc=f"epoch {epoch + 1}/{settings.epochs}",
        leave=False,
        dynamic_ncols=True,
    )
    losses = []
    began = time.perf_counter()
    stream = train_batches(
        data.train,
        batches,
        settings.augmentation,
        processor,
        settings.seed,
        epoch,
        options.workers,
    )
    with bar:
        for b, (pixels, labels) in enumerate(stream):
            step = epoch * per_epoch + b
            losses.append(trainer.step(pixels, labels, float(rates[step]), step))
            bar.set_postfix_str(f"loss {losses[-1]:.4f}")
            bar.update(settings.batch_size)
    seconds = time.perf_counter() - began
    return {
        "epoch": epoch + 1,
        "loss": float(np.mean(losses)),
        "seconds": seconds,
        "images_per_second": per_epoch * settings.batch_size / seconds,
    }
