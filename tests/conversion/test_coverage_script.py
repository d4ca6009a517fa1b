"""scripts/coverage.py (`make coverage`) on a few tags, so the report cannot rot between
its runs: a small tag converts and matches timm, a refused one records why, and the
README renders from a report."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def coverage() -> Any:
    spec = importlib.util.spec_from_file_location(
        "coverage_script", ROOT / "scripts" / "coverage.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_small_tag_converts_and_matches_timm(coverage: Any) -> None:
    row = coverage.check("test_vit2.r160_in1k", ("torch", "flax"))
    assert row["status"] == "converted", row
    assert row["family"] == "other" and row["depth"] == 2
    assert set(row["outputs"]["torch"]) == {"last_hidden_state", "embedding", "logits"}
    assert max(row["torch"], row["flax"]) <= coverage.BOUND


def test_a_refused_tag_records_the_reason_and_what_its_keys_alone_do(coverage: Any) -> None:
    row = coverage.check("vit_base_patch16_rpn_224.sw_in1k", ("torch",))
    assert row["status"] == "refused"
    assert coverage.reason(row).startswith("post-norm residual blocks")
    assert row["unnamed"].startswith("refused: ")


def test_tags_of_one_model_share_a_row(coverage: Any) -> None:
    first = "vit_base_patch16_224.augreg_in21k_ft_in1k"
    second = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert coverage.same_model(first) == coverage.same_model(second)
    assert coverage.same_model(first) != coverage.same_model("vit_base_patch16_224.augreg_in21k")
    row = coverage.reuse({"tag": first, "family": "plain", "status": "converted"}, second)
    assert (row["tag"], row["same_as"]) == (second, first)


def test_the_readme_table_renders_from_a_report(coverage: Any) -> None:
    rows = [
        {"tag": "a.x", "family": "CLIP", "status": "converted", "torch": 1e-6, "flax": 2e-6},
        {"tag": "b.x", "family": "CLIP", "status": "mismatch", "torch": None, "flax": 1.0},
        {
            "tag": "c.x",
            "family": "other",
            "status": "refused",
            "message": "c.x: X is not supported",
        },
    ]
    report = {"rows": rows, "bound": 1e-4, "timm_version": "1.0", "depth": "2 blocks"}
    text = coverage.render(report)
    assert "| CLIP | 2 | 1 | 0 | 1 | inf | 1.0e+00 | b.x |" in text
    assert "| other | 1 | 0 | 1 | 0 | - | - | - |" in text
    assert "1 of 3 pretrained timm 1.0 tags (33%)" in text and "- X: 1" in text
