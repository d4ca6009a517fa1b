"""Small file-system helpers shared by everything that reads or writes a model folder."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vit_core.errors import CheckpointError, ConfigError


def local_path(path: str | os.PathLike[str]) -> Path:
    """`path` as a `Path` that exists, or an error that says this package never downloads."""
    resolved = Path(path).expanduser()
    if resolved.exists():
        return resolved
    text = str(path)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    hint = (
        f" It looks like a model-hub id: this package never downloads. Fetch the files "
        f"yourself (e.g. `huggingface-cli download {text} --local-dir ./{text.split('/')[-1]}`) "
        "and pass the local folder."
        if looks_like_hub_id
        else ""
    )
    raise CheckpointError(f"{text}: no such file or folder.{hint}")


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON config file's top-level object, or a `ConfigError` that names the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
