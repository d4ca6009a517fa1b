"""Names from the local Hugging Face cache: a repo id read as a folder, offline.

`vit_core.load`, both twins' `from_pretrained`, every `--model` and `python -m
conversion` take a Hugging Face repo id (`google/vit-base-patch16-224`, `timm/vit_base_
patch16_224.augreg2_in21k_ft_in1k`) where they take a folder. It is looked up with
huggingface_hub (`snapshot_download(..., local_files_only=True)`, with huggingface_hub's
own offline switch on for the call), so nothing is ever downloaded and no connection is
attempted: the cache is the one transformers and timm download into, the folder
huggingface_hub reads from HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub,
when it is first imported (as transformers reads it). `revision` is a branch, a tag or a
full commit hash, as the cache's `refs/` and `snapshots/` hold them.

A local path wins over a repo id of the same spelling, as in transformers. A path that
exists nowhere and is not spelled `namespace/name` keeps `local_path`'s error.

What the cached snapshot holds decides what happens to it:

- transformers' ViT (`config.json` with model_type "vit", `model.safetensors`): this
  package's canonical layout, read as it is, as any local folder;
- anything else `python -m conversion` reads (another transformers family: DINOv2, CLIP,
  SigLIP, DeiT, ViT-MAE; `pytorch_model.bin`, sharded or Flax weights; a timm repo, with
  timm's `config.json` or, as `timm.create_model` caches it, the weights alone, its
  architecture then taken from the repo's name): converted in memory by the same readers
  (`conversion.convert.canonical`), nothing written into the cache. The core reaches the
  converter as it reaches the twins (`vit_core.backend.REGISTRY`), by module name, only
  when a repo needs it: conversion is built on the core, the core never imports it.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from vit_core._io import read_json_object
from vit_core.checkpoint import check_finite, read_tensors, resolve_files
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.errors import CheckpointError, ConfigError, NotCachedError
from vit_core.layout import WEIGHTS_NAME

if TYPE_CHECKING:
    from vit_core.processing import ViTImageProcessor

# The module holding `canonical(src, model_name=...)`, imported only for a repo that is not
# canonical already (see the module docstring).
CONVERTER = "conversion.convert"
# A repo id as the Hub spells one: namespace/name, each starting with a letter or digit.
# huggingface_hub validates the rest (length, "--", ".."); this only tells an id from a
# path: "./models/x", "/abs/x", "~/x" and "x/y/z" are paths.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# The weights of a snapshot without config.json (timm's downloads), in timm's order.
BARE_WEIGHTS = (WEIGHTS_NAME, "pytorch_model.bin")
TIMM_NAMESPACE = "timm"


def is_repo_id(text: str) -> bool:
    """Whether `text` is spelled as a Hugging Face repo id (`namespace/name`)."""
    return _REPO_ID.fullmatch(text) is not None


@dataclass(frozen=True)
class Snapshot:
    """One revision of a repo in the local cache: `folder` is `snapshots/<commit>`."""

    repo_id: str
    commit: str
    folder: Path

    @property
    def label(self) -> str:
        """`repo_id@commit`: which model, pinned (what `embed` records to resume by)."""
        return f"{self.repo_id}@{self.commit}"

    def is_canonical(self) -> bool:
        """Whether the snapshot is transformers' ViT layout, which is this package's: a
        config.json with model_type "vit" beside model.safetensors, read as it is."""
        config = self.folder / CONFIG_NAME
        if not (config.is_file() and (self.folder / WEIGHTS_NAME).is_file()):
            return False
        return read_json_object(config).get("model_type") == "vit"

    def conversion_source(self) -> tuple[Path, str | None]:
        """(what conversion reads, a model name for what the files do not say).

        The folder, when it holds a config.json (transformers' or timm's). Else its
        weights file: `timm.create_model(..., pretrained=True)` caches a `timm/` repo's
        weights alone, and that repo's name is the timm model name that describes them.
        """
        if (self.folder / CONFIG_NAME).is_file():
            return self.folder, None
        weights = next((self.folder / n for n in BARE_WEIGHTS if (self.folder / n).is_file()), None)
        if weights is None:
            found = ", ".join(sorted(p.name for p in self.folder.iterdir())) or "nothing"
            raise CheckpointError(
                f"{self.label}: the cached snapshot {self.folder} has no {CONFIG_NAME} and no "
                f"weights ({' or '.join(BARE_WEIGHTS)}; found: {found}): the download is "
                f"incomplete; fetch it again with `hf download {self.repo_id} --revision "
                f"{self.commit}` on a machine with network"
            )
        namespace, name = self.repo_id.split("/")
        return weights, name if namespace == TIMM_NAMESPACE else None


def find_snapshot(path: str | os.PathLike[str], revision: str | None = None) -> Snapshot | None:
    """The cached snapshot `path` names, when it is a repo id and not a local path.

    None for a path that exists (then `revision` must be None: a `ConfigError`) and for a
    missing path not spelled as a repo id (the caller's `local_path` names it). A repo id
    that is not cached (at `revision`) is a `NotCachedError` naming the folder looked in.
    """
    text = os.fspath(path)
    if Path(text).expanduser().exists():
        if revision is not None:
            raise ConfigError(
                f"{text}: a local path; revision={revision!r} applies to a Hugging Face repo "
                "id only (a local folder has one version: leave revision out)"
            )
        return None
    if not is_repo_id(text):
        return None
    return snapshot(text, revision)


def snapshot(repo_id: str, revision: str | None = None) -> Snapshot:
    """`repo_id` at `revision` (default: main) from the local cache; never downloads."""
    hub = _huggingface_hub(repo_id)
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError

    if revision is not None and (not isinstance(revision, str) or not revision):
        raise ConfigError(f"revision must be a branch, tag or commit hash; got {revision!r}")
    cache = Path(hub.constants.HF_HUB_CACHE)
    try:
        # local_files_only: the look-up never leaves the disk (the tests block sockets)
        folder = hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, local_files_only=True
        )
    except HFValidationError as exc:
        raise ConfigError(f"{repo_id}: not a valid Hugging Face repo id ({exc})") from None
    except LocalEntryNotFoundError:
        raise NotCachedError(_not_cached(hub, repo_id, revision, cache)) from None
    folder = Path(folder)
    return Snapshot(repo_id, folder.name, folder)


def identity(path: str | os.PathLike[str], revision: str | None = None) -> str:
    """What `path` names, stably: `repo_id@commit` for a cached repo, else the absolute
    path (`embed` records it, so that `--resume` continues with the same model)."""
    found = find_snapshot(path, revision)
    return found.label if found is not None else str(Path(path).expanduser().resolve())


# --------------------------------------------------------------------- sources
@dataclass(frozen=True, eq=False)
class ModelSource:
    """A model's config and the place its tensors come from, opened but not yet read.

    `folder` holds the files (a local folder, a cached snapshot); `weights` is the file
    errors name. A snapshot that needed conversion carries its canonical `tensors`, the
    source's `preprocessor` and the conversion's `notes` (what it assumed).
    """

    folder: Path
    weights: Path
    config: ViTConfig
    snapshot: Snapshot | None = None
    tensors: Mapping[str, np.ndarray] | None = None
    preprocessor: ViTImageProcessor | None = None
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """`repo_id@commit` for a cached repo, else the weights file: for messages."""
        return self.snapshot.label if self.snapshot is not None else str(self.weights)

    def read_tensors(self) -> dict[str, np.ndarray]:
        """The canonical tensors, checked: the file's (`checkpoint.read_tensors`), or the
        conversion's (checked for NaN and infinity as a file is)."""
        if self.tensors is None:
            return read_tensors(self.weights)
        check_finite(self.tensors, f"{self.label} ({self.weights})")
        return dict(self.tensors)

    def processor(self) -> ViTImageProcessor:
        """The image processor for this model: the folder's preprocessor_config.json, the
        converted source's preprocessing, or the default at the model's input size."""
        from vit_core.processing import processor_for

        return self.preprocessor or processor_for(self.folder, self.config)


def open_source(
    path: str | os.PathLike[str] | ModelSource, revision: str | None = None
) -> ModelSource:
    """The `ModelSource` of a folder, a `.safetensors` file or a cached repo id.

    Local paths are read as `vit_core.load` always read them (canonical, or an error with
    the conversion command); a cached repo that is not canonical is converted in memory
    here, once (hand the result to `load` and take its `processor()` from it).
    """
    if isinstance(path, ModelSource):
        if revision is not None:
            raise ConfigError(f"{path.label}: opened already; revision= applies to a repo id")
        return path
    found = find_snapshot(path, revision)
    if found is not None and not found.is_canonical():
        return _converted(found)
    weights, config_file = resolve_files(found.folder if found is not None else os.fspath(path))
    return ModelSource(weights.parent, weights, ViTConfig.from_json_file(config_file), found)


def _converted(found: Snapshot) -> ModelSource:
    """A cached repo in another layout, read by conversion's readers into memory."""
    try:
        converter = importlib.import_module(CONVERTER)
    except ModuleNotFoundError as exc:
        if exc.name not in (CONVERTER, CONVERTER.split(".")[0]):
            raise  # the converter is there, one of its own imports is not: say that one
        raise CheckpointError(
            f"{found.label}: the cached snapshot {found.folder} is not in the canonical layout "
            f"and the converter ({CONVERTER}) is not installed; reinstall vit-twin"
        ) from None
    source, name = found.conversion_source()
    result = converter.canonical(source, model_name=name)
    return ModelSource(
        folder=found.folder,
        weights=result.reader.weight_files(source)[0],
        config=result.config,
        snapshot=found,
        tensors=result.tensors,
        preprocessor=result.processor,
        notes=tuple(result.assumed),
    )


# ------------------------------------------------------------- huggingface_hub
def _huggingface_hub(repo_id: str) -> ModuleType:
    """huggingface_hub, imported now; without it, an error that says both readings."""
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: no such file or folder, and huggingface_hub, which reads repo ids from "
            "the local Hugging Face cache, is not installed (`pip install 'vit-twin[hub]'`); "
            "this package never downloads: pass a local folder"
        ) from None
    return huggingface_hub


