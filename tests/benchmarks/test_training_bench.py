"""The training benchmark's arithmetic and report, on made-up runs (nothing here is timed)."""

from __future__ import annotations

from dataclasses import asdict

from benchmarks.run import Ratio
from benchmarks.training import PEERS, RUNS, Row, render


def _row(impl: str, checkpointing: bool, seconds: float, step_mib: float) -> Row:
    row = Row(impl, checkpointing)
    for scale in (0.9, 1.0, 1.1):  # three rounds, in three machine states
        peak = 1000.0 + step_mib * scale
        row.add({"seconds": [seconds * scale], "baseline_mib": 1000.0, "peak_mib": peak})
    return row


def test_a_step_is_the_peak_above_the_baseline_and_its_time_the_median_step() -> None:
    row = Row("ours-torch", False)
    row.add({"seconds": [3.0, 1.0, 2.0], "baseline_mib": 900.0, "peak_mib": 2900.0})
    assert (row.seconds, row.step_mib) == ([2.0], [2000.0])


def test_ratios_say_how_many_times_less_the_row_needs() -> None:
    assert str(Ratio.of([1.0, 2.0], [4.0, 6.0])) == "3.50 (3.00-4.00)"


def test_the_report_pairs_each_row_with_its_own_run_without_and_with_each_peer() -> None:
    rows = [
        _row(
            impl, checkpointing, 13.0 if checkpointing else 10.0, 800.0 if checkpointing else 4000.0
        )
        for impl, checkpointing in RUNS
    ]
    payload = {
        "machine": {"cpu": "cpu", "threads": 2, "torch": "t", "jax": "j"},
        "case": {"model": "B/16", "size": 384, "batch": 8, "fields": {}},
        "params_mib": 330.0,
        "rounds": 3,
        "steps": 2,
        "rows": [asdict(r) for r in rows],
    }
    lines = render(payload).splitlines()
    header = next(line for line in lines if line.startswith("| impl"))
    assert header.count("|") - 1 == 7 + 2 * len(PEERS)
    on = next(line for line in lines if line.startswith("| ours-torch | on |"))
    # 5x less memory than without, 10/13 of its speed; the same as each peer's
    assert on.startswith(
        "| ours-torch | on | 13.00 | 1000 | 800 | 5.00 (5.00-5.00) | 0.77 (0.77-0.77)"
    )
    assert on.endswith("| 1.00 (1.00-1.00) | 1.00 (1.00-1.00) |")
    timm = next(line for line in lines if line.startswith("| timm | off |"))
    assert timm.count("|  |") >= 2  # no ratio to itself, none "without" when off
