"""`python -m conversion`: help with examples, exit codes, overwrite rules, --verify.

The command runs in a subprocess, as a user runs it; the verify-mismatch path runs
in-process (`cli.main`) on a genuinely different model, to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conversion import cli

ROOT = Path(__file__).resolve().parents[2]


def run(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conversion", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def timm_file(oracle: Any, tmp_path: Path) -> Path:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3)
    path = tmp_path / "vit.pth"
    torch.save(oracle.perturb_torch(model, 0).state_dict(), path)
    return path


def test_help_explains_every_option_with_an_example() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "examples:" in text and "python -m conversion" in text
    options = "--from --model-name --config --set --image-size --interpolation --dtype --gelu"
    for option in [*options.split(), "--verify", "--force", "--debug"]:
        assert option in text, option
    # every option's help carries an example
    assert text.count("e.g.") >= 13


def test_convert_refuse_overwrite_then_force(timm_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run(timm_file, "-o", out, "--set", "num_attention_heads=3", "--quiet")
    assert first.returncode == 0, first.stderr
    for word in (
        "architecture:",
        "parameters:",
        "file:",
        "assumed:",
        "width 48, 2 layers, 3 heads",
    ):
        assert word in first.stdout, first.stdout
    before = (out / "model.safetensors").read_bytes()

    again = run(timm_file, "-o", out, "--set", "num_attention_heads=3", "--quiet")
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and "already exists" in again.stderr
    assert "--force" in again.stderr and "Traceback" not in again.stderr
    assert (out / "model.safetensors").read_bytes() == before

    (out / "stale.txt").write_text("from an older conversion")
    forced = run(timm_file, "-o", out, "--set", "num_attention_heads=6", "--quiet", "--force")
    assert forced.returncode == 0, forced.stderr
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_attention_heads"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "vit.pth"]  # nothing aside


def test_verify_prints_differences_and_exits_0(timm_file: Path, tmp_path: Path) -> None:
    result = run(timm_file, "-o", tmp_path / "out", "--set", "num_attention_heads=3", "--verify")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.rstrip().endswith("ok")]
    pairs = {tuple(line.split()[:3]) for line in lines}
    assert {("torch", "vs", "flax"), ("timm", "vs", "torch"), ("timm", "vs", "flax")} <= pairs
    assert all(float(line.split()[-2]) <= 1e-5 for line in lines), result.stdout


def test_errors_exit_2_without_traceback_unless_debug(tmp_path: Path) -> None:
    source = tmp_path / "config.json"
    source.write_text(json.dumps({"model_type": "vit"}))
    result = run(source, "-o", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "a JSON file" in result.stderr
    assert "Traceback" not in result.stderr
    debug = run(source, "-o", tmp_path / "out", "--debug")
    assert (
        debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr
    )
    missing = run(tmp_path / "nope.pth", "-o", tmp_path / "out")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_bad_arguments_are_usage_errors(
    timm_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(timm_file), "-o", str(tmp_path / "o"), "--set", "num_attention_heads"])
    assert exit_info.value.code == 2 and "FIELD=VALUE" in capsys.readouterr().err
    code = cli.main([str(timm_file), "-o", str(tmp_path / "o"), "--set", "num_heads=3"])
    assert code == 2 and "did you mean num_attention_heads" in capsys.readouterr().err
    code = cli.main([str(timm_file), "-o", str(tmp_path / "o"), "--image-size", "3x4x5"])
    assert code == 2 and "expected H or HxW" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_verify_mismatch_exits_1_and_writes_nothing(
    oracle: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A transformers config records its eps; overriding it changes the function, and
    --verify catches that before anything is written."""
    _, folder = oracle.make_hf("classification", image_size=32, patch_size=16)
    out = tmp_path / "out"
    code = cli.main([str(folder), "-o", str(out), "--set", "layer_norm_eps=0.5", "--verify"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "MISMATCH" in captured.out and "transformers vs torch" in captured.out
    # the CLI's own line (torchao, imported by transformers, may log a warning before it)
    assert captured.err.splitlines()[-1].startswith("error: verification failed")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_swap_puts_the_old_folder_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conversion import write

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    rename = os.rename

    def failing_rename(src: Any, dst: Any) -> None:
        if str(src).endswith(".partial"):
            raise OSError("simulated failure moving the new folder in")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"), write.staged(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_holds_the_source_is_refused(timm_file: Path) -> None:
    from conversion import convert
    from conversion.write import OutputExistsError

    with pytest.raises(OutputExistsError, match="would delete the source"):
        convert(timm_file, timm_file.parent, force=True, overrides={"num_attention_heads": 3})
    assert timm_file.is_file()


def test_a_missing_reader_module_is_skipped_until_asked_for(
    timm_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conversion import convert, sources
    from vit_core import CheckpointError

    monkeypatch.setitem(sources.KINDS, "jax", "conversion.sources.not_there")
    hints = {"num_attention_heads": 3}
    assert (
        convert(timm_file, tmp_path / "out", overrides=hints, progress=False).source_kind == "timm"
    )
    with pytest.raises(CheckpointError, match="'jax' reader .* is not part of this installation"):
        convert(timm_file, tmp_path / "out2", source="jax", progress=False)
    assert not (tmp_path / "out2").exists()
