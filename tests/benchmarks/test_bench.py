"""The benchmark's arithmetic and report, on made-up timings (nothing here is timed)."""

from __future__ import annotations

import pytest

from benchmarks.run import Ratio, Result, config_for, gflop_per_image, render, table, verdict


def _result(impl: str, seconds: list[float], batch: int = 8) -> Result:
    return Result("B/16", impl, batch, seconds, None, 35.0)


def test_a_ratio_is_the_median_of_the_per_round_ratios_with_their_range() -> None:
    ours = _result("ours-torch", [1.0, 2.0, 1.0])
    timm = _result("timm", [1.1, 2.0, 0.9])  # the slow second round cancels in the pair
    ratio = Ratio.paired(ours, timm)
    assert (ratio.median, ratio.low, ratio.high) == (1.0, 0.9, 1.1)
    assert ratio.within_noise
    assert str(ratio) == "1.00 (0.90-1.10)"
    assert not Ratio.paired(ours, _result("timm", [1.2, 2.5, 1.1])).within_noise


def test_the_verdict_is_against_the_fastest_eager_peer() -> None:
    ours = _result("ours-torch", [1.0, 1.0, 1.0])
    same = {
        "ours-torch": ours,
        "timm": _result("timm", [1.2, 1.3, 1.25]),
        "hf-torch": _result("hf-torch", [1.5, 1.5, 1.5]),
    }
    assert verdict(ours, same) == "ahead of timm: 1.25 (1.20-1.30)"
    assert verdict(same["timm"], same) == ""  # peers get none
    same["timm"] = _result("timm", [0.9, 0.95, 1.05])
    assert verdict(ours, same).startswith("within noise of timm")


def test_the_table_gives_every_row_its_ratio_to_each_peer_present() -> None:
    rows = [_result("ours-torch", [1.0, 1.0]), _result("timm", [2.0, 2.0])]
    lines = table(rows, peak=100.0).splitlines()
    row = "| B/16 | 224 | 8 | ours-torch | 8.00 | 1000.0 |  | 280 % | 2.00 (2.00-2.00) |"
    assert row in lines[2]
    assert lines[2].endswith("| ahead of timm: 2.00 (2.00-2.00) |")


def test_flop_count_of_vit_b16_is_the_published_one() -> None:
    # 17.56 GMACs (timm / fvcore) for ViT-B/16 at 224
    assert gflop_per_image(config_for("B/16", 224)) == pytest.approx(35.1, rel=0.01)


def test_the_report_names_the_sgemm_rate_before_and_after() -> None:
    payload = {
        "machine": {"cpu": "cpu", "threads": 2, "torch": "t", "jax": "j"},
        "matmul_gflops": [140.0, 150.0],
        "results": [vars(_result("ours-torch", [1.0, 1.0]))],
    }
    assert "150.0 GFLOP/s (sgemm in the same process: 140.0 before" in render(payload)
