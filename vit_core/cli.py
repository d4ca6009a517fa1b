"""The command line: `python -m vit_core demo` and `python -m vit_core predict IMAGE...`.

`demo` is the end-to-end proof a user can run in seconds: one safetensors file, loaded by
both twins, classifies the same preprocessed digits with the same answers. `predict` is the
smallest useful tool on top of `vit_core.load`. Errors the package foresees (`ViTError`)
end as one `error: ...` line and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import vit_core
from vit_core.config import ViTConfig
from vit_core.errors import ImageError, ViTError

BACKENDS = ("torch", "flax")
SHIPPED_MODEL = "vit-digits"
HELDOUT = "digits_heldout.npz"
MIN_ACCURACY = 0.95  # the demo's pass mark; the shipped model scores about 98.6 %
EXAMPLES, MISTAKES = 3, 2  # lines of each kind the demo shows
PROG = "python -m vit_core"


# ------------------------------------------------------------------------ assets
def _copy_tree(resource: Any, target: Path) -> Path:
    """Copy a package-data folder out of a zip (or other loader) onto the file system."""
    if resource.is_dir():
        target.mkdir(parents=True)
        for child in resource.iterdir():
            _copy_tree(child, target / child.name)
    else:
        with resource.open("rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


@contextlib.contextmanager
def asset(name: str) -> Iterator[Path]:
    """A file or folder of `vit_core/assets` as a real path, wherever the package lives.

    `importlib.resources` rather than `__file__`, so a zipped install works too; there the
    asset is unpacked into a temp folder for the duration (`as_file` takes folders only
    from Python 3.12 on).
    """
    resource = importlib.resources.files("vit_core") / "assets" / name
    if isinstance(resource, Path):  # an ordinary install: already on disk
        if not resource.exists():
            raise vit_core.CheckpointError(
                f"{resource}: shipped asset missing; reinstall the package, or re-create it "
                "with `make train-digits`"
            )
        yield resource
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield _copy_tree(resource, Path(tmp) / name)


def read_heldout(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 8, 8) in 0..255, int64 labels (N,)) of the shipped held-out split."""
    with np.load(path) as data:
        return data["images"], data["labels"]


# ------------------------------------------------------------------------- model
def processor_for(model_path: Path, config: ViTConfig) -> Any:
    """The folder's `preprocessor_config.json`, or a default one sized for the model.

    The default is HF's ViT processor (resize, rescale 1/255, mean = std = 0.5) but at the
    model's `image_size`, not HF's 224, so that a folder without a processor still runs.
    """
    from vit_core.processing import PROCESSOR_NAME, ViTImageProcessor

    folder = model_path if model_path.is_dir() else model_path.parent
    if (folder / PROCESSOR_NAME).is_file():
        return ViTImageProcessor.from_pretrained(folder)
    height, width = config.image_hw
    return ViTImageProcessor(size={"height": height, "width": width})


