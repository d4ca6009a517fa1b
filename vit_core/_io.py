"""File-system helpers shared by everything that reads or writes a model folder.

Two kinds of write, both all-or-nothing for a reader:

- `atomic_write_bytes` (bytes in memory) and `atomic_path` (a writer that opens the file
  itself): one file, written beside its target and renamed over it; `staged_file` is
  `atomic_path` for a command's new output file (refused if it exists, unless replacing).
- `staged_folder`: a whole folder, written into a hidden temp folder beside the target
  and moved into place by rename. `vit_core.loading.save_folder` (both twins'
  `save_pretrained`) and `python -m conversion` both write through it. A process killed
  at any moment leaves the target as it was (old folder, or nothing) or complete (new
  folder); what it may leave beside the target are hidden `.NAME.*.partial` folders (an
  unfinished write) or, if killed inside the swap itself, `.NAME.old-*` (the previous
  folder, intact): both are safe to delete, and `local_path` points at the second when
  the target is missing.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vit_core.errors import CheckpointError, ConfigError, OutputExistsError, WriteError

MAX_JSON_BYTES = 64 * 2**20  # config files are KB (ImageNet-21k's label map: about 1 MB)


def local_path(path: str | os.PathLike[str]) -> Path:
    """`path` as a `Path` that exists, or an error that says this package never downloads."""
    resolved = Path(path).expanduser()
    if resolved.exists():
        return resolved
    text = str(path)
    try:
        pattern = f".{glob.escape(resolved.name)}.old-*"
        interrupted = sorted(resolved.parent.glob(pattern)) if resolved.name else []
    except OSError:
        interrupted = []
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if interrupted:
        hint = (
            f" A write that was interrupted while swapping folders left the previous version "
            f"intact at {interrupted[-1]}: rename it back (`mv {interrupted[-1]} {resolved}`)."
        )
    elif looks_like_hub_id:
        hint = (
            f" It looks like a model-hub id: this package never downloads. Fetch the files "
            f"yourself (e.g. `huggingface-cli download {text} --local-dir ./{text.split('/')[-1]}`)"
            " and pass the local folder."
        )
    else:
        hint = ""
    raise CheckpointError(f"{text}: no such file or folder.{hint}")


# --------------------------------------------------------------------- one file
@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A hidden temp path beside `path` for a writer that opens the file itself (a
    memory map, a Parquet writer); when the block ends normally it is flushed to disk and
    renamed over `path`, on any error removed. A reader sees the old file or the new one,
    never half, and a process killed in the block leaves at most the hidden temp file. It
    keeps the suffix of `path`, for writers and readers that go by it (`.onnx`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(
                f"{path}: cannot write the file ({exc}); the previous file, if any, is unchanged"
            ) from exc
        raise


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half.

    The new file gets the permissions of an ordinary new file (0o666 less the umask),
    not the owner-only ones of a temp file.
    """
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_file(out: Path, *, replace: bool) -> Iterator[Path]:
    """`atomic_path` for an output file a command creates (`export`): an existing `out` is
    refused unless `replace`, a folder there always (`check_target`); missing parent
    folders are made, and removed again (if still empty) when the block fails."""
    out = Path(os.path.abspath(out))
    check_target(out, replace, kind="file")
    created = _missing_parents(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise WriteError(f"{out}: cannot create its folder ({exc}); nothing was written") from exc
    try:
        with atomic_path(out) as staged:
            yield staged
    except BaseException:
        _remove_empty(created)
        raise


# --------------------------------------------------------------------- JSON in
def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"the key {key!r} appears twice (which one is meant is unclear)")
        out[key] = value
    return out


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON config file's top-level object, or a `ConfigError` that names the file.

    Refused: a missing or unreadable file, one over `MAX_JSON_BYTES`, text that is not
    UTF-8 JSON (or nests too deep to parse), a key given twice in one object, and any
    top-level value other than an object.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ConfigError(
                f"{path}: {size} bytes is too large for a config file (limit {MAX_JSON_BYTES}); "
                "is it the right file?"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a JSON file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8 text: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ConfigError as exc:
        raise ConfigError(f"{path}: not a usable JSON file: {exc}; fix or re-create it") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON (nested too deeply to read)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# ------------------------------------------------------------------ whole folder
def check_target(out: Path, replace: bool, kind: str = "folder") -> None:
    """Refuse an existing `out` (folder, file or link) unless `replace`; `kind` is what
    the caller writes there ("folder" or "file"), and a file never replaces a folder."""
    if (out.exists() or out.is_symlink()) and not replace:
        raise OutputExistsError(
            f"{out}: already exists; choose another output {kind}, or pass --force to replace it"
        )
    if kind == "file" and out.is_dir():
        raise OutputExistsError(f"{out}: is a folder; choose a file name to write")


def _missing_parents(folder: Path) -> list[Path]:
    """Folders that do not exist yet on the way to `folder`, outermost first."""
    missing = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        missing.append(parent)
    return missing[::-1]


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk; best effort where the file system cannot."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link (instant, no extra space) where the file system allows, else a copy."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
    return dst


def _carry_over(old: Path, staging: Path) -> None:
    """Bring every entry of `old` that the new folder does not replace into `staging`."""
    for entry in old.iterdir():
        target = staging / entry.name
        if target.exists() or target.is_symlink():
            continue  # written anew: the new version wins
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def commit_folder(staging: Path, out: Path, replace: bool, keep_other_files: bool = False) -> None:
    """Move the finished `staging` folder to `out`.

    An existing `out` is replaced only with `replace`, and then safely: it is renamed
    aside, the new folder renamed in, and only then is the old one deleted (if the second
    rename fails, the old one is put back). With `keep_other_files`, entries of the old
    folder that the new one does not hold are carried over first (hard links, else
    copies), so replacing a folder loses nothing but the files it rewrites.
    """
    check_target(out, replace)
    # Ordinary permissions for what was written (some writers, safetensors among them,
    # create owner-only files): those of a new file here, as the staging folder's show.
    file_mode = stat.S_IMODE(staging.stat().st_mode) & 0o666
    for file in staging.iterdir():
        if file.is_file() and not file.is_symlink():
            os.chmod(file, file_mode)
            _fsync(file)
    existing = out.exists() or out.is_symlink()
    old = None
    try:
        if existing and keep_other_files and out.is_dir() and not out.is_symlink():
            _carry_over(out, staging)
            os.chmod(staging, stat.S_IMODE(out.stat().st_mode))
        _fsync(staging)
        if existing:
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        try:
            os.rename(staging, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
                old = None
            raise
    except OSError as exc:
        raise WriteError(
            f"{out}: could not move the new folder into place ({exc}); "
            + ("the old folder is unchanged" if existing else "nothing was written")
        ) from exc
    _fsync(out.parent)
    if old is not None:
        _remove(old)


def _make_staging(out: Path) -> Path:
    """A fresh hidden folder beside `out`, with the permissions of an ordinary new folder."""
    for _ in range(100):
        staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            os.mkdir(staging, 0o777)
        except FileExistsError:
            continue
        return staging
    raise FileExistsError(f"no free temp folder name beside {out}")


@contextlib.contextmanager
def staged_folder(out: Path, *, replace: bool, keep_other_files: bool = False) -> Iterator[Path]:
    """A fresh temp folder beside `out` to write into; committed to `out` when the block
    ends normally (`commit_folder`), removed (with any parent folders made for it) on any
    error, `KeyboardInterrupt` included. A process killed inside the block leaves `out`
    untouched."""
    out = Path(os.path.abspath(out))
    check_target(out, replace)
    created = _missing_parents(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = _make_staging(out)
    except OSError as exc:
        _remove_empty(created)
        raise WriteError(
            f"{out}: cannot create a folder beside it to write into ({exc}); nothing was written"
        ) from exc
    try:
        yield staging
        commit_folder(staging, out, replace, keep_other_files)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty


# Why a folder could not be replaced as a whole although it can be written into: its
# parent is not writable (a home folder's parent, a root-owned parent), or it is a mount
# point (a container's output volume), where a rename of the folder itself fails.
IN_PLACE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EBUSY, errno.EXDEV)


def can_write_in_place(error: WriteError, folder: Path) -> bool:
    """Whether `error` from `staged_folder` is one that writing file by file avoids."""
    cause = error.__cause__
    return (
        isinstance(cause, OSError)
        and cause.errno in IN_PLACE_ERRNOS
        and folder.is_dir()
        and os.access(folder, os.W_OK)
    )


@contextlib.contextmanager
def files_in_place(folder: Path) -> Iterator[Path]:
    """The fallback of `staged_folder` for an existing folder that cannot be swapped: the
    files are written into a hidden folder inside `folder`, then each is renamed over its
    old version (each file atomic, the set of files not)."""
    folder = Path(folder)
    staging = _make_staging(folder / ".save")
    try:
        yield staging
        for file in sorted(staging.iterdir()):
            os.chmod(file, stat.S_IMODE(staging.stat().st_mode) & 0o666)
            _fsync(file)
        for file in sorted(staging.iterdir()):
            os.replace(file, folder / file.name)
        _fsync(folder)
    except OSError as exc:
        raise WriteError(f"{folder}: cannot write its files ({exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
