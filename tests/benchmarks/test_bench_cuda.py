"""`benchmarks/run.py --device cuda`: its report on made-up timings, and its refusal on a
machine without a GPU (nothing here is timed)."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from benchmarks.run import CUDA_CASE, Result, main, render_cuda


def _row(impl: str, seconds: list[float]) -> dict[str, object]:
    case = CUDA_CASE
    return asdict(Result(case.model, impl, case.batch, seconds, None, 35.0, case.size))


def test_the_cuda_report_states_its_conditions_and_ratios() -> None:
    payload = {
        "machine": {"gpu": "NVIDIA H200", "torch": "t", "jax": "j"},
        "matmul_gflops": [700_000.0, 720_000.0],
        "results": [_row("ours-torch", [0.010, 0.010]), _row("timm", [0.011, 0.012])],
    }
    report = render_cuda(payload)
    assert report.startswith("NVIDIA H200, torch t, jax j; bfloat16 matmul peak 720 TFLOP/s")
    assert "the pixels on the GPU before the rounds, every call synchronised" in report
    ours = next(line for line in report.splitlines() if "| ours-torch |" in line)
    assert "| B/16 | 224 | 64 | ours-torch | 6400.00 |" in ours
    assert ours.endswith("| ahead of timm: 1.15 (1.10-1.20) |")


def test_without_a_gpu_the_cuda_run_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--device", "cuda"]) == 2
    assert "torch sees no CUDA GPU here" in capsys.readouterr().err