def logits_of(model: Any, backend: str, pixel_values: np.ndarray) -> np.ndarray:
    """float32 logits (N, K) from either twin, as numpy."""
    if backend == "torch":
        import torch

        with torch.inference_mode():
            return model(torch.from_numpy(pixel_values)).logits.float().numpy()
    return np.asarray(model(pixel_values).logits, dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise probabilities, computed in float64 so tiny ones do not underflow to 0."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------- demo
def _example_line(index: int, label: str, predictions: dict[str, tuple[str, float]]) -> str:
    guesses = "   ".join(f"{b} {name} ({100 * p:.2f} %)" for b, (name, p) in predictions.items())
    wrong = any(name != label for name, _ in predictions.values())
    return f"  #{index:<4} true {label}   {guesses}" + ("   <- wrong" if wrong else "")


def _examples(
    labels: np.ndarray, logits: dict[str, np.ndarray], names: dict[int, str]
) -> list[str]:
    """A few correct predictions and the first mistakes, one line each."""
    probs = {b: softmax(v) for b, v in logits.items()}
    preds = {b: v.argmax(axis=-1) for b, v in logits.items()}
    wrong = np.flatnonzero(np.any([p != labels for p in preds.values()], axis=0))
    shown = dict.fromkeys([*range(min(EXAMPLES, len(labels))), *wrong[:MISTAKES].tolist()])
    return [
        _example_line(
            i,
            names[int(labels[i])],
            {b: (names[int(preds[b][i])], float(probs[b][i, preds[b][i]])) for b in logits},
        )
        for i in shown
    ]


def run_demo(args: argparse.Namespace) -> int:
    """Both twins on the shipped held-out digits: accuracy each, and whether they agree."""
    with asset(SHIPPED_MODEL) as folder, asset(HELDOUT) as heldout:
        images, labels = read_heldout(heldout)
        models = {b: vit_core.load(folder, backend=b) for b in BACKENDS}
        config = models["torch"].config
        # Preprocessed once: both twins see the very same float32 array.
        pixels = processor_for(folder, config)(list(images), return_tensors="np")["pixel_values"]
    logits = {b: logits_of(m, b, pixels) for b, m in models.items()}
    preds = {b: v.argmax(axis=-1) for b, v in logits.items()}
    n = len(labels)
    print(
        f"ViT digits demo: {n} held-out 8x8 digits, one model.safetensors "
        f"({parameter_count(models['torch']):,} parameters) read by PyTorch and by Flax"
    )
    accuracy = {}
    for backend in BACKENDS:
        correct = int((preds[backend] == labels).sum())
        accuracy[backend] = correct / n
        print(f"{backend + ' accuracy:':16}{100 * correct / n:6.2f} % ({correct}/{n})")
    differ = np.flatnonzero(preds["torch"] != preds["flax"])
    listed = f" (images {', '.join(map(str, differ.tolist()))})" if len(differ) else ""
    print(f"predictions that differ between backends: {len(differ)}{listed}")
    print(f"max abs logit difference: {np.abs(logits['torch'] - logits['flax']).max():.2e}")
    print("examples:")
    print("\n".join(_examples(labels, logits, config.id2label)))
    return _verdict(accuracy, len(differ))


def _verdict(accuracy: dict[str, float], differ: int) -> int:
    """0 when both twins clear the pass mark and agree on every image; 1 with the reason."""
    problems = [
        f"{b} accuracy {100 * a:.2f} % is below {100 * MIN_ACCURACY:.0f} %"
        for b, a in accuracy.items()
        if a < MIN_ACCURACY
    ]
    if differ:
        problems.append(f"the backends disagree on {differ} prediction(s)")
    if problems:
        print(f"demo FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    print(f"OK: both backends >= {100 * MIN_ACCURACY:.0f} % and agree on every prediction")
    return 0


# ----------------------------------------------------------------------- predict
def open_image(path: Path) -> Any:
    """A decoded, upright PIL image, or an `ImageError` that names the file.

    The EXIF orientation is applied (phones store photos sideways and say so in a tag), as
    an image viewer shows the photo. PIL's decompression-bomb guard stays on: an image of
    more than twice `PIL.Image.MAX_IMAGE_PIXELS` pixels is refused before it is decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not mid-batch
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image format PIL can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({exc})") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read the image ({exc})") from None


def run_predict(args: argparse.Namespace) -> int:
    """Top-k labels with probabilities for each image."""
    images = [open_image(path) for path in args.images]  # cheap checks before the model
    with contextlib.ExitStack() as stack:
        folder = args.model or stack.enter_context(asset(SHIPPED_MODEL))
        model = vit_core.load(folder, backend=args.backend, model_type="classification")
        processor = processor_for(Path(folder), model.config)
    probs = softmax(logits_of(model, args.backend, processor(images)["pixel_values"]))
    k = min(args.top_k, probs.shape[-1])
    for path, row in zip(args.images, probs, strict=True):
        print(f"{path}:")
        for rank, index in enumerate(np.argsort(-row, kind="stable")[:k], start=1):
            print(f"  {rank}. {100 * row[index]:6.2f} %  {model.config.id2label[int(index)]}")
    return 0


# -------------------------------------------------------------------------- info
def run_info(args: argparse.Namespace) -> int:
    """Describe a model folder from its header and config, without loading a tensor."""
    from vit_core.info import folder_info, format_info

    info = folder_info(args.folder)
    if args.json:
        print(json.dumps({**info, "config": info["config"].to_dict()}, indent=2))
    else:
        print(format_info(info))
    return 0


# ------------------------------------------------------------------------ parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _subcommand(
    subparsers: Any, name: str, summary: str, example: str, run: Callable[..., int]
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Accepted after the subcommand too; SUPPRESS keeps it from resetting a global --debug.
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Vision Transformer twins (PyTorch and Flax) from one safetensors file.",
        epilog=f"examples:\n  {PROG} demo\n  {PROG} predict digit.png --backend flax\n"
        f"  {PROG} info vit_core/assets/vit-digits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {vit_core.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _subcommand(
        subparsers,
        "demo",
        "classify the shipped held-out digits with both backends and compare them",
        f"{PROG} demo",
        run_demo,
    )
    predict = _subcommand(
        subparsers,
        "predict",
        "print the top-k labels of each image",
        f"{PROG} predict cat.jpg dog.png --model ./vit-base-patch16-224 --backend flax --top-k 3",
        run_predict,
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    predict.add_argument(
        "--model",
        type=Path,
        help="model folder (model.safetensors + config.json [+ preprocessor_config.json]); "
        "default: the shipped 8x8 digits model",
    )
    predict.add_argument("--backend", choices=BACKENDS, default="torch", help="default: torch")
    predict.add_argument("--top-k", type=_positive_int, default=5, help="default: 5")
    info = _subcommand(
        subparsers,
        "info",
        "describe a model folder: architecture, parameters, file, dtypes, compatibility",
        f"{PROG} info ./vit-base-patch16-224 --json",
        run_info,
    )
    info.add_argument("folder", type=Path, metavar="FOLDER", help="model folder or .safetensors")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; package errors become `error: ...` and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ViTError, ImportError) as exc:  # ImportError: a backend's framework is missing
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
