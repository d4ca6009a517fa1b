"""Writes: a model folder appears whole or not at all, and nothing a user had is lost.

`save_folder` (both twins' `save_pretrained`) and conversion share one implementation,
`vit_core._io.staged_folder`. The kill tests start a child process that writes a ~25 MB
model folder and SIGKILL it at a random moment, several times: the target must then be
the old folder, intact, or the complete new one (or absent, when there was none); never
a mix of the two versions, never a half-written file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vit_core import CheckpointError, ViTError, load
from vit_core._io import atomic_write_bytes
from vit_core.checkpoint import read_tensors
from vit_core.config import ViTConfig
from vit_core.errors import OutputExistsError, WriteError
from vit_core.layout import WEIGHTS_NAME, ModelKind, to_internal
from vit_core.loading import save_folder

ROOT = Path(__file__).resolve().parents[2]
KIND = ModelKind(classifier=True, pooler=False)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _internal(kit: Any, seed: int = 0) -> dict[str, np.ndarray]:
    return to_internal(kit.tensors(seed), KIND)


def _state(folder: Path) -> dict[str, Any]:
    """Every file below `folder` and its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ save_pretrained
def test_save_into_a_new_nested_path(kit: Any, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "model"
    save_folder(target, kit.CONFIG, _internal(kit), KIND)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", WEIGHTS_NAME]
    assert read_tensors(target / WEIGHTS_NAME).keys() == kit.tensors().keys()
    assert _hidden(target.parent) == []
    mode = 0o777 & ~_umask()
    assert stat.S_IMODE(target.stat().st_mode) == mode  # not a temp folder's 0o700
    for file in target.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == mode & 0o666


def test_save_over_a_folder_replaces_its_files_and_keeps_the_others(
    kit: Any, tmp_path: Path
) -> None:
    """transformers writes into an existing folder, keeping other files; so do we, but the
    new folder replaces the old one in one rename."""
    target = kit.folder(name="model", tensors=kit.tensors(seed=1))
    (target / "preprocessor_config.json").write_text('{"do_resize": true}')
    (target / "README.md").write_text("my notes")
    (target / "runs").mkdir()
    (target / "runs" / "log.txt").write_text("epoch 1")
    (target / "latest").symlink_to("runs")
    os.chmod(target, 0o750)
    readme_inode = (target / "README.md").stat().st_ino
    save_folder(target, kit.CONFIG, _internal(kit, seed=2), KIND)
    saved = read_tensors(target / WEIGHTS_NAME)
    assert all(np.array_equal(saved[k], v) for k, v in kit.tensors(seed=2).items())
    assert json.loads((target / "config.json").read_text())["architectures"] == [
        "ViTForImageClassification"
    ]
    assert (target / "preprocessor_config.json").read_text() == '{"do_resize": true}'
    assert (target / "README.md").read_text() == "my notes"
    assert (target / "README.md").stat().st_ino == readme_inode  # a hard link, not a copy
    assert (target / "runs" / "log.txt").read_text() == "epoch 1"
    assert os.readlink(target / "latest") == "runs"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert _hidden(tmp_path) == []


def test_a_folder_that_cannot_be_swapped_is_written_file_by_file(
    kit: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount point (rename fails with EBUSY) or a folder whose parent is read-only:
    transformers can save there, so can we, one atomic file at a time, with a warning."""
    import errno

    target = kit.folder(name="volume", tensors=kit.tensors(seed=1))
    (target / "notes.txt").write_text("keep me")
    rename = os.rename

    def busy(src: Any, dst: Any) -> None:
        if Path(src) == target:
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        rename(src, dst)

    monkeypatch.setattr(os, "rename", busy)
    with pytest.warns(RuntimeWarning, match=r"cannot be replaced as a whole .*one by one"):
        save_folder(target, kit.CONFIG, _internal(kit, seed=2), KIND)
    saved = read_tensors(target / WEIGHTS_NAME)
    assert np.array_equal(saved["vit.layernorm.bias"], kit.tensors(2)["vit.layernorm.bias"])
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["config.json", WEIGHTS_NAME, "notes.txt"]
    )
    assert _hidden(tmp_path) == []


def test_save_through_a_symlink_keeps_the_link(kit: Any, tmp_path: Path) -> None:
    real = kit.folder(name="real", tensors=kit.tensors(seed=1))
    link = tmp_path / "link"
    link.symlink_to(real)
    save_folder(link, kit.CONFIG, _internal(kit, seed=2), KIND)
    assert link.is_symlink() and link.resolve() == real.resolve()
    saved = read_tensors(real / WEIGHTS_NAME)
    assert np.array_equal(saved["vit.layernorm.weight"], kit.tensors(2)["vit.layernorm.weight"])


def test_save_onto_a_file_is_refused(kit: Any, tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.write_text("not a folder")
    with pytest.raises(OutputExistsError, match="is a file, not a folder"):
        save_folder(path, kit.CONFIG, _internal(kit), KIND)
    assert path.read_text() == "not a folder"


def test_a_failure_mid_save_leaves_the_old_folder(
    kit: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vit_core import loading

    target = kit.folder(name="model")
    before = _state(target)

    def half_then_fail(arrays: Any, path: Path, metadata: Any = None) -> None:
        Path(path).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loading, "save_file", half_then_fail)
    with pytest.raises(WriteError, match=r"cannot write model\.safetensors .*No space left") as e:
        save_folder(target, kit.CONFIG, _internal(kit, seed=3), KIND)
    assert isinstance(e.value, OSError)  # code catching OSError keeps catching it
    assert isinstance(e.value, ViTError)  # and so does the CLI's one-line handler
    assert _state(target) == before
    assert _hidden(tmp_path) == []


def test_an_unwritable_parent_is_a_write_error(kit: Any, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    with pytest.raises(WriteError, match="cannot create a folder beside it"):
        save_folder(parent / "model", kit.CONFIG, _internal(kit), KIND)


def test_non_finite_weights_are_saved_with_a_warning_and_refused_at_load(
    kit: Any, tmp_path: Path
) -> None:
    """A diverged model is still worth keeping for a post-mortem; loading it is not."""
    internal = _internal(kit)
    internal["vit.layernorm.weight"] = np.full(16, np.nan, np.float32)
    with pytest.warns(RuntimeWarning, match=r"16 NaN of 16 values; saved anyway"):
        save_folder(tmp_path / "diverged", kit.CONFIG, internal, KIND)
    with pytest.raises(CheckpointError, match="non-finite"):
        load(tmp_path / "diverged")


def test_twins_save_pretrained_goes_through_the_same_road(kit: Any, tmp_path: Path) -> None:
    model = load(kit.folder(name="src"))
    target = kit.folder(name="dst", tensors=kit.tensors(seed=4))
    (target / "keep.txt").write_text("mine")
    model.save_pretrained(target)
    assert (target / "keep.txt").read_text() == "mine"
    assert read_tensors(target / WEIGHTS_NAME).keys() == kit.tensors().keys()
    assert _hidden(tmp_path) == []


def test_atomic_file_write_has_ordinary_permissions(tmp_path: Path) -> None:
    path = atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    assert _hidden(tmp_path) == []


# ------------------------------------------------------------------ conversion
def test_conversion_never_replaces_without_force(tmp_path: Path) -> None:
    from conversion.write import staged

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="already exists; .* --force"):  # noqa: SIM117
        with staged(out, force=False) as staging:
            (staging / "new.txt").write_text("new")
    assert _state(out) == {"old.txt": b"old"}
    with staged(out, force=True) as staging:  # --force: the new folder, as a whole
        (staging / "new.txt").write_text("new")
    assert _state(out) == {"new.txt": b"new"}
    assert _hidden(tmp_path) == []


def test_conversion_refuses_non_finite_weights(kit: Any, tmp_path: Path) -> None:
    from conversion.write import staged, write_files

    tensors = kit.tensors()
    tensors["vit.layernorm.bias"][0] = np.inf
    with pytest.raises(CheckpointError, match=r"vit\.layernorm\.bias: 1 inf"):  # noqa: SIM117
        with staged(tmp_path / "out", force=False) as staging:
            write_files(staging, tensors, kit.CONFIG, None, {})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ killed mid-write
CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from vit_core.config import ViTConfig
    from vit_core.layout import ModelKind, expected_shapes

    road, target, version = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = ViTConfig(hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                       intermediate_size=1024, image_size=32, patch_size=8, num_labels=10,
                       extra={"version": version})
    kind = ModelKind(classifier=True, pooler=False)
    tensors = {k: np.full(s, version, np.float32)
               for k, s in expected_shapes(config, kind).items()}
    if road == "save_pretrained":
        from vit_core.layout import to_internal
        from vit_core.loading import save_folder
        internal = to_internal(tensors, kind)
        print("ready", flush=True)
        save_folder(target, config, internal, kind)
    else:
        from conversion.write import staged, write_files
        from vit_core.processing import ViTImageProcessor
        print("ready", flush=True)
        with staged(target, force=False) as staging:
            write_files(staging, tensors, config, ViTImageProcessor(size=32), {"format": "pt"})
    print("done", flush=True)
    """
)


def _child(road: str, target: Path, version: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, road, str(target), str(version)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def _version(folder: Path) -> int:
    """The one version a folder holds, or an assertion naming the mix it holds."""
    config = ViTConfig.from_json_file(folder / "config.json")  # whole, valid JSON
    tensors = read_tensors(folder / WEIGHTS_NAME)  # header and size checked
    values = set().union(*(np.unique(v).tolist() for v in tensors.values()))
    assert len(values) == 1, f"{folder}: tensors of several versions {values}"
    assert values == {config.extra["version"]}, f"{folder}: config and weights disagree"
    return int(config.extra["version"])


def _write_time(road: str, target: Path) -> float:
    """Seconds from 'ready' to 'done' of one unkilled write (which must succeed)."""
    process = _child(road, target, 7)
    started = time.perf_counter()
    assert process.stdout is not None and process.stdout.readline().strip() == "done"
    elapsed = time.perf_counter() - started
    assert process.wait(timeout=120) == 0
    assert _version(target) == 7
    return elapsed


@pytest.mark.parametrize(
    ("road", "old", "kills"),
    [("save_pretrained", True, 6), ("save_pretrained", False, 3), ("conversion", False, 3)],
    ids=["save-over-old-folder", "save-fresh", "conversion-fresh"],
)
def test_killed_mid_write_leaves_old_or_new_never_half(
    tmp_path: Path, road: str, old: bool, kills: int
) -> None:
    rng = random.Random(f"{road}-{old}")
    calibration = tmp_path / "calibration"
    duration = _write_time(road, calibration)
    if old:  # replacing a folder costs more: time that too
        duration = max(duration, _write_time(road, calibration))
    outcomes = []
    for attempt in range(kills):
        place = tmp_path / f"attempt{attempt}"
        place.mkdir()
        target = place / "model"
        if old:
            _write_time(road, target)  # the old folder: version 7, written whole
            (target / "notes.txt").write_text("keep me")
            before = _version(target)
        process = _child(road, target, 2)
        time.sleep(rng.uniform(0.0, 1.5 * duration))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if target.exists():
            version = _version(target)
            assert version in ((before, 2) if old else (2,))
            if old:
                assert (target / "notes.txt").read_text() == "keep me"
            outcomes.append("new" if version == 2 else "old")
        else:
            aside = sorted(place.glob(".model.old-*"))
            # absent: there was nothing before, or the kill fell between the two renames
            # of the swap, and the old folder waits intact beside it
            assert not old or (aside and _version(aside[0]) == before)
            outcomes.append("nothing")
        leftovers = [p.name for p in place.iterdir() if p.name != "model"]
        assert all(name.startswith(".model.") for name in leftovers), leftovers
    print(f"{road} (old folder: {old}): write {duration:.2f} s, outcomes {outcomes}")
