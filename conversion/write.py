"""The atomic folder write: everything goes into a temp folder beside OUT, then one rename.

The implementation is `vit_core._io.staged_folder`, the one `save_pretrained` uses too.
A reader of OUT sees the old folder or the whole new one, never a half-written one; an
error at any point (including a failed `--verify`, which runs on the staged folder)
removes the temp folder and leaves OUT as it was, and so does a process killed mid-write.
An existing OUT is replaced only with `force`, and then as a whole (files of the old OUT
are not kept): the old folder is renamed aside, the new one renamed in, and only then is
the old one deleted (if the swap fails, the old one is put back).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np

from vit_core._io import staged_folder
from vit_core.errors import OutputExistsError, WriteError
from vit_core.layout import WEIGHTS_NAME

__all__ = ["OutputExistsError", "staged", "write_files"]


def staged(out: Path, force: bool) -> AbstractContextManager[Path]:
    """A fresh temp folder beside `out` to write into; committed to `out` on success,
    removed (with any parent folders made for it) on any error. In the CLI's words
    (`force`) what `staged_folder` calls `replace`."""
    return staged_folder(Path(out), replace=force)


def write_files(
    folder: Path,
    tensors: Mapping[str, np.ndarray],
    config: object,
    processor: object,
    metadata: Mapping[str, str],
) -> Path:
    """model.safetensors (+ header metadata), config.json, preprocessor_config.json.

    Non-finite weights are refused first (`vit_core.checkpoint.check_finite`): the folder
    would not load.
    """
    from safetensors.numpy import save_file

    from vit_core.checkpoint import check_finite

    check_finite(tensors, "the converted weights")
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    try:
        save_file(arrays, folder / WEIGHTS_NAME, metadata=dict(metadata))
    except OSError as exc:
        raise WriteError(f"{folder / WEIGHTS_NAME}: cannot write the weights ({exc})") from exc
    config.save_pretrained(folder)  # type: ignore[attr-defined]
    processor.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder / WEIGHTS_NAME
