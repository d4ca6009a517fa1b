"""The one progress bar: tqdm where it is installed and wanted, else a silent stand-in.

Progress is a nicety, not a dependency: without tqdm every run is the same, without the
bar. Both the conversion (`python -m conversion`) and `python -m vit_core predict` use it.
"""

from __future__ import annotations

import sys
from typing import Any


class NoBar:
    """Stands in for a tqdm bar: the same calls, showing nothing (`write` still prints)."""

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def update(self, count: float = 1) -> None:
        return None

    def set_description(self, text: str) -> None:
        return None

    def set_postfix_str(self, text: str) -> None:
        return None

    def close(self) -> None:
        return None

    @staticmethod
    def write(text: str, file: Any = None) -> None:
        print(text, file=file or sys.stdout)


def progress_bar(total: float, *, enabled: bool | None = None, **options: Any) -> Any:
    """A tqdm bar over `total` (on stderr; `options` go to tqdm: unit, desc, leave...).

    `enabled`: True shows it, False never (the stand-in), None only when stderr is a
    terminal (tqdm's `disable=None`).
    """
    if enabled is False:
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return NoBar()
    return tqdm(total=total, disable=None if enabled is None else False, **options)