def _not_cached(hub: ModuleType, repo_id: str, revision: str | None, cache: Path) -> str:
    """Where the repo was looked for, which revisions the cache holds, and how to fill it."""
    from huggingface_hub.file_download import repo_folder_name

    folder = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    how = (
        f"this package never downloads: on a machine with network run `{fetch}`, and copy "
        "the cache here or point HF_HUB_CACHE (or HF_HOME) at a cache that holds it; or "
        "pass a local folder"
    )
    cached = _cached_revisions(hub, repo_id, cache)
    # a relative path spelled like a repo id ("checkpoints/vit-b") may be a typo of a folder
    local = f"no local folder {Path(repo_id).absolute()}, and "
    if not cached:
        return f"{repo_id}: {local}not in the local Hugging Face cache (looked in {folder}); {how}"
    return (
        f"{repo_id}: {local}revision {revision or 'main'!r} is not in the local Hugging Face "
        f"cache ({folder} holds {', '.join(cached)}); {how}"
    )


def _cached_revisions(hub: ModuleType, repo_id: str, cache: Path) -> list[str]:
    """`refs -> commit` for each cached revision of `repo_id`, by huggingface_hub's scan."""
    try:
        info = hub.scan_cache_dir(cache)
    except (hub.CacheNotFound, OSError, ValueError):
        return []
    revisions: list[Any] = [
        revision
        for repo in info.repos
        if repo.repo_id == repo_id and repo.repo_type == "model"
        for revision in repo.revisions
    ]
    return sorted(f"{'/'.join(sorted(r.refs)) or '(no ref)'} -> {r.commit_hash}" for r in revisions)
