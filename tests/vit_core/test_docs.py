"""The docs state what the code does: tables are checked against their single source."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vit_core.layout import layout_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_layout_page_holds_the_key_table() -> None:
    assert layout_markdown() in (DOCS / "layout.md").read_text()


def test_readme_tables_are_the_generated_ones() -> None:
    """The README's parity and speed tables equal what `make readme` renders from
    docs/parity.json and benchmarks/results/bench.json: nobody typed them."""
    script = DOCS.parent / "scripts" / "readme_tables.py"
    spec = importlib.util.spec_from_file_location("readme_tables", script)
    assert spec is not None and spec.loader is not None
    readme_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_tables)
    readme = (DOCS.parent / "README.md").read_text()
    assert readme_tables.rewrite(readme, readme_tables.sections()) == readme, "run `make readme`"
