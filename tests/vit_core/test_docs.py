"""The docs state what the code does: tables are checked against their single source."""

from __future__ import annotations

from pathlib import Path

from vit_core.layout import layout_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_layout_page_holds_the_key_table() -> None:
    assert layout_markdown() in (DOCS / "layout.md").read_text()
