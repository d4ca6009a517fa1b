"""docs/errors.md states what the code does: its tables are checked against the code."""

from __future__ import annotations

from pathlib import Path

import vit_core.errors as errors
from vit_core.checkpoint import DTYPE_POLICY

PAGE = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


def test_every_error_type_is_documented() -> None:
    text = PAGE.read_text()
    for name, value in vars(errors).items():
        if isinstance(value, type) and issubclass(value, errors.ViTError):
            assert f"| `{name}`" in text, name


def test_the_dtype_table_is_the_code_table() -> None:
    text = PAGE.read_text()
    for dtype, action in DTYPE_POLICY.items():
        assert f"| {dtype} | {action} |" in text, dtype


def test_exit_statuses_are_documented() -> None:
    text = PAGE.read_text()
    for row in ("| 0 |", "| 1 |", "| 2 |"):
        assert row in text
    assert "`error: <message>`" in text and "--debug" in text
