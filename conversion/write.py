"""The atomic folder write: everything goes into a temp folder beside OUT, then one rename.

A reader of OUT sees the old folder or the whole new one, never a half-written one; an
error at any point (including a failed `--verify`, which runs on the staged folder)
removes the temp folder and leaves OUT as it was. An existing OUT is replaced only with
`force`, and then safely: the old folder is renamed aside, the new one renamed in, and
only then is the old one deleted (if the swap fails, the old one is put back).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from vit_core.config import ViTConfig
from vit_core.errors import ViTError
from vit_core.layout import WEIGHTS_NAME


class OutputExistsError(ViTError):
    """OUT exists and replacing it was not asked for."""


def check_target(out: Path, force: bool) -> None:
    """Refuse an existing OUT (folder, file or link) unless `force`."""
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(
            f"{out}: already exists; choose another output folder, or pass --force to replace it"
        )


def _missing_parents(folder: Path) -> list[Path]:
    """Folders that do not exist yet on the way to `folder`, outermost first."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    return missing[::-1]


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # some file systems cannot open folders; durability is best effort there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def commit(staging: Path, out: Path, force: bool) -> None:
    """Move the finished `staging` folder to `out` (replacing it only with `force`)."""
    check_target(out, force)
    for file in staging.iterdir():
        _fsync(file)
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync(out.parent)
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """A fresh temp folder beside `out` to write into; committed to `out` on success,
    removed (with any parent folders made for it) on any error."""
    out = Path(out)
    check_target(out, force)
    created = _missing_parents(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        commit(staging, out, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


def write_files(
    folder: Path,
    tensors: Mapping[str, np.ndarray],
    config: ViTConfig,
    processor: object,
    metadata: Mapping[str, str],
) -> Path:
    """model.safetensors (+ header metadata), config.json, preprocessor_config.json."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    save_file(arrays, folder / WEIGHTS_NAME, metadata=dict(metadata))
    config.save_pretrained(folder)
    processor.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder / WEIGHTS_NAME
