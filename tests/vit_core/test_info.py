"""`python -m vit_core info`: a folder described from its header and config alone."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from vit_test_support import tiny_config

from vit_core.info import folder_info
from vit_core.layout import WEIGHTS_NAME, ModelKind, expected_shapes

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "vit_core" / "assets" / "vit-digits"
CONFIG = tiny_config(num_hidden_layers=1, use_class_token=False, pooling_type="mean", num_labels=0)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "vit_core", *args], capture_output=True, text=True, env=env
    )


def test_info_on_the_shipped_model() -> None:
    done = cli("info", str(DIGITS))
    assert done.returncode == 0, done.stderr
    assert "parameters:    103,178" in done.stdout
    assert "width 64, 3 layers, 4 heads, MLP 128, patch 2x2, image 8x8" in done.stdout
    assert "transformers:  yes" in done.stdout
    as_json = json.loads(cli("info", str(DIGITS), "--json").stdout)
    assert as_json["parameters"] == 103178 and len(as_json["config"]["id2label"]) == 10


def test_extension_fields_make_a_folder_incompatible(tmp_path: Path) -> None:
    kind = ModelKind(classifier=False, pooler=True)
    shapes = expected_shapes(CONFIG, kind)
    save_file({k: np.zeros(s, np.float16) for k, s in shapes.items()}, tmp_path / WEIGHTS_NAME)
    CONFIG.save_pretrained(tmp_path)
    info = folder_info(tmp_path)
    assert info["model"] == "ViTModel" and info["pooler"]
    assert info["dtypes"] == {"F16": len(shapes)}
    assert info["departures"] == ["use_class_token=False", "pooling_type='mean'"]
    assert not info["transformers_compatible"]


def test_layout_problems_are_reported_not_raised(tmp_path: Path) -> None:
    shapes = expected_shapes(CONFIG, ModelKind(classifier=False, pooler=False))
    save_file({k: np.zeros(s, np.float32) for k, s in shapes.items()}, tmp_path / WEIGHTS_NAME)
    dataclasses.replace(CONFIG, num_hidden_layers=2).save_pretrained(tmp_path)
    done = cli("info", str(tmp_path))
    assert done.returncode == 0
    assert "missing keys" in done.stdout and "encoder.layer.1" in done.stdout


def test_info_on_a_missing_folder_exits_2() -> None:
    done = cli("info", "/nonexistent/folder")
    assert done.returncode == 2 and "no such file or folder" in done.stderr
    assert "Traceback" not in done.stderr
