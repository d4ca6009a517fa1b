"""Side-by-side inference speed: our twins against timm and transformers, one process.

    python benchmarks/run.py [--models B/16 Ti/16] [--batches 1 8] [--rounds 7] [--out DIR]

Every implementation runs the same architecture in float32 on the CPU. Rounds are
interleaved (each round times every implementation once, in a rotating order) so that
machine noise falls on all alike; the median over rounds is reported. Ratios are against
each peer and against the machine's measured float32 matmul rate (the ceiling for a
model that is all matmuls). Peak RSS is that of a separate, fresh process that loads
only that implementation and runs the largest batch (one process holding every model
cannot tell them apart).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from vit_core import ViTConfig  # noqa: E402

MODELS = {"B/16": "vit-base-patch16-224", "Ti/16": "vit-tiny-patch16-224"}
TIMM_NAMES = {"B/16": "vit_base_patch16_224", "Ti/16": "vit_tiny_patch16_224"}
Runner = Callable[[np.ndarray], object]
MIN_ROUND_SECONDS = 0.3  # fast calls repeat within a round so timer noise stays small


@dataclass
class Result:
    model: str
    impl: str
    batch: int
    seconds: list[float]
    peak_rss_mib: float
    gflop_per_image: float

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median


def gflop_per_image(config: ViTConfig) -> float:
    """Multiply-adds x 2 of one forward pass: patch projection, attention, MLP, head."""
    d, m, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = config.num_positions
    ph, pw = config.patch_hw
    patch = (tokens - 1) * d * config.num_channels * ph * pw
    per_layer = tokens * (4 * d * d + 2 * d * m) + 2 * tokens * tokens * d
    return 2 * (patch + layers * per_layer + d * config.num_labels) / 1e9


def matmul_gflops(seconds: float = 1.0) -> float:
    """The machine's float32 matmul rate through torch (MKL/oneDNN), a ceiling for ViT: the
    best of a square sgemm and ViT-B/16's largest one (fc1 at batch 8)."""
    import torch

    best = 0.0
    for m, k, n in ((1024, 1024, 1024), (8 * 197, 768, 3072)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
    return best


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------ implementations
def _torch_runner(model: Any) -> Runner:
    import torch

    def run(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def _ours(backend: str, **options: Any) -> Callable[[str, Path], Runner]:
    """Our twin through the one road a user takes: `vit_core.load`, then the backend's
    `run` (numpy in, numpy out, as `predict` calls it)."""

    def make(name: str, folder: Path) -> Runner:
        import vit_core
        from vit_core.backend import get_backend

        calibrated = options.get("quantize") == "int8-static"  # on the real photos
        extra = {"calibration": photos(224)} if calibrated else {}
        model = vit_core.load(folder, backend=backend, **options, **extra)
        run = get_backend(backend).run
        return lambda x: run(model, x)

    return make


def _timm(name: str, folder: Path) -> Runner:
    import timm

    return _torch_runner(timm.create_model(TIMM_NAMES[name], pretrained=False).eval())


def _hf_torch(name: str, folder: Path) -> Runner:
    import transformers

    cls = transformers.ViTForImageClassification
    return _torch_runner(cls.from_pretrained(folder, attn_implementation="sdpa").eval())


def _hf_flax(name: str, folder: Path) -> Runner:
    import jax
    import transformers

    model = transformers.FlaxViTForImageClassification.from_pretrained(folder, from_pt=True)
    forward = jax.jit(lambda params, x: model(x, params=params).logits)
    return lambda x: forward(model.params, x).block_until_ready()


# Every implementation of a model, all from the same weights where the library allows
# (timm builds its own random ones: speed does not depend on the values).
IMPLEMENTATIONS: dict[str, Callable[[str, Path], Runner]] = {
    "ours-torch": _ours("torch"),
    "ours-int8": _ours("torch", quantize="int8"),
    # each batch size compiles in the warm-up call
    "ours-int8-static": _ours("torch", quantize="int8-static"),
    "ours-flax": _ours("flax"),
    "timm": _timm,
    "hf-torch": _hf_torch,
    "hf-flax": _hf_flax,
}


def child_peak_rss(impl: str, name: str, batch: int, folder: Path) -> float:
    """Peak RSS (MiB) of a fresh process that loads only `impl` and runs one batch."""
    script = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); from benchmarks.run import *; "
        "run = IMPLEMENTATIONS[sys.argv[2]](sys.argv[3], Path(sys.argv[5])); "
        "x = np.zeros((int(sys.argv[4]), 3, 224, 224), np.float32); run(x); run(x); "
        "print(peak_rss_mib())"
    )
    args = [str(ROOT), impl, name, str(batch), str(folder)]
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


