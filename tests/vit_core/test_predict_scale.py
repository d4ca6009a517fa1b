"""`predict` over folders: finding images, bounded streaming, CSV/JSON, jax sharding.

The two runs a user would make are subprocesses: the torch backend with DataLoader
workers over a folder (with a corrupt file skipped), and the flax backend with two host
devices (`XLA_FLAGS` must be set before jax is imported, hence a fresh process), whose
predictions must equal a one-device run's.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import vit_core
from vit_core import ImageError
from vit_core.backend import get_backend
from vit_core.batching import (
    PREFETCH_BATCHES,
    Item,
    ResultsWriter,
    expand_inputs,
    load_item,
    threaded_batches,
)
from vit_core.cli import (
    HELDOUT,
    SHIPPED_MODEL,
    asset,
    main,
    processor_for,
    read_heldout,
    softmax,
)

ROOT = Path(__file__).resolve().parents[2]
DIGITS = 7  # images in the folder: batches of 3 leave a last batch of 1
BATCH = 3


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m vit_core ARGS` from the repository root, importable without an install."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "vit_core", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out digits as 16x16 PNGs in a folder and a subfolder, plus things to ignore."""
    with asset(HELDOUT) as path:
        images = read_heldout(path)[0]
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    (root / ".cache").mkdir()
    for index in range(DIGITS):
        target = root / ("sub" if index >= 4 else "") / f"digit{index}.png"
        Image.fromarray(images[index]).resize((16, 16), Image.Resampling.NEAREST).save(target)
    Image.fromarray(images[0]).save(root / ".cache" / "hidden.png")  # hidden: skipped
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def expected(folder: Path, torch_one_thread: None) -> dict[str, np.ndarray]:
    """Probabilities per file name, computed in one batch without any streaming."""
    paths = sorted(folder.glob("**/digit*.png"))
    with asset(SHIPPED_MODEL) as model_folder:
        model = vit_core.load(model_folder, backend="torch")
        processor = processor_for(model_folder, model.config)
    pixels = processor([Image.open(p) for p in paths])["pixel_values"]
    return dict(
        zip(
            (p.name for p in paths),
            softmax(get_backend("torch").run(model, pixels)["logits"]),
            strict=True,
        )
    )


# ------------------------------------------------------------- finding files
def test_folders_recurse_globs_expand_and_files_are_taken_as_given(folder: Path) -> None:
    names = [p.relative_to(folder).as_posix() for p in expand_inputs([folder])]
    assert names == [f"digit{i}.png" for i in range(4)] + [f"sub/digit{i}.png" for i in (4, 5, 6)]
    assert len(expand_inputs([folder / "**" / "*.png"])) == DIGITS  # ** recurses, hidden not
    assert [p.name for p in expand_inputs([folder / "digit[01].png"])] == [
        "digit0.png",
        "digit1.png",
    ]
    notes = folder / "notes.txt"
    assert expand_inputs([notes, folder / "sub"])[0] == notes  # named outright: kept


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("missing.png", "missing.png: no such image file"),
        ("*.gif", "no image files match this pattern"),
        (".cache/../sub/..", None),  # the folder itself: fine
        ("empty", "no image files in this folder"),
    ],
)
def test_inputs_that_find_nothing_say_so(folder: Path, item: str, message: str | None) -> None:
    (folder / "empty").mkdir(exist_ok=True)
    if message is None:
        assert len(expand_inputs([folder / item])) == DIGITS
        return
    with pytest.raises(ImageError, match=message):
        expand_inputs([folder / item])


# ----------------------------------------------------------------- streaming
def test_threaded_batches_keep_at_most_one_batch_decoded_ahead(folder: Path) -> None:
    paths = expand_inputs([folder])
    processor = vit_core.ViTImageProcessor(size=8)
    started, lock = [], threading.Lock()

    def counting_load(index: int, path: Path, processor: Any) -> Item:
        with lock:
            started.append(index)
        return load_item(index, path, processor)

    seen = []
    for number, batch in enumerate(threaded_batches(paths, processor, 2, 2, counting_load)):
        assert len(started) <= (number + 1 + PREFETCH_BATCHES) * 2  # bounded, whatever N
        seen += batch.indices
    assert seen == list(range(DIGITS)) and sorted(started) == seen


