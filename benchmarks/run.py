"""Side-by-side inference speed: our twins against timm and transformers, one process.

    python benchmarks/run.py [--rounds 7] [--out DIR]   # `make bench`: the full report
    python benchmarks/run.py --quick                    # a developer's loop, < 2 minutes

Every implementation runs the same architecture in float32 on the CPU. Rounds are
interleaved (each round times every implementation once, in a rotating order), and
every comparison is paired: the ratio of two implementations is taken round by round
(the same minute, the same machine state) and reported as the median of those ratios
with their min and max; a range that holds 1.0 is "within noise". The float32 sgemm
rate is measured in the same process right before and after the rounds, and "% of
matmul peak" is against the better of the two. Peak RSS is that of a separate, fresh
process that loads only that implementation and runs the largest batch (one process
holding every model cannot tell them apart). Compiled implementations compile each
batch size in their warm-up call, which is not timed.
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

# Models by their short name: the config (`ViTConfig.from_name` + overrides) and timm's.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "B/16": ("vit-base-patch16-224", {}),
    "Ti/16": ("vit-tiny-patch16-224", {}),
    "B/14": ("vit-base-patch16-224", {"patch_size": 14}),  # DINOv2's grid, plain blocks
}
TIMM_NAMES = {"B/16": "vit_base_patch16_224", "Ti/16": "vit_tiny_patch16_224"}
TIMM_NAMES["B/14"] = TIMM_NAMES["B/16"]
Runner = Callable[[np.ndarray], object]
MIN_ROUND_SECONDS = 0.3  # fast calls repeat within a round so timer noise stays small
# A pause before each timing: the previous impl's idle threads (OpenMP's, XLA's Eigen
# pool) spin-wait for a while after their work, and would steal the next impl's cores.
SETTLE_SECONDS = 0.5
PEERS = ("timm", "timm-compiled", "hf-torch", "ours-torch")  # every row's ratio to each
EAGER_PEERS = ("timm", "hf-torch", "hf-flax")  # "best peer": the fastest of these


@dataclass(frozen=True)
class Case:
    """One measured setting: a model at an image size and batch."""

    model: str
    batch: int
    size: int = 224


@dataclass
class Result:
    model: str
    impl: str
    batch: int
    seconds: list[float]  # per round, paired with every other impl's of the same case
    peak_rss_mib: float | None
    gflop_per_image: float
    size: int = 224

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median

    @property
    def case(self) -> Case:
        return Case(self.model, self.batch, self.size)

    def percent_of_peak(self, peak_gflops: float) -> float:
        """The share of the machine's float32 matmul rate this row's flop rate is."""
        return 100 * self.images_per_second * self.gflop_per_image / peak_gflops


@dataclass(frozen=True)
class Ratio:
    """How many times faster one impl ran than another: the median of the per-round
    ratios (each round times both back to back, so drift in the machine's speed cancels),
    with their min and max. Within noise when that range holds 1.0."""

    median: float
    low: float
    high: float

    @classmethod
    def paired(cls, row: Result, peer: Result) -> Ratio:
        return cls.of(row.seconds, peer.seconds)

    @classmethod
    def of(cls, mine: list[float], theirs: list[float]) -> Ratio:
        """theirs / mine, round by round (> 1: `mine` took less time, or memory)."""
        ratios = [t / m for m, t in zip(mine, theirs, strict=True)]
        return cls(statistics.median(ratios), min(ratios), max(ratios))

    @property
    def within_noise(self) -> bool:
        return self.low <= 1.0 <= self.high

    def __str__(self) -> str:
        return f"{self.median:.2f} ({self.low:.2f}-{self.high:.2f})"


def config_for(model: str, size: int, **fields: Any) -> ViTConfig:
    """`model` at `size` px with 1000 classes and timm's LayerNorm eps; `fields` changed."""
    name, overrides = MODELS[model]
    return ViTConfig.from_name(
        name, num_labels=1000, layer_norm_eps=1e-6, image_size=size, **{**overrides, **fields}
    )


def gflop_per_image(config: ViTConfig) -> float:
    """Multiply-adds x 2 of one forward pass: patch projection, attention, MLP, head
    (a MAP head's one query is left out: under 1 % of a layer)."""
    d, m, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    grid_h, grid_w = config.grid_hw
    patches = grid_h * grid_w
    tokens = patches + config.num_prefix_tokens
    ph, pw = config.patch_hw
    patch = patches * d * config.num_channels * ph * pw
    mlp = config.mlp_in_width * d + d * m  # fc1 (gated: two halves) and fc2
    per_layer = tokens * (4 * d * d + mlp) + 2 * tokens * tokens * d
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
    return proc_status_mib("VmHWM")


def proc_status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (`VmHWM`: peak RSS, `VmRSS`:
    RSS now), in MiB; NaN where there is no /proc."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(f"{field}:"):
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

    def make(model: str, folder: Path) -> Runner:
        import vit_core
        from vit_core.backend import get_backend

        calibrated = options.get("quantize") == "int8-static"  # on the real photos
        size = ViTConfig.from_json_file(folder / "config.json").image_size
        extra = {"calibration": photos(size)} if calibrated else {}
        loaded = vit_core.load(folder, backend=backend, **options, **extra)
        run = get_backend(backend).run
        return lambda x: run(loaded, x)

    return make


def _timm(compiled: bool) -> Callable[[str, Path], Runner]:
    """timm's model of the same architecture (its own random weights: speed does not
    depend on the values); `compiled`: under torch.compile with the same inductor
    settings as ours (frozen weights), so the comparison is like for like."""

    def make(model: str, folder: Path) -> Runner:
        import timm
        import torch

        config = ViTConfig.from_json_file(folder / "config.json")
        net = timm.create_model(
            TIMM_NAMES[model],
            pretrained=False,
            img_size=config.image_size,
            patch_size=config.patch_size,
        ).eval()
        if not compiled:
            return _torch_runner(net)
        from vit_torch.compiled import compiling

        forward = torch.compile(net, dynamic=False)

        def run(x: np.ndarray) -> object:
            with torch.no_grad(), compiling():
                return forward(torch.from_numpy(x))

        return run

    return make


def _hf_torch(model: str, folder: Path) -> Runner:
    import transformers

    cls = transformers.ViTForImageClassification
    return _torch_runner(cls.from_pretrained(folder, attn_implementation="sdpa").eval())


def _hf_flax(model: str, folder: Path) -> Runner:
    import jax
    import transformers

    net = transformers.FlaxViTForImageClassification.from_pretrained(folder, from_pt=True)
    forward = jax.jit(lambda params, x: net(x, params=params).logits)
    return lambda x: forward(net.params, x).block_until_ready()


# ONNX: what a user deploys is the exported file, run by onnxruntime on the CPU in float32
# (graph optimisations on, intra-op spinning off: idle threads sleep between ops, so the
# session does not take the cores from the rows timed after it). A deployment path, not a
# speed claim: these rows measure onnxruntime's kernels on our exported graph.
ONNX_INT8_OPS = ["MatMul"]  # the encoder's Linear layers, as our torch int8 quantizes


def onnx_files(folder: Path, out: Path) -> tuple[Path, Path]:
    """(float32, dynamic int8) `.onnx` files of `folder`'s model in `out`, made once: the
    float32 one as `python -m vit_core export` makes it (checked against the twin), the
    int8 one from it by onnxruntime's `quantize_dynamic`, per output channel, on the
    encoder's matmuls (patch projection and head stay float32, as in our torch int8)."""
    graph, int8 = out / "model.onnx", out / "model-int8.onnx"
    if not graph.exists():
        from vit_core.export import export_model

        export_model(folder, "onnx", graph)
    if not int8.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            graph,
            int8,
            op_types_to_quantize=ONNX_INT8_OPS,
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    return graph, int8


def _ours_onnx(int8: bool) -> Callable[[str, Path], Runner]:
    """Our exported graph (float32, or onnxruntime's dynamic int8 of it) through the onnx
    backend, as `predict --backend onnx` runs it; the files are written beside the
    folder's weights once, so a child process measuring memory only loads them."""

    def make(model: str, folder: Path) -> Runner:
        import vit_core
        from vit_core.backend import get_backend

        graph, quantized = onnx_files(folder, folder)
        loaded = vit_core.load(quantized if int8 else graph, backend="onnx")
        run = get_backend("onnx").run
        return lambda x: run(loaded, x)

    return make


# Every implementation of a model, all from the same weights where the library allows.
IMPLEMENTATIONS: dict[str, Callable[[str, Path], Runner]] = {
    "ours-torch": _ours("torch"),
    "ours-torch-compiled": _ours("torch", compile=True),  # each batch size compiles once
    "ours-int8": _ours("torch", quantize="int8"),
    "ours-int8-static": _ours("torch", quantize="int8-static"),
    "ours-flax": _ours("flax"),
    "ours-onnx": _ours_onnx(int8=False),
    "ours-onnx-int8": _ours_onnx(int8=True),
    "timm": _timm(compiled=False),
    "timm-compiled": _timm(compiled=True),
    "hf-torch": _hf_torch,
    "hf-flax": _hf_flax,
}
COMPILING = ("ours-torch-compiled", "ours-int8-static", "timm-compiled")  # minutes each
QUICK = tuple(impl for impl in IMPLEMENTATIONS if impl not in COMPILING)
SCALING = ("ours-torch", "ours-flax", "timm", "hf-torch")
# The headline cases (every implementation, peak RSS, loading, int8 accuracy) ...
MAIN_CASES = tuple(Case(m, b) for m in ("B/16", "Ti/16") for b in (1, 8))
QUICK_CASES = (Case("B/16", 8), Case("Ti/16", 8))
# ... and how speed scales with batch and image size (the eager implementations).
SCALING_CASES = (
    Case("B/16", 32),
    Case("B/16", 1, 384),
    Case("B/16", 8, 384),
    Case("B/14", 1, 518),
)


def child_peak_rss(impl: str, name: str, batch: int, folder: Path) -> float:
    """Peak RSS (MiB) of a fresh process that loads only `impl` and runs one batch."""
    script = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); from benchmarks.run import *; "
        "run = IMPLEMENTATIONS[sys.argv[2]](sys.argv[3], Path(sys.argv[5])); "
        "size = ViTConfig.from_json_file(Path(sys.argv[5]) / 'config.json').image_size; "
        "x = np.zeros((int(sys.argv[4]), 3, size, size), np.float32); run(x); run(x); "
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
            rows = {}
            for form in ("int8", "int8-static"):
                extra = {"calibration": calibration} if form == "int8-static" else {}
                model = vit_core.load(folder, backend="torch", quantize=form, **extra)
                rows[f"{form}, {what}"] = int8_agreement(full, model(scored).logits.numpy())
        rows[f"onnxruntime int8, {what}"] = onnx_int8_agreement(folder, pixels[1::2], full)
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


