"""StableHLO round trips (`vit_flax.export`): every family the converter writes, at the
config's size and at another one, batch 1 and batch 3 from one file, against the Flax twin
within 1e-5; and the clear error on a file that is not a sound StableHLO archive."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vit_test_support import FAMILIES, record_max_diff, tiny_config, write_folder

import vit_core
from vit_core import CheckpointError, InputError
from vit_core.backend import get_backend
from vit_core.layout import ModelKind
from vit_flax.export import (
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    read_stablehlo,
    run_stablehlo,
    write_stablehlo,
)

METADATA = {"config.json": '{"model_type": "vit"}\n', "preprocessor_config.json": "{}\n"}
OTHER_SIZE = (12, 16)  # a 3x4 grid of 4-pixel patches, from the tiny models' 2x2
TOLERANCE = 1e-5


def pixels(batch: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, *size)).astype(np.float32)


def exported(
    tmp_path: Path, fields: dict[str, Any], kind: ModelKind, size: tuple[int, int] | None
) -> tuple[Any, Path]:
    """The Flax twin of a seeded tiny folder (at `size`: resampled at load), and its
    StableHLO file. One block: every switch acts in each block alike, and each compile
    (three a case) costs by the op."""
    folder = tmp_path / "model"
    folder.mkdir()
    write_folder(folder, tiny_config(**fields, num_hidden_layers=1), kind, seed=7)
    model = vit_core.load(folder, backend="flax", dtype="float32", image_size=size)
    path = tmp_path / "model.stablehlo"
    write_stablehlo(model, path, model.config.image_hw, METADATA)
    return model, path


# Every family at its config's size and at another (resampled in numpy at load, so the
# program differs in its grid).
CASES = [(family, size) for family in FAMILIES for size in (None, OTHER_SIZE)]


@pytest.mark.parametrize(
    ("family", "size"), CASES, ids=[f"{f}-{'x'.join(map(str, s or (8, 8)))}" for f, s in CASES]
)
def test_one_file_matches_the_twin_at_batch_1_and_3(
    tmp_path: Path, family: str, size: tuple[int, int] | None
) -> None:
    fields, kind = FAMILIES[family]
    model, path = exported(tmp_path, fields, kind, size)
    images = pixels(3, model.config.image_hw)
    want = get_backend("flax").run(model, images)  # the twin at batch 3
    artefact = read_stablehlo(path)
    assert artefact.metadata == METADATA
    for batch in (1, 3):  # batch 1 is the first image: the rows do not interact
        got = artefact(images[:batch])
        assert list(got) == list(want), f"{family}: outputs {list(got)} != {list(want)}"
        for name, value in got.items():
            diff = float(np.max(np.abs(value - want[name][:batch])))
            record_max_diff(f"stablehlo vs flax twin: {name}", diff)
            assert diff <= TOLERANCE, f"{family} {name} batch {batch}: {diff:.3e}"


def test_the_manifest_describes_the_program(tmp_path: Path) -> None:
    _, path = exported(tmp_path, {"use_distillation_token": True}, FAMILIES["vit"][1], None)
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read(MANIFEST))
        assert set(archive.namelist()) == {MANIFEST, "program.bin", WEIGHTS, *METADATA}
    assert manifest["input"] == {
        "name": "pixel_values",
        "shape": ["b", 3, 8, 8],
        "dtype": "float32",
    }
    assert manifest["outputs"] == [  # the twin's names, in the twin's order
        {"name": name, "shape": ["b", 3]}
        for name in ("logits", "cls_logits", "distillation_logits")
    ]
    assert manifest["metadata"] == sorted(METADATA) and manifest["platforms"] == ["cpu"]


@pytest.fixture(scope="module")
def good_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, path = exported(tmp_path_factory.mktemp("good"), {}, FAMILIES["vit"][1], None)
    return path


def _rewritten(source: Path, target: Path, change: dict[str, bytes | None]) -> Path:
    """A copy of the archive with members replaced (bytes) or left out (None)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = change.get(name, old.read(name))
            if data is not None:
                new.writestr(name, data)
    return target


def _flip_weights_byte(source: Path, target: Path) -> Path:
    """The archive with one byte inside the stored weights changed (its CRC-32 then fails)."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = archive.getinfo(WEIGHTS)
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # the data
    data[start + info.compress_size // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "not a readable ZIP archive"),
        ("flipped-weights-byte", "Bad CRC-32 for file 'weights.safetensors'"),
        ("not-a-zip", "not a readable ZIP archive"),
        ("no-manifest", "a ZIP archive without manifest.json"),
        ("other-format", "does not name the format 'vit-twin-stablehlo'"),
        ("newer-version", f"reads version {FORMAT_VERSION}"),
        ("garbage-program", "its program.bin cannot be deserialised"),
        ("wrong-weights", "its weights do not fit its program"),
        ("missing", "no such file"),
    ],
)
def test_a_damaged_or_foreign_file_is_refused_naming_it(
    good_file: Path, tmp_path: Path, damage: str, message: str
) -> None:
    manifest = json.loads(zipfile.ZipFile(good_file).read(MANIFEST))
    bad = tmp_path / "bad.stablehlo"
    if damage == "truncated":
        bad.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    elif damage == "flipped-weights-byte":
        _flip_weights_byte(good_file, bad)
    elif damage == "not-a-zip":
        bad.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(64))  # an ONNX protobuf's start
    elif damage == "no-manifest":
        _rewritten(good_file, bad, {MANIFEST: None})
    elif damage == "other-format":
        _rewritten(good_file, bad, {MANIFEST: json.dumps({**manifest, "format": "x"}).encode()})
    elif damage == "newer-version":
        newer = {**manifest, "format_version": FORMAT_VERSION + 1}
        _rewritten(good_file, bad, {MANIFEST: json.dumps(newer).encode()})
    elif damage == "garbage-program":
        _rewritten(good_file, bad, {"program.bin": b"\x00" * 64})
    elif damage == "wrong-weights":
        from safetensors.numpy import save

        other = save({"classifier/bias": np.zeros(3, np.float32)})
        _rewritten(good_file, bad, {WEIGHTS: other})
    with pytest.raises(CheckpointError, match=message) as error:
        run_stablehlo(bad, pixels(1, (8, 8)))
    assert str(bad) in str(error.value)


@pytest.mark.parametrize("shape", [(2, 3, 12, 16), (2, 1, 8, 8), (3, 8, 8), (0, 3, 8, 8)])
def test_pixels_of_another_shape_are_refused_with_the_shape_it_takes(
    good_file: Path, shape: tuple[int, ...]
) -> None:
    with pytest.raises(InputError, match=r"takes pixel_values of shape \(batch >= 1, 3, 8, 8\)"):
        run_stablehlo(good_file, np.zeros(shape, np.float32))


def test_write_refuses_what_would_not_describe_its_file(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    write_folder(folder, tiny_config(), FAMILIES["vit"][1], seed=1)
    model = vit_core.load(folder, backend="flax", dtype="float32")
    with pytest.raises(InputError, match="load it with vit_core.load"):
        write_stablehlo(model, tmp_path / "x", OTHER_SIZE, METADATA)
    with pytest.raises(InputError, match="cannot name an archive member"):
        write_stablehlo(model, tmp_path / "x", (8, 8), {"../config.json": "{}"})
    half = vit_core.load(folder, backend="flax", dtype="bfloat16")
    with pytest.raises(InputError, match="exports float32 models"):
        write_stablehlo(half, tmp_path / "x", (8, 8), METADATA)
    assert not (tmp_path / "x").exists()