def test_pad_to_multiple_appends_zero_images() -> None:
    from vit_flax.backend import pad_to_multiple

    batch = np.ones((3, 3, 2, 2), np.float32)
    padded = pad_to_multiple(batch, 2)
    assert padded.shape == (4, 3, 2, 2) and not padded[3].any() and padded[:3].all()
    assert pad_to_multiple(batch, 3) is batch


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_results_appear_only_when_the_run_completes(tmp_path: Path, suffix: str) -> None:
    target = tmp_path / f"results{suffix}"
    with pytest.raises(RuntimeError), ResultsWriter(target, 2) as writer:
        writer.write(Path("a.png"), [("cat", 0.75), ("dog", 0.25)])
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with ResultsWriter(target, 2) as writer:
        writer.write(Path("a.png"), [("cat", 0.75), ("dog", 0.25)])
    text = target.read_text()
    if suffix == ".csv":
        assert text.splitlines() == [
            "path,label_1,probability_1,label_2,probability_2",
            "a.png,cat,0.75,dog,0.25",
        ]
    else:
        assert json.loads(text) == [
            {
                "path": "a.png",
                "top_k": [
                    {"label": "cat", "probability": 0.75},
                    {"label": "dog", "probability": 0.25},
                ],
            }
        ]


# ----------------------------------------------------------- the CLI at scale
def test_torch_dataloader_workers_stream_a_folder_into_csv(
    folder: Path, expected: dict[str, np.ndarray], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    output = tmp_path / "results.csv"
    result = run_cli(
        "predict", folder, corrupt, "--batch-size", BATCH, "--workers", 2,
        "--top-k", 3, "-o", output, "--skip-errors",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr  # 1: an image was skipped
    assert f"warning: skipped {corrupt}: " in result.stderr
    assert "img/s" in result.stderr  # the progress bar: 8 images in batches of 3
    assert result.stdout.startswith(f"wrote {DIGITS} predictions to {output} (backend torch")
    with output.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [Path(r["path"]).name for r in rows] == [f"digit{i}.png" for i in range(DIGITS)]
    for row in rows:
        probs = expected[Path(row["path"]).name]
        top = np.argsort(-probs, kind="stable")[:3]
        assert [row[f"label_{r}"] for r in (1, 2, 3)] == [str(i) for i in top]
        got = [float(row[f"probability_{r}"]) for r in (1, 2, 3)]
        np.testing.assert_allclose(got, probs[top], rtol=0, atol=1e-6)


def test_a_bad_image_stops_the_run_with_one_line(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.png").write_text("not a png")
    assert main(["predict", str(folder), str(tmp_path / "bad.png"), "--workers", "0"]) == 2
    assert capsys.readouterr().err.endswith("bad.png: not an image format PIL can read\n")


# Run in a fresh process per device count: XLA_FLAGS is read once, when jax starts.
ON_DEVICES = """
import os, sys
import jax
import numpy as np
from vit_flax.backend import ShardedFlaxModel
from vit_core.cli import main

devices = int(os.environ["EXPECT_DEVICES"])
assert jax.device_count() == devices, jax.devices()
module = type("Module", (), {"dtype": np.float32})()  # the compute dtype pixels take
sharded = ShardedFlaxModel(type("M", (), {"params": {"w": np.ones(2)}, "module": module})())
x = sharded.shard(np.zeros((3, 3, 8, 8), np.float32))  # 3 images: padded to a multiple
assert x.shape[0] == 3 + (-3 % devices) and len(x.addressable_shards) == devices
assert {s.data.shape[0] for s in x.addressable_shards} == {x.shape[0] // devices}
assert {s.device for s in x.addressable_shards} == set(jax.devices())
sys.exit(main(sys.argv[1:]))
"""


def predict_on_cpu_devices(devices: int, args: list[str]) -> subprocess.CompletedProcess:
    """`main(args)` in a process whose jax has `devices` CPU devices (and no accelerator,
    so that both runs compare the same arithmetic)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        JAX_PLATFORMS="cpu",
        EXPECT_DEVICES=str(devices),
    )
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [sys.executable, "-c", ON_DEVICES, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_flax_sharded_over_two_devices_predicts_as_one_device(folder: Path, tmp_path: Path) -> None:
    args = ["predict", str(folder), "--backend", "flax", "--batch-size", str(BATCH), "-o"]
    for devices, name in ((1, "one"), (2, "two")):
        result = predict_on_cpu_devices(devices, [*args, str(tmp_path / f"{name}.json")])
        assert result.returncode == 0, result.stdout + result.stderr
        plural = "s" if devices > 1 else ""
        assert f"batches sharded over {devices} cpu device{plural})" in result.stdout
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert [r["path"] for r in one] == [r["path"] for r in two] and len(one) == DIGITS
    for a, b in zip(one, two, strict=True):
        assert [p["label"] for p in a["top_k"]] == [p["label"] for p in b["top_k"]]
        np.testing.assert_allclose(
            [p["probability"] for p in a["top_k"]],
            [p["probability"] for p in b["top_k"]],
            rtol=0,
            atol=1e-6,
        )