def int8_agreement(full: np.ndarray, int8: np.ndarray) -> dict[str, float]:
    """How far int8 logits are from the float32 ones, on the same images (a row of
    `int8_table`)."""
    top2 = np.sort(full, axis=1)[:, -2:]
    return {
        "images": len(full),
        "top1_agreement": float(np.mean(full.argmax(1) == int8.argmax(1))),
        "max_logit_diff": float(np.abs(full - int8).max()),
        "logit_range": float(np.ptp(full)),
        "median_top1_margin": float(np.median(top2[:, 1] - top2[:, 0])),
    }


def onnx_int8_agreement(folder: Path, scored: np.ndarray, full: np.ndarray) -> dict[str, float]:
    """onnxruntime's dynamic int8 of `folder`'s exported graph (`onnx_files`) on `scored`,
    against the float32 twin's logits `full` of the same images."""
    import vit_core
    from vit_core.backend import get_backend

    with tempfile.TemporaryDirectory() as tmp:
        _, int8 = onnx_files(folder, Path(tmp))
        logits = get_backend("onnx").run(vit_core.load(int8, backend="onnx"), scored)["logits"]
    return int8_agreement(full, logits)


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


def write_random_folder(model: str, folder: Path, size: int = 224, **fields: Any) -> ViTConfig:
    """A canonical folder with random weights (speed does not depend on their values) of
    `config_for(model, size, **fields)`."""
    import torch

    from vit_torch import ViTForImageClassification

    config = config_for(model, size, **fields)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(folder)
    return config


