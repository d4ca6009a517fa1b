"""`python -m vit_core` as a user runs it (subprocesses), and the shipped digits model in-process.

The subprocess tests check what only a real run shows: exit codes, that package errors
end as one line without a traceback, and that `make run` (`demo`) passes. The in-process
test is the cheap guard that the shipped files load and still score >= 95 % in both twins.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_core import ImageError, load
from vit_core.backend import get_backend
from vit_core.cli import (
    BACKENDS,
    HELDOUT,
    MIN_ACCURACY,
    SHIPPED_MODEL,
    asset,
    main,
    open_image,
    processor_for,
    read_heldout,
)

ROOT = Path(__file__).resolve().parents[2]
# Held-out digits written as PNGs for `predict`; their labels differ, so a stuck model fails.
PREDICT_INDICES = (0, 2)


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m vit_core ARGS` from the repository root, importable without an install."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "vit_core", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    with asset(HELDOUT) as path:
        return read_heldout(path)


@pytest.fixture(scope="module")
def digit_pngs(
    heldout: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> dict[Path, str]:
    """8x8 held-out digits scaled up to 32x32 PNGs, so `predict` has to resize them back."""
    images, labels = heldout
    folder = tmp_path_factory.mktemp("digits")
    files = {}
    for index in PREDICT_INDICES:
        path = folder / f"digit{index}.png"
        Image.fromarray(images[index]).resize((32, 32), Image.Resampling.NEAREST).save(path)
        files[path] = str(labels[index])
    return files


def test_demo_passes_with_both_backends_agreeing() -> None:
    result = run_cli("demo")
    assert result.returncode == 0, result.stdout + result.stderr
    accuracies = dict(re.findall(r"^(torch|flax) accuracy:\s+([\d.]+) %", result.stdout, re.M))
    assert set(accuracies) == set(BACKENDS), result.stdout
    assert all(float(a) >= 100 * MIN_ACCURACY for a in accuracies.values()), accuracies
    assert re.search(r"differ between backends: 0\b", result.stdout), result.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_resizes_and_ranks_the_true_label_first(
    backend: str, digit_pngs: dict[Path, str]
) -> None:
    result = run_cli("predict", *digit_pngs, "--backend", backend, "--top-k", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    for path, label in digit_pngs.items():
        match = re.search(
            rf"^{re.escape(str(path))}:\n\s+1\.\s+[\d.]+ %\s+(\S+)$", result.stdout, re.M
        )
        assert match, result.stdout
        assert match[1] == label, f"{path.name}: predicted {match[1]}, true {label}"
    assert result.stdout.count(" %  ") == 3 * len(digit_pngs)  # --top-k 3 lines per image


def test_predict_in_int8_ranks_the_true_label_first(digit_pngs: dict[Path, str]) -> None:
    result = run_cli("predict", *digit_pngs, "--quantize", "int8", "--top-k", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    tops = re.findall(r"^\s+1\.\s+[\d.]+ %\s+(\S+)$", result.stdout, re.M)
    assert tops == list(digit_pngs.values()), result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("predict", "{png}", "--quantize", "int8", "--backend", "flax"), "runs on the torch"),
        (("predict", "no-such-image.png"), "no-such-image.png: no such image file"),
        (("predict", "Makefile"), "not an image format"),
        (("predict", "{png}", "--model", "no-such-model"), "no-such-model: no such file or folder"),
    ],
    ids=["int8-on-flax", "missing-image", "not-an-image", "missing-model"],
)
def test_errors_exit_2_with_one_line_and_no_traceback(
    args: tuple[str, ...], message: str, digit_pngs: dict[Path, str]
) -> None:
    png = next(iter(digit_pngs))
    result = run_cli(*(a.format(png=png) for a in args))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_debug_shows_the_traceback() -> None:
    result = run_cli("predict", "no-such-image.png", "--debug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ImageError" in result.stderr


@pytest.mark.parametrize(
    "command", ["demo", "predict", "embed", "explain", "info", "export", "finetune"]
)
def test_every_help_shows_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"example:\n  python -m vit_core {command}" in capsys.readouterr().out


@pytest.mark.usefixtures("torch_one_thread")
def test_shipped_model_scores_at_least_95_percent_in_both_backends(
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    images, labels = heldout
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8) and labels.dtype == np.int64
    with asset(SHIPPED_MODEL) as folder:
        assert (folder / "model.safetensors").stat().st_size < 1_000_000
        models = {backend: load(folder, backend=backend) for backend in BACKENDS}
        pixels = processor_for(folder, models["torch"].config)(list(images))["pixel_values"]
    assert pixels.shape == (len(labels), 3, 8, 8)
    logits = {b: get_backend(b).run(m, pixels)["logits"] for b, m in models.items()}
    for backend, values in logits.items():
        accuracy = float((values.argmax(axis=-1) == labels).mean())
        assert accuracy >= MIN_ACCURACY, f"{backend}: {accuracy:.2%}"
    np.testing.assert_allclose(logits["torch"], logits["flax"], rtol=0, atol=1e-5)


def test_open_image_applies_exif_orientation(tmp_path: Path) -> None:
    image = Image.new("RGB", (16, 8), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "sideways.jpg", exif=exif)
    assert open_image(tmp_path / "sideways.jpg").size == (8, 16)


def test_open_image_refuses_decompression_bombs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("L", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2 * 1000
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(tmp_path / "big.png")
