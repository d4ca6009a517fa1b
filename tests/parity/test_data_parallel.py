"""Data-parallel fine-tuning takes the steps one process takes: `finetune` run by two
processes on this machine ends where the single-process run of the same command ends
(tests/conftest.py's `finetuned`: 3 epochs of 3 steps of 16 digits).

PyTorch: `torchrun --standalone --nproc_per_node 2 -m vit_core finetune ...` (a gloo
group, DistributedDataParallel; each process takes 8 digits of every batch of 16). JAX:
two processes `python -m vit_core finetune ... --coordinator 127.0.0.1:PORT
--num-processes 2 --process-id I` (`jax.distributed.initialize`: JAX's CPU backend runs
the cross-process all-reduce through gloo), each batch one global array sharded over the
two processes' devices.

Bounds (measured in brackets, torch / JAX): every weight within WEIGHT_ATOL (1.2e-7 /
1.2e-7), the key biases aside (`vit_test_support.KEY_BIAS`: their gradient is rounding
noise, which AdamW scales up to moves of ~lr, and the halves' gradients are summed in
another order than the whole batch's: 2.1e-4 / 4.0e-4); the logits on the validation
digits within LOGIT_ATOL (4.9e-7 / 4.4e-7); each epoch's mean loss within LOSS_RTOL
relative (5.1e-8 / 7.6e-8).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vit_test_support import (
    FINETUNE_ARGS,
    ROOT,
    finetune_differences,
    folder_pixels,
    record_max_diff,
)

WEIGHT_ATOL = 1e-5
LOGIT_ATOL = 1e-5
LOSS_RTOL = 1e-5
TIMEOUT = 300  # seconds per launch; each takes ~30 s on a busy 2-core machine


def _environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
    for name in ("XLA_FLAGS", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _command(digits_folder: Path, out: Path, backend: str) -> list[str]:
    return [
        *("-m", "vit_core", "finetune", "--data", str(digits_folder), "-o", str(out)),
        *FINETUNE_ARGS,
        *("--backend", backend),
    ]


def _assert_same_run(name: str, out: Path, single: Path, backend: str, digits_folder: Path) -> None:
    pixels = folder_pixels(digits_folder / "val", single)
    diffs = finetune_differences(out, single, (backend, backend), pixels)
    for what in ("weights", "logits"):  # absolute, as the table's (loss: relative)
        record_max_diff(f"{name} vs one process: {what}", diffs[what])
    assert diffs["weights"] <= WEIGHT_ATOL, diffs
    assert diffs["logits"] <= LOGIT_ATOL, diffs
    assert diffs["loss"] <= LOSS_RTOL, diffs


@pytest.mark.usefixtures("torch_one_thread")
def test_torchrun_ddp_ends_as_one_process(
    finetuned: Any, digits_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            "--nproc_per_node=2",
            *_command(digits_folder, out, "torch"),
        ],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "torch, DistributedDataParallel over 2 processes (gloo)" in done.stdout
    assert done.stdout.count("epoch 3/3: loss") == 1  # only rank 0 reports
    _assert_same_run("torch DDP, 2 processes", out, finetuned("torch").out, "torch", digits_folder)


def test_jax_processes_end_as_one_process(
    finetuned: Any, digits_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "jax"
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = ("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2")
    processes = [
        subprocess.Popen(
            [sys.executable, *_command(digits_folder, out, "flax"), *flags, "--process-id", str(i)],
            cwd=ROOT,
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT))
    finally:
        for process in processes:
            process.kill()
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stdout + stderr[-4000:]
    assert "flax, 2 cpu devices in 2 processes (jax.distributed)" in outputs[0][0]
    assert "epoch" not in outputs[1][0]  # only process 0 reports
    _assert_same_run("JAX, 2 processes", out, finetuned("flax").out, "flax", digits_folder)