def measure(cases: list[Case], impls: tuple[str, ...], rounds: int, with_rss: bool) -> list[Result]:
    """Every impl on every case, in interleaved rounds: each round times each impl once,
    in a rotating order, so every pair of impls is timed under the same machine state."""
    results: list[Result] = []
    for model, size in dict.fromkeys((c.model, c.size) for c in cases):
        batches = [c.batch for c in cases if (c.model, c.size) == (model, size)]
        with tempfile.TemporaryDirectory() as tmp:
            config = write_random_folder(model, Path(tmp), size)
            runners = {impl: IMPLEMENTATIONS[impl](model, Path(tmp)) for impl in impls}
            times = {b: time_rounds(runners, b, size, rounds, model) for b in batches}
            del runners
            gc.collect()
            # after the rounds, so each child finds inductor's code cache warm
            rss = {
                impl: child_peak_rss(impl, model, max(batches), Path(tmp)) if with_rss else None
                for impl in impls
            }
        flop = gflop_per_image(config)
        results += [
            Result(model, impl, b, times[b][impl], rss[impl], flop, size)
            for b in batches
            for impl in impls
        ]
    return results


def time_rounds(
    runners: dict[str, Runner],
    batch: int,
    size: int,
    rounds: int,
    model: str,
    place: Callable[[str, np.ndarray], Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each runner, round by round. `place(impl, pixels)`: the input
    that impl's runner takes, made once before the rounds (default: the numpy pixels)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    inputs = {impl: x if place is None else place(impl, x) for impl in runners}
    reps = {}
    for impl, run in runners.items():  # warm-up: compiles, allocator settles
        run(inputs[impl])
        start = time.perf_counter()
        run(inputs[impl])
        reps[impl] = max(1, round(MIN_ROUND_SECONDS / (time.perf_counter() - start)))
    times: dict[str, list[float]] = {impl: [] for impl in runners}
    impls = list(runners)
    for r in range(rounds):
        for impl in impls[r % len(impls) :] + impls[: r % len(impls)]:
            gc.collect()
            time.sleep(SETTLE_SECONDS)
            start = time.perf_counter()
            for _ in range(reps[impl]):
                runners[impl](inputs[impl])
            times[impl].append((time.perf_counter() - start) / reps[impl])
    for impl, seconds in times.items():
        rate = batch / statistics.median(seconds)
        print(f"  {model} {size} batch {batch:2d} {impl:20s} {rate:7.2f} img/s", flush=True)
    return times


# ---------------------------------------------------------------------- reporting
def verdict(row: Result, same: dict[str, Result]) -> str:
    """Against the fastest eager peer of the case: ahead, behind, or within noise."""
    peers = [same[p] for p in EAGER_PEERS if p in same and p != row.impl]
    if not row.impl.startswith("ours") or not peers:
        return ""
    best = max(peers, key=lambda r: r.images_per_second)
    ratio = Ratio.paired(row, best)
    word = "within noise of" if ratio.within_noise else "ahead of" if ratio.median > 1 else "behind"
    return f"{word} {best.impl}: {ratio}"


def table(results: list[Result], peak: float) -> str:
    lines = [
        "| model | size | batch | impl | img/s | latency ms | peak RSS MiB | % of matmul peak | "
        + " | ".join(f"x {p}" for p in PEERS)
        + " | vs the fastest eager peer |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(PEERS) + "---|",
    ]
    for r in results:
        same = {o.impl: o for o in results if o.case == r.case}
        ratios = [str(Ratio.paired(r, same[p])) if p in same and p != r.impl else "" for p in PEERS]
        rss = "" if r.peak_rss_mib is None else f"{r.peak_rss_mib:.0f}"
        lines.append(
            f"| {r.model} | {r.size} | {r.batch} | {r.impl} | {r.images_per_second:.2f} | "
            f"{1000 * r.median:.1f} | {rss} | "
            f"{r.percent_of_peak(peak):.0f} % | " + " | ".join(ratios) + f" | {verdict(r, same)} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], peak: float, path: Path) -> None:
    """Images/s per case (one panel each) and, last, % of the matmul peak across cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in results))
    impls = list(dict.fromkeys(r.impl for r in results))
    fig, axes = plt.subplots(1, len(cases) + 1, figsize=(2.6 * (len(cases) + 1), 3.6))
    for ax, case in zip(axes[:-1], cases, strict=True):
        rows = [r for r in results if r.case == case]
        ax.bar(
            range(len(rows)),
            [r.images_per_second for r in rows],
            color=["tab:blue" if r.impl.startswith("ours") else "tab:gray" for r in rows],
        )
        ax.set_xticks(range(len(rows)), [r.impl for r in rows], rotation=60, ha="right")
        ax.tick_params(labelsize=6)
        ax.set_title(f"{case.model} {case.size}px, batch {case.batch}", fontsize=8)
        ax.set_ylabel("images / s", fontsize=7)
    scaling = axes[-1]
    labels = [f"{c.model} {c.size} b{c.batch}" for c in cases]
    for impl in impls:
        points = [
            (i, r.percent_of_peak(peak))
            for i, case in enumerate(cases)
            for r in results
            if r.case == case and r.impl == impl
        ]
        xs, ys = zip(*points, strict=True)
        scaling.plot(xs, ys, marker="o", label=impl, linewidth=1)
    scaling.set_xticks(range(len(cases)), labels, rotation=60, ha="right")
    scaling.tick_params(labelsize=6)
    scaling.set_ylabel("% of float32 matmul peak", fontsize=7)
    scaling.set_title("scaling", fontsize=8)
    scaling.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def render(payload: dict[str, Any]) -> str:
    """The report of one `make bench` run (bench.md, and the README's speed section)."""
    fields = {f.name for f in dataclasses.fields(Result)}
    results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in payload["results"]]
    machine, before, after = payload["machine"], *payload["matmul_gflops"]
    rounds = sorted({len(r.seconds) for r in results})
    parts = [
        f"{machine['cpu']}, {machine['threads']} torch threads, torch {machine['torch']}, "
        f"jax {machine['jax']}; float32 matmul peak {max(before, after):.1f} GFLOP/s "
        f"(sgemm in the same process: {before:.1f} before the rounds, {after:.1f} after); "
        f"{' or '.join(map(str, rounds))} interleaved rounds. A ratio is the median of the "
        "per-round ratios (min-max); > 1: the row is faster.",
        table(results, max(before, after)),
    ]
    if "loading" in payload:
        parts += [loading_table(payload["loading"]), int8_table(payload["int8_accuracy"])]
    return "\n\n".join(parts)


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


# ---------------------------------------------------------------------- on a GPU
# `--device cuda`: ViT-B/16 at batch 64, every row in bfloat16 with attention through
# torch's SDPA (flash attention on the GPU) or XLA's fusion, the pixels on the GPU before
# the rounds (the model alone is timed, not the copy in), every call synchronised.
CUDA_CASE = Case("B/16", 64)


def cuda_matmul_gflops(seconds: float = 1.0) -> float:
    """The GPU's bfloat16 matmul rate through torch (cuBLAS), the ceiling for the CUDA
    rows: the best of a square GEMM and ViT-B/16's largest one (fc1 at batch 64)."""
    import torch

    best = 0.0
    for m, k, n in ((8192, 8192, 8192), (64 * 197, 768, 3072)):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(10):  # launches queue up; the clock reads after they finish
                a @ b
            torch.cuda.synchronize()
            count += 10
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
    return best


def jax_gpu() -> Any:
    """jax's first GPU, or None where jax has no CUDA (a CPU-only jaxlib)."""
    import jax

    try:
        return jax.local_devices(backend="gpu")[0]
    except RuntimeError:
        return None


def _synchronised(net: Any) -> Runner:
    """A torch model called on a GPU tensor, returning once the GPU has finished."""
    import torch

    def run(x: Any) -> object:
        with torch.inference_mode():
            out = net(x)
        torch.cuda.synchronize()
        return out

    return run


def _cuda_ours(model: str, folder: Path) -> Runner:
    import vit_core

    return _synchronised(vit_core.load(folder, device="cuda", dtype="bfloat16"))


def _cuda_flax(model: str, folder: Path) -> Runner:
    import vit_core

    net = vit_core.load(folder, backend="flax", device=jax_gpu(), dtype="bfloat16")
    return lambda x: net(x).logits.block_until_ready()


def _cuda_timm(model: str, folder: Path) -> Runner:
    import timm
    import torch

    config = ViTConfig.from_json_file(folder / "config.json")
    net = timm.create_model(
        TIMM_NAMES[model], pretrained=False, img_size=config.image_size, patch_size=16
    )
    return _synchronised(net.eval().to("cuda", torch.bfloat16))


def _cuda_hf(model: str, folder: Path) -> Runner:
    import torch
    import transformers

    net = transformers.ViTForImageClassification.from_pretrained(folder, attn_implementation="sdpa")
    return _synchronised(net.eval().to("cuda", torch.bfloat16))


CUDA_IMPLEMENTATIONS: dict[str, Callable[[str, Path], Runner]] = {
    "ours-torch": _cuda_ours,
    "ours-flax": _cuda_flax,  # where jax has CUDA
    "timm": _cuda_timm,
    "hf-torch": _cuda_hf,
}


def _cuda_input(impl: str, pixels: np.ndarray) -> Any:
    """The batch as `impl` takes it on the GPU, in bfloat16: a jax array for the Flax
    twin, a torch tensor for the rest."""
    if impl == "ours-flax":
        import jax
        import jax.numpy as jnp

        return jax.device_put(pixels.astype(jnp.bfloat16), jax_gpu())
    import torch

    return torch.from_numpy(pixels).to("cuda", torch.bfloat16)


def measure_on_cuda(rounds: int) -> list[Result]:
    """`CUDA_CASE` with every implementation of `CUDA_IMPLEMENTATIONS` this machine runs,
    in interleaved rounds (as `measure`)."""
    case = CUDA_CASE
    impls = [impl for impl in CUDA_IMPLEMENTATIONS if impl != "ours-flax" or jax_gpu()]
    if "ours-flax" not in impls:
        print("  ours-flax left out: jax has no CUDA here (pip install 'jax[cuda12]')")
    with tempfile.TemporaryDirectory() as tmp:
        config = write_random_folder(case.model, Path(tmp), case.size)
        runners = {impl: CUDA_IMPLEMENTATIONS[impl](case.model, Path(tmp)) for impl in impls}
        times = time_rounds(runners, case.batch, case.size, rounds, case.model, _cuda_input)
    flop = gflop_per_image(config)
    return [Result(case.model, i, case.batch, times[i], None, flop, case.size) for i in impls]


def render_cuda(payload: dict[str, Any]) -> str:
    """The report of one `--device cuda` run (bench-cuda.md)."""
    fields = {f.name for f in dataclasses.fields(Result)}
    results = [Result(**{k: v for k, v in r.items() if k in fields}) for r in payload["results"]]
    machine, (before, after) = payload["machine"], payload["matmul_gflops"]
    rounds = sorted({len(r.seconds) for r in results})
    header = (
        f"{machine['gpu']}, torch {machine['torch']}, jax {machine['jax']}; bfloat16 matmul "
        f"peak {max(before, after) / 1000:.0f} TFLOP/s (cuBLAS in the same process: "
        f"{before / 1000:.0f} before the rounds, {after / 1000:.0f} after); "
        f"{' or '.join(map(str, rounds))} interleaved rounds. Every row in bfloat16, "
        "attention through SDPA (torch) or XLA's fusion (Flax), the pixels on the GPU "
        "before the rounds, every call synchronised: the model alone. A ratio is the "
        "median of the per-round ratios (min-max); > 1: the row is faster."
    )
    return "\n\n".join([header, table(results, max(before, after))])


def main_cuda(args: argparse.Namespace) -> int:
    """`--device cuda`: the GPU rows, written to bench-cuda.json and bench-cuda.md."""
    import torch

    if not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU here", file=sys.stderr)
        return 2
    # jax takes 75 % of the GPU's memory at its start unless told not to; torch shares it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    payload: dict[str, Any] = {"machine": {**machine(), "gpu": torch.cuda.get_device_name()}}
    before = cuda_matmul_gflops()
    print(f"{payload['machine']}; bfloat16 matmul rate {before / 1000:.0f} TFLOP/s", flush=True)
    results = measure_on_cuda(3 if args.quick else args.rounds)
    payload["matmul_gflops"] = [before, cuda_matmul_gflops()]
    payload["results"] = [{**asdict(r), "images_per_second": r.images_per_second} for r in results]
    report = render_cuda(payload)
    print(report)
    if args.quick:
        return 0
    write_report(args.out, "bench-cuda", payload, report)
    return 0


def write_report(out: Path, stem: str, payload: dict[str, Any], report: str) -> None:
    """A run's figures as `stem`.json and its report as `stem`.md, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(report + "\n")
    print(f"wrote {out}/{stem}.json, {stem}.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="B/16 and Ti/16 at batch 8, eager impls, 3 rounds; prints, writes nothing",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: ViT-B/16 at batch 64 in bfloat16 on the GPU, ours against timm and "
        "transformers (bench-cuda.json/.md; --quick: 3 rounds, nothing written); "
        "default: the CPU report",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda":
        return main_cuda(args)

    payload: dict[str, Any] = {"machine": machine()}
    before = matmul_gflops()
    print(f"{payload['machine']}; float32 matmul rate {before:.1f} GFLOP/s", flush=True)
    if args.quick:
        results = measure(list(QUICK_CASES), QUICK, 3, with_rss=False)
    else:
        results = measure(list(MAIN_CASES), tuple(IMPLEMENTATIONS), args.rounds, with_rss=True)
        results += measure(list(SCALING_CASES), SCALING, 3, with_rss=False)
    after = matmul_gflops()  # the machine's speed drifts: the peak is the better of the two
    payload["matmul_gflops"] = [before, after]
    payload["results"] = [{**asdict(r), "images_per_second": r.images_per_second} for r in results]
    if not args.quick:
        payload["loading"] = measure_loading(MAIN_CASES[0].model)
        payload["int8_accuracy"] = measure_int8_accuracy(MAIN_CASES[0].model)
    report = render(payload)
    print(report)
    if args.quick:
        return 0
    write_report(args.out, "bench", payload, report)
    plot(results, max(before, after), args.out / "bench.png")
    print(f"wrote {args.out}/bench.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
