"""`python -m vit_core export` end to end (`vit_core.export`): both formats, the printed
report, `--image-size` and the configs the file carries, an existing output refused
without `--force` and left as it was, a verification failure that writes nothing, bad
arguments, and a missing framework's install message. (Round trips of every family, and
other batch sizes from one file, are each format's own tests: tests/vit_flax,
tests/vit_onnx.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vit_test_support import FAMILIES, tiny_config, write_folder

import vit_core
from vit_core.backend import REGISTRY
from vit_core.cli import main
from vit_core.export import TOLERANCE, ExportVerificationError, export_model
from vit_core.layout import MIM_KIND
from vit_flax.export import read_stablehlo

HAS_ONNX = "onnx" in REGISTRY and all(
    importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime", "onnxscript")
)
FORMATS = [
    "stablehlo",
    pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="needs vit-twin[onnx]")),
]
TWINS = {"stablehlo": "flax", "onnx": "torch"}


def onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    return {entry.key: entry.value for entry in onnx.load(path).metadata_props}


METADATA: dict[str, Callable[[Path], dict[str, str]]] = {
    "stablehlo": lambda path: read_stablehlo(path).metadata,
    "onnx": onnx_metadata,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A distilled classifier with registers: three outputs, prefix tokens with positions."""
    path = tmp_path_factory.mktemp("model")
    fields, kind = FAMILIES["deit-distilled"]
    write_folder(path, tiny_config(**fields, num_register_tokens=2), kind, seed=3)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_command_refuses_an_existing_output_then_replaces_it_with_force(
    folder: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"model.{fmt}"
    out.write_bytes(b"precious")
    args = ["export", str(folder), "--format", fmt, "-o", str(out), "--image-size", "12x16"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: {out}: already exists; choose another output file, or pass --force to replace it\n"
    )
    assert out.read_bytes() == b"precious"
    assert main([*args, "--force"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} (") and "12x16 pixels" in printed
    assert f"verified against the {TWINS[fmt]} twin on 2 seeded probe images" in printed
    differences = printed.split("max abs difference ")[1].split(", ")
    assert [d.split()[0] for d in differences] == ["logits", "cls_logits", "distillation_logits"]
    assert all(float(d.split()[1]) <= TOLERANCE for d in differences)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no staging file left
    # It runs on its own: its config describes the exported (resampled) model, and its
    # processor makes the pixels it takes.
    metadata = METADATA[fmt](out)
    config = json.loads(metadata["config.json"])
    assert config["image_size"] == [12, 16] and config["num_register_tokens"] == 2
    processor = json.loads(metadata["preprocessor_config.json"])
    assert processor["size"] == {"height": 12, "width": 16}


def test_a_folder_in_the_way_is_refused_even_with_force(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "model.stablehlo").mkdir()
    with pytest.raises(vit_core.ViTError, match="is a folder; choose a file name"):
        export_model(folder, "stablehlo", tmp_path / "model.stablehlo", force=True)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replacing"])
def test_a_file_that_fails_verification_is_never_written(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    import vit_flax.export

    real = vit_flax.export.run_stablehlo

    def perturbed(path: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The staged file's outputs, one of them moved just past the bound."""
        outputs = real(path, pixels)
        outputs["cls_logits"] = outputs["cls_logits"] + 3e-5
        return outputs

    monkeypatch.setattr(vit_flax.export, "run_stablehlo", perturbed)
    out = tmp_path / "new" / "model.stablehlo"  # its folder too is made only on success
    if existing:
        out.parent.mkdir()
        out.write_bytes(b"the old export")
    with pytest.raises(ExportVerificationError, match=r"differs in cls_logits by 3\.\d+e-05"):
        export_model(folder, "stablehlo", out, force=True)
    if existing:
        assert out.read_bytes() == b"the old export" and len(list(out.parent.iterdir())) == 1
    else:
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "stablehlo", "--opset", "18"], "the stablehlo format has none"),
        (["--format", "tflite"], "invalid choice: 'tflite'"),
        (["--format", "stablehlo", "--image-size", "12x"], "must be N or HxW in pixels"),
        (["--format", "stablehlo", "--image-size", "10"], "is not a multiple of patch_size"),
    ],
)
def test_bad_arguments_are_one_clear_line(
    folder: Path, tmp_path: Path, args: list[str], message: str, capsys: Any
) -> None:
    try:
        status = main(["export", str(folder), "-o", str(tmp_path / "x.stablehlo"), *args])
    except SystemExit as exit_info:  # argparse's own refusals
        status = int(exit_info.code or 0)
    assert status == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("fmt", "name"), [("onnx", "model"), ("stablehlo", "model.zip")])
def test_a_name_without_the_format_suffix_is_refused_first(
    folder: Path, tmp_path: Path, fmt: str, name: str
) -> None:
    with pytest.raises(vit_core.InputError, match=rf"{name}: an exported {fmt} file's name ends"):
        export_model(folder, fmt, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_a_masked_image_modeling_model_is_refused(tmp_path: Path) -> None:
    mim = tmp_path / "mim"
    mim.mkdir()
    write_folder(mim, tiny_config(encoder_stride=4), MIM_KIND, seed=0)
    with pytest.raises(vit_core.InputError, match="masked-image-modeling model"):
        export_model(mim, "stablehlo", tmp_path / "mim.stablehlo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mim"]


def test_a_missing_framework_names_the_extra_to_install(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.delitem(sys.modules, "vit_flax.backend")
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` fails as if not installed
    out = tmp_path / "x.stablehlo"
    status = main(["export", str(folder), "--format", "stablehlo", "-o", str(out)])
    assert status == 2
    assert "install it with `pip install 'vit-twin[flax]'`" in capsys.readouterr().err
