"""The command lines on hostile input: one `error: ...` line, exit status 2, no traceback;
`--debug` shows the traceback instead. (Exit statuses: docs/errors.md.)"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conversion import cli as conversion_cli
from vit_core import cli as vit_cli
from vit_core.errors import CheckpointError, ImageError, ViTError, WriteError

ROOT = Path(__file__).resolve().parents[2]


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _one_error_line(err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], err
    assert "Traceback" not in err


def test_predict_on_a_corrupt_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert vit_cli.main(["predict", str(image)]) == 2
    _one_error_line(capsys.readouterr().err, f"{image}: ")
    with pytest.raises(ImageError):
        vit_cli.main(["predict", str(image), "--debug"])


def test_predict_with_a_hostile_model_folder(
    kit: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.new("L", (8, 8)).save(image)
    folder = kit.folder(weights=pickle.dumps(_RunsCode(tmp_path / "MARKER")))
    assert vit_cli.main(["predict", str(image), "--model", str(folder)]) == 2
    _one_error_line(capsys.readouterr().err, "starts like a Python pickle")
    assert not (tmp_path / "MARKER").exists()


def test_info_on_a_truncated_file(kit: Any, capsys: pytest.CaptureFixture[str]) -> None:
    folder = kit.folder(weights=kit.safetensors_bytes(kit.tensors())[:-50])
    assert vit_cli.main(["info", str(folder)]) == 2
    _one_error_line(capsys.readouterr().err, "model.safetensors")


def test_conversion_of_a_code_carrying_pickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "evil.pth"
    source.write_bytes(pickle.dumps({"w": _RunsCode(tmp_path / "MARKER")}, protocol=2))
    assert conversion_cli.main([str(source), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "refused to unpickle")
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError):
        conversion_cli.main([str(source), "-o", str(tmp_path / "out"), "--debug"])


def test_conversion_into_an_impossible_place(
    kit: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A write failure (the output's parent is a file) is a WriteError: exit 2, no trace."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("I am a file")
    folder = kit.folder()
    code = conversion_cli.main([str(folder), "-o", str(blocker / "out"), "--quiet"])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "cannot create a folder beside it")
    assert blocker.read_text() == "I am a file"
    assert issubclass(WriteError, ViTError) and issubclass(WriteError, OSError)


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_as_a_user_runs_it(kit: Any, tmp_path: Path, debug: bool) -> None:
    """In a real process: status 2 and one line; with --debug the traceback, status 1."""
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.new("L", (8, 8)).save(image)
    folder = kit.folder(weights=b"")
    command = [sys.executable, "-m", "vit_core", "predict", str(image), "--model", str(folder)]
    command += ["--debug"] * debug
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if debug:
        assert result.returncode == 1
        assert "Traceback" in result.stderr and "CheckpointError" in result.stderr
    else:
        assert result.returncode == 2
        _one_error_line(result.stderr, "it is empty (0 bytes)")
