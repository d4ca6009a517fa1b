"""The built wheel, installed with only the `[flax]` extra into a fresh venv, runs as a user
would run it: `predict` and `explain` on the shipped model with the Flax backend.

This is the one test that installs from the package index (jax and flax, about a minute
on a cold cache); it proves that the wheel carries the shipped model and that nothing on
the Flax path imports PyTorch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from vit_test_support import SHIPPED

from vit_core.cli import HELDOUT, read_heldout

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_FILES = (
    "vit_core/assets/vit-digits/model.safetensors",
    "vit_core/assets/vit-digits/config.json",
    "vit_core/assets/vit-digits/preprocessor_config.json",
    "vit_core/py.typed",
    "vit_core/timm_names.json",
    "vit_torch/py.typed",
    "vit_flax/py.typed",
    "vit_onnx/py.typed",
)


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", out, ROOT, cwd=out)
    (built,) = out.glob("vit_twin-*.whl")
    return built


def test_wheel_carries_the_shipped_model_and_type_markers(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in SHIPPED_FILES if name not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]


def test_flax_only_install_predicts_and_explains(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(
        python, "-m", "pip", "install", "--quiet", "--constraint", ROOT / "constraints.txt",
        f"{wheel}[flax]", cwd=tmp_path,
    )  # fmt: skip
    # outside the checkout, with a clean environment: only the installed wheel is importable
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MPLBACKEND"] = "Agg"
    probe = "import importlib.util as u, vit_core; print(u.find_spec('torch'), vit_core.__file__)"
    torch_spec, location = _run(python, "-c", probe, cwd=tmp_path, env=env).split()
    assert torch_spec == "None", "the [flax] extra installed torch"
    assert Path(location).is_relative_to(venv), location

    images, labels = read_heldout(SHIPPED.parent / HELDOUT)
    pngs = [f"{index}.png" for index in range(3)]
    for image, png in zip(images, pngs, strict=False):  # held-out 8x8 digits, as PNG files
        Image.fromarray(image).save(tmp_path / png)

    cli = (python, "-m", "vit_core")
    _run(*cli, "predict", *pngs, "--backend", "flax", "-o", "top.json", cwd=tmp_path, env=env)
    rows = json.loads((tmp_path / "top.json").read_text())
    assert [row["path"] for row in rows] == pngs
    top = [row["top_k"][0]["label"] for row in rows]
    assert top == [str(label) for label in labels[:3]], rows

    _run(*cli, "explain", "0.png", "--backend", "flax", "-o", "map.png", cwd=tmp_path, env=env)
    with Image.open(tmp_path / "map.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 100