# Loading, each in a fresh process (imports included in neither time: both are imported
# before the clock starts, so the figure is the folder -> ready-model cost).
LOADERS = {
    "ours-torch": (
        "import vit_core, vit_torch",
        "vit_core.load(folder, backend='torch')",
    ),
    "ours-flax": (
        "import vit_core, vit_flax",
        "vit_core.load(folder, backend='flax')",
    ),
    "hf-torch": (
        "import transformers",
        "transformers.ViTForImageClassification.from_pretrained(folder).eval()",
    ),
}


def child_load(loader: str, folder: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of a fresh process loading `folder` with `loader`."""
    imports, call = LOADERS[loader]
    script = (
        f"import sys, time; sys.path.insert(0, sys.argv[1]); {imports}; "
        "from benchmarks.run import peak_rss_mib; folder = sys.argv[2]; "
        f"start = time.perf_counter(); model = {call}; "
        "print(time.perf_counter() - start, peak_rss_mib())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(ROOT), str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, rss = done.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(rss)


def import_cost() -> tuple[float, list[str]]:
    """Seconds to `import vit_core` in a fresh process, and any framework it pulled in."""
    script = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); start = time.perf_counter(); "
        "import vit_core; took = time.perf_counter() - start; "
        "print(took, *sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'jax', 'flax'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, check=True
    )
    took, *frameworks = done.stdout.split()
    return float(took), frameworks


def measure_loading(name: str) -> dict[str, Any]:
    """Load time and peak RSS of a `name` folder, ours against transformers' from_pretrained,
    and the cost of `import vit_core`."""
    with tempfile.TemporaryDirectory() as tmp:
        write_random_folder(name, Path(tmp))
        rows = {loader: child_load(loader, Path(tmp)) for loader in LOADERS}
    took, frameworks = import_cost()
    return {"model": name, "rows": rows, "import_ms": 1000 * took, "frameworks": frameworks}


def loading_table(loading: dict[str, Any]) -> str:
    rows = loading["rows"]
    hf_seconds, hf_rss = rows["hf-torch"]
    lines = [
        f"| loading ViT-{loading['model']} | seconds | peak RSS MiB | x transformers time "
        "| x transformers RSS |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {loader} | {sec:.2f} | {rss:.0f} | {sec / hf_seconds:.2f} | {rss / hf_rss:.2f} |"
        for loader, (sec, rss) in rows.items()
    ]
    frameworks = ", ".join(loading["frameworks"]) or "none"
    lines.append(
        f"\n`import vit_core`: {loading['import_ms']:.0f} ms, frameworks imported: {frameworks}"
    )
    return "\n".join(lines)


def photos(size: int) -> np.ndarray:
    """scikit-image's colour photos, whole and centre-cropped, each also mirrored, through a
    `size` ImageNet processor: 24 real images."""
    from skimage import data

    from vit_core import ViTImageProcessor

    names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")
    images = []
    for photo in (getattr(data, n)() for n in names):
        h, w = photo.shape[:2]
        crop = photo[h // 6 : h - h // 6, w // 6 : w - w // 6]
        images += [photo, photo[:, ::-1], crop, crop[:, ::-1]]
    processor = ViTImageProcessor(
        size={"height": size, "width": size},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return processor(images, return_tensors="np")["pixel_values"]


def measure_int8_accuracy(name: str) -> dict[str, dict[str, float]]:
    """Both int8 forms vs float32 on the shipped digits model (trained; its held-out split)
    and on a random-weight `name` over real photos: top-1 agreement, largest logit change.

    int8-static is calibrated on the even-numbered images and every form is scored on the
    odd-numbered ones, so no score is on an image that set a scale.
    """
    import torch

    import vit_core
    from vit_core.cli import HELDOUT, SHIPPED_MODEL, asset, read_heldout

    def compare(folder: Path, pixels: np.ndarray, what: str) -> dict[str, dict[str, float]]:
        calibration, scored = pixels[0::2], torch.from_numpy(pixels[1::2])
        with torch.inference_mode():
            full = vit_core.load(folder, backend="torch")(scored).logits.numpy()
            top2 = np.sort(full, axis=1)[:, -2:]
            rows = {}
            for form in ("int8", "int8-static"):
                extra = {"calibration": calibration} if form == "int8-static" else {}
                model = vit_core.load(folder, backend="torch", quantize=form, **extra)
                int8 = model(scored).logits.numpy()
                rows[f"{form}, {what}"] = {
                    "images": len(scored),
                    "top1_agreement": float(np.mean(full.argmax(1) == int8.argmax(1))),
                    "max_logit_diff": float(np.abs(full - int8).max()),
                    "logit_range": float(np.ptp(full)),
                    "median_top1_margin": float(np.median(top2[:, 1] - top2[:, 0])),
                }
        return rows

    with asset(SHIPPED_MODEL) as folder, asset(HELDOUT) as heldout:
        images, _ = read_heldout(heldout)
        processor = vit_core.ViTImageProcessor.from_pretrained(folder)
        pixels = processor(list(images), return_tensors="np")["pixel_values"]
        digits = compare(folder, pixels, "digits (trained, held-out)")
    with tempfile.TemporaryDirectory() as tmp:
        write_random_folder(name, Path(tmp))
        photo = compare(Path(tmp), photos(224), f"{name} (random weights), photos")
    return digits | photo


def int8_table(accuracy: dict[str, dict[str, float]]) -> str:
    lines = [
        "| int8 vs float32 | images scored | top-1 agreement | max logit diff "
        "| float32 logit range | float32 median top-1 margin |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {what} | {m['images']:.0f} | {100 * m['top1_agreement']:.1f} % | "
        f"{m['max_logit_diff']:.3g} | {m['logit_range']:.3g} | {m['median_top1_margin']:.3g} |"
        for what, m in accuracy.items()
    ]
    return "\n".join(lines)


def write_random_folder(name: str, folder: Path) -> ViTConfig:
    """A canonical folder with random weights (speed does not depend on their values)."""
    import torch

    from vit_torch import ViTForImageClassification

    config = ViTConfig.from_name(MODELS[name], num_labels=1000, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    return config


def measure(name: str, batches: list[int], rounds: int) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = write_random_folder(name, Path(tmp))
        runners = {impl: build(name, Path(tmp)) for impl, build in IMPLEMENTATIONS.items()}
        rss = {impl: child_peak_rss(impl, name, max(batches), Path(tmp)) for impl in runners}
    flop = gflop_per_image(config)
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        times: dict[str, list[float]] = {impl: [] for impl in runners}
        reps = {}
        for impl, run in runners.items():  # warm-up: jit compiles, allocator settles
            run(x)
            start = time.perf_counter()
            run(x)
            reps[impl] = max(1, round(MIN_ROUND_SECONDS / (time.perf_counter() - start)))
        impls = list(runners)
        for r in range(rounds):
            for impl in impls[r % len(impls) :] + impls[: r % len(impls)]:
                gc.collect()
                start = time.perf_counter()
                for _ in range(reps[impl]):
                    runners[impl](x)
                times[impl].append((time.perf_counter() - start) / reps[impl])
        for impl in runners:
            results.append(Result(name, impl, batch, times[impl], rss[impl], flop))
            rate = batch / statistics.median(times[impl])
            print(f"  {name} batch {batch:2d} {impl:16s} {rate:7.2f} img/s")
    return results


# ---------------------------------------------------------------------- reporting
def table(results: list[Result], peak: float) -> str:
    peers = ("timm", "hf-torch", "hf-flax", "ours-torch")  # every row's ratio to each
    lines = [
        "| model | batch | impl | img/s | latency ms | peak RSS MiB | % of matmul peak | "
        + " | ".join(f"x {p}" for p in peers)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(peers),
    ]
    for r in results:
        same = {o.impl: o for o in results if o.model == r.model and o.batch == r.batch}
        ratios = [f"{r.images_per_second / same[p].images_per_second:.2f}" for p in peers]
        lines.append(
            f"| {r.model} | {r.batch} | {r.impl} | {r.images_per_second:.2f} | "
            f"{1000 * r.median:.1f} | {r.peak_rss_mib:.0f} | "
            f"{100 * r.images_per_second * r.gflop_per_image / peak:.0f} % | "
            + " | ".join(ratios)
            + " |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.model, r.batch) for r in results})
    impls = list(dict.fromkeys(r.impl for r in results))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.4))
    for ax, (model, batch) in zip(np.atleast_1d(axes), groups, strict=True):
        values = [
            next(
                r.images_per_second
                for r in results
                if (r.model, r.batch, r.impl) == (model, batch, i)
            )
            for i in impls
        ]
        colors = ["tab:blue" if i.startswith("ours") else "tab:gray" for i in impls]
        ax.bar(range(len(impls)), values, color=colors)
        ax.set_xticks(range(len(impls)), impls, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"ViT-{model}, batch {batch}", fontsize=9)
        ax.set_ylabel("images / s", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def render(payload: dict[str, Any]) -> str:
    """The report of one `make bench` run (bench.md, and the README's speed section)."""
    fields = {f.name for f in dataclasses.fields(Result)}
    results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in payload["results"]]
    machine = payload["machine"]
    return "\n\n".join(
        [
            f"{machine['cpu']}, {machine['threads']} torch threads, torch {machine['torch']}, "
            f"jax {machine['jax']}; float32 matmul peak {payload['matmul_gflops']:.1f} GFLOP/s "
            "(the best sgemm rate before and after the rounds); "
            f"median of {len(results[0].seconds)} interleaved rounds.",
            table(results, payload["matmul_gflops"]),
            loading_table(payload["loading"]),
            int8_table(payload["int8_accuracy"]),
        ]
    )


def machine() -> dict[str, Any]:
    import jax
    import torch

    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(
        r"^model name\s*:\s*(.+)$", cpuinfo.read_text() if cpuinfo.exists() else "", re.M
    )
    cpu = names[0] if names else platform.machine()
    return {
        "cpu": f"{os.cpu_count()} x {cpu} ({torch.backends.cpu.get_cpu_capability()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "jax": jax.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    payload: dict[str, Any] = {"machine": machine()}
    before = matmul_gflops()
    print(f"{payload['machine']}; float32 matmul rate {before:.1f} GFLOP/s")
    results = [r for name in args.models for r in measure(name, args.batches, args.rounds)]
    after = matmul_gflops()  # the machine's speed drifts: the peak is the better of the two
    print(f"float32 matmul rate after the rounds {after:.1f} GFLOP/s")
    payload["matmul_gflops"] = max(before, after)
    payload["results"] = [{**asdict(r), "images_per_second": r.images_per_second} for r in results]
    payload["loading"] = measure_loading(args.models[0])
    payload["int8_accuracy"] = measure_int8_accuracy(args.models[0])
    report = render(payload)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "bench.md").write_text(report + "\n")
    plot(results, args.out / "bench.png")
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
