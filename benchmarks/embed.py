"""How close `embed` and Ray come to the model's own speed: decoding must hide behind it.

    python benchmarks/embed.py [--images 256] [--out DIR]   # part of `make bench`

On 256 JPEG photos (scikit-image's, cropped and resized to camera-like sizes, so each
one is decoded and resized for real), ViT-B/16 with random weights:

- the model's own batch-8 throughput on ready-made pixels (`Backend.run`), per backend;
- `python -m vit_core embed` over the photos (batch 8, its default decoding workers);
- `vit_core.distributed.ray_embed` on a local Ray instance with 2 actors (torch).

Every command has a start-up cost (imports, loading, jax's compile, Ray's workers) that
a long run amortises, so a run's throughput is taken at the margin: the same command on
all the photos and on a quarter of them, and the extra images over the extra seconds.
Both figures are reported. No timing here is a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from benchmarks.run import machine, write_random_folder  # noqa: E402

MODEL = "B/16"
BATCH = 8
RAY_ROW = "ray-torch-2-actors"


def write_photos(folder: Path, count: int) -> list[Path]:
    """`count` JPEGs of about 640 x 480: random crops of scikit-image's colour photos."""
    from PIL import Image
    from skimage import data

    photos = [getattr(data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        top, left = rng.integers(0, h // 4), rng.integers(0, w // 4)
        crop = Image.fromarray(photo[top : top + 3 * h // 4, left : left + 3 * w // 4])
        path = folder / f"photo-{i:04d}.jpg"
        crop.resize((640, 480)).save(path, quality=90)
        paths.append(path)
    return paths


def model_throughput(folder: Path, backend: str, rounds: int = 5) -> float:
    """Images/s of the model alone at batch 8 (pixels made once), median of `rounds`."""
    import vit_core
    from vit_core.backend import get_backend

    model = vit_core.load(folder, backend=backend, model_type="base")
    run = get_backend(backend).run
    size = model.config.image_size
    pixels = np.random.default_rng(0).standard_normal((BATCH, 3, size, size), np.float32)
    run(model, pixels)  # warm-up (jax compiles here)
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(4):
            run(model, pixels)
        seconds.append((time.perf_counter() - start) / 4)
    return BATCH / statistics.median(seconds)


def marginal(command: Callable[[list[Path], Path], object], paths: list[Path], tmp: Path) -> dict:
    """Images/s of `command` over all of `paths` and at the margin (all minus a quarter)."""
    took = {}
    for count in (len(paths) // 4, len(paths)):
        out = tmp / f"out-{count}"
        start = time.perf_counter()
        command(paths[:count], out)
        took[count] = time.perf_counter() - start
    few, many = sorted(took)
    return {
        "whole_run_images_per_second": many / took[many],
        "marginal_images_per_second": (many - few) / (took[many] - took[few]),
        "seconds": {str(k): v for k, v in took.items()},
    }


def cli_embed(folder: Path, backend: str) -> Callable[[list[Path], Path], object]:
    from vit_core.cli import main

    def command(paths: list[Path], out: Path) -> object:
        args = ["embed", *map(str, paths), "--model", str(folder), "--backend", backend]
        status = main([*args, "--batch-size", str(BATCH), "-o", f"{out}.npy"])
        assert status == 0, f"embed exited with {status}"
        return status

    return command


def ray_command(folder: Path, actors: int) -> Callable[[list[Path], Path], object]:
    from vit_core.distributed import ray_embed

    def command(paths: list[Path], out: Path) -> object:
        return ray_embed(paths, folder, out, batch_size=BATCH, num_actors=actors)

    return command


def measure_row(row: str, photos: Path, folder: Path, tmp: Path) -> dict[str, Any]:
    """One row's figures: `embed` on one backend with its model-alone throughput, or Ray."""
    paths = sorted(photos.iterdir())
    if row != "ray":
        result = marginal(cli_embed(folder, row), paths, tmp)
        result["model_images_per_second"] = model_throughput(folder, row)
        return result
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return marginal(ray_command(folder, actors=2), paths, tmp)
    finally:
        ray.shutdown()


def measure_in_subprocess(row: str, photos: Path, folder: Path, tmp: Path) -> dict[str, Any]:
    """`measure_row` in a fresh interpreter: a user runs one backend per process, and a
    framework imported and run before (torch's thread pools, DataLoader workers) would
    slow the next row's decoding threads."""
    tmp.mkdir()
    result = tmp / "row.json"
    command = [sys.executable, __file__, "--row", row, "--photos", str(photos)]
    command += ["--model", str(folder), "--json", str(result)]
    subprocess.run(command, check=True, cwd=ROOT)
    return dict(json.loads(result.read_text()))


def measure(count: int) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "model": MODEL, "batch": BATCH}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "photos").mkdir()
        write_photos(tmp / "photos", count)
        folder = tmp / "model"
        write_random_folder(MODEL, folder)
        for row, name in (("torch", "embed-torch"), ("flax", "embed-flax"), ("ray", RAY_ROW)):
            results[name] = measure_in_subprocess(row, tmp / "photos", folder, tmp / row)
            print(row, json.dumps(results[name]), flush=True)
        results[RAY_ROW]["single_process_marginal_images_per_second"] = results["embed-torch"][
            "marginal_images_per_second"
        ]
    return results


def render(results: dict[str, Any]) -> str:
    lines = [
        f"`embed` and Ray over {MODEL} at batch {BATCH}, JPEG photos 640 x 480 "
        "(images/s; margin: the extra images of the full run over its extra seconds)",
        "",
        "| run | whole run | margin | model alone | margin / model alone |",
        "|---|---|---|---|---|",
    ]
    for backend in ("torch", "flax"):
        row = results[f"embed-{backend}"]
        model = row["model_images_per_second"]
        lines.append(
            f"| embed, {backend} | {row['whole_run_images_per_second']:.2f} | "
            f"{row['marginal_images_per_second']:.2f} | {model:.2f} | "
            f"{row['marginal_images_per_second'] / model:.2f} |"
        )
    ray_row = results[RAY_ROW]
    single = ray_row["single_process_marginal_images_per_second"]
    lines.append(
        f"| ray_embed, torch, 2 actors | {ray_row['whole_run_images_per_second']:.2f} | "
        f"{ray_row['marginal_images_per_second']:.2f} | | "
        f"{ray_row['marginal_images_per_second'] / single:.2f} x single-process embed |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    # one row in this process (how `measure` runs each row in a fresh interpreter)
    parser.add_argument("--row", choices=("torch", "flax", "ray"), help=argparse.SUPPRESS)
    parser.add_argument("--photos", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row is not None:
        row = measure_row(args.row, args.photos, args.model, args.json.parent)
        args.json.write_text(json.dumps(row))
        return 0
    results = measure(args.images)
    text = render(results)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "embed.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "embed.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
