"""The command line: `python -m vit_core demo | predict | embed | explain | info | export`.

`demo` is the end-to-end proof a user can run in seconds: one safetensors file, loaded by
both twins, classifies the same preprocessed digits with the same answers. `predict` is the
smallest useful tool on top of `vit_core.load`, and scales to folders: images are streamed
in batches (`vit_core.batching`), never all held at once. `embed` streams them the same
way into an embeddings file (`vit_core.embedding`) that a killed run resumes. `explain`
draws where the model looked (`vit_core.explain`), with the same numpy arithmetic for both
twins. `export` writes a folder as one ONNX or StableHLO file, verified against its twin
before it takes its name (`vit_core.export`). Errors the package foresees (`ViTError`)
end as one `error: ...` line and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import vit_core
from vit_core.backend import ALL_BACKENDS, BACKENDS, DTYPES, REGISTRY, get_backend
from vit_core.batching import softmax
from vit_core.config import ViTConfig
from vit_core.embedding import POOLS, EmbeddingsOutput, EmbedSpec, embed_pixels
from vit_core.errors import ImageError, InputError, ViTError
from vit_core.export import FORMATS
from vit_core.hub import identity, open_source
from vit_core.processing import model_processor, open_image, processor_for
from vit_core.progress import progress_bar

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
    logits = {b: get_backend(b).run(m, pixels)["logits"] for b, m in models.items()}
    preds = {b: v.argmax(axis=-1) for b, v in logits.items()}
    n = len(labels)
    parameters = get_backend("torch").parameter_count(models["torch"])
    print(
        f"ViT digits demo: {n} held-out 8x8 digits, one model.safetensors "
        f"({parameters:,} parameters) read by PyTorch and by Flax"
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
def default_workers() -> int:
    """Decoding workers by default: two, or fewer on a one-core machine."""
    return min(2, os.cpu_count() or 1)


def _result_lines(path: Path, predictions: list[tuple[str, float]]) -> list[str]:
    """`path:` then one `  rank. pp.pp %  label` line per prediction (the printed format)."""
    ranked = enumerate(predictions, start=1)
    return [f"{path}:", *(f"  {r}. {100 * p:6.2f} %  {label}" for r, (label, p) in ranked)]


def _predict_stream(
    args: argparse.Namespace,
    paths: list[Path],
    outputs: Callable[[np.ndarray], dict[str, Any]],
    config: ViTConfig,
    processor: Any,
    writer: Any,
    k: int,
) -> tuple[int, int]:
    """Run every batch, printing or writing each result as it comes: (done, skipped)."""
    from vit_core.batching import top_k

    bar = progress_bar(
        len(paths), enabled=len(paths) > args.batch_size, unit="img", dynamic_ncols=True
    )
    done = skipped = 0
    try:
        stream = get_backend(args.backend).batches
        for batch in stream(paths, processor, args.batch_size, args.workers):
            for _, message in batch.errors:
                if not args.skip_errors:
                    raise ImageError(message)
                bar.write(f"warning: skipped {message}", file=sys.stderr)
                skipped += 1
            if batch.pixels is not None:
                lines = []  # printed once per batch: the bar is redrawn once, not per image
                for index, row in zip(
                    batch.indices, softmax(outputs(batch.pixels)["logits"]), strict=True
                ):
                    predictions = top_k(row, k, config.id2label)
                    if writer is None:
                        lines += _result_lines(paths[index], predictions)
                    else:
                        writer.write(paths[index], predictions)
                if lines:
                    bar.write("\n".join(lines))
                done += len(batch.indices)
            bar.update(len(batch.indices) + len(batch.errors))
    finally:
        bar.close()
    return done, skipped


def _open_model(args: argparse.Namespace, folder: str | Path, **options: Any) -> tuple[Any, Any]:
    """The model `--model` names (a folder, or a repo id from the local Hugging Face cache
    at `--revision`) and its image processor, opened once, so that a cached repo in another
    layout is converted once, in memory (`vit_core.hub.open_source`). An exported graph
    (`--backend onnx`) is a file `load` hands to its backend whole, its processor in it."""
    if REGISTRY[args.backend].exported:
        model = vit_core.load(
            folder, args.backend, revision=args.revision, device=args.device, dtype=args.dtype,
            **options,
        )  # fmt: skip
        return model, model_processor(Path(folder), model)
    source = open_source(folder, args.revision)
    model = vit_core.load(
        source, backend=args.backend, device=args.device, dtype=args.dtype, **options
    )
    return model, source.processor()


def run_predict(args: argparse.Namespace) -> int:
    """Top-k labels with probabilities for each image, streamed in batches.

    Exit status 1 when `--skip-errors` skipped any image, so scripts notice.
    """
    from vit_core.batching import ResultsWriter, expand_inputs

    paths = expand_inputs(args.images)  # cheap checks (files exist) before the model
    with contextlib.ExitStack() as stack:
        folder = args.model or stack.enter_context(asset(SHIPPED_MODEL))
        model, processor = _open_model(
            args, folder, model_type="classification", quantize=args.quantize
        )
    outputs, how = get_backend(args.backend).batch_runner(model, args.workers)
    k = min(args.top_k, model.config.num_labels)
    with contextlib.ExitStack() as stack:
        writer = None
        if args.output is not None:
            writer = stack.enter_context(ResultsWriter(args.output, k))
        done, skipped = _predict_stream(args, paths, outputs, model.config, processor, writer, k)
    if args.output is not None:
        summary = f"wrote {done} predictions to {args.output} (backend {args.backend}, {how})"
        print(summary + (f"; skipped {skipped} unreadable image(s)" if skipped else ""))
    elif skipped:
        print(f"skipped {skipped} unreadable image(s)", file=sys.stderr)
    return 1 if skipped else 0


# ------------------------------------------------------------------------- embed
def _embed_stream(
    args: argparse.Namespace,
    paths: list[Path],
    embed: Callable[[np.ndarray], np.ndarray],
    width: int,
    processor: Any,
    output: Any,
) -> None:
    """Embed every batch and save it in the partial store as it finishes."""
    bar = progress_bar(
        len(paths), enabled=len(paths) > args.batch_size, unit="img", dynamic_ncols=True
    )
    try:
        stream = get_backend(args.backend).batches
        for batch in stream(paths, processor, args.batch_size, args.workers):
            for _, message in batch.errors:
                bar.write(f"warning: could not read {message}", file=sys.stderr)
            output.add(
                [str(paths[i]) for i in batch.indices],
                embed(batch.pixels) if batch.pixels is not None else np.empty((0, width)),
                [(str(paths[i]), message) for i, message in batch.errors],
            )
            bar.update(len(batch.indices) + len(batch.errors))
    finally:
        bar.close()


def _embed_on_ray(args: argparse.Namespace, spec: EmbedSpec) -> int:
    """`embed --ray`: the same rows, computed and written by a Ray cluster as a folder of
    Parquet files (`vit_core.distributed`, docs/distributed.md)."""
    from vit_core.distributed import ray_embed
    from vit_core.embedding import import_pyarrow

    if args.resume:
        raise InputError("--resume is not available with --ray, which writes the whole output")
    if args.revision is not None:
        raise InputError(
            "--revision is not available with --ray: each worker reads --model itself (a repo "
            "id at its main revision); pass the snapshot folder of the revision instead"
        )
    if args.output.suffix.lower() != ".parquet":
        raise InputError(f"{args.output}: --ray writes a folder of Parquet files: X.parquet")
    with contextlib.ExitStack() as stack:
        folder = args.model or stack.enter_context(asset(SHIPPED_MODEL))
        out = ray_embed(
            args.images,
            folder,
            args.output,
            backend=args.backend,
            spec=spec,
            batch_size=args.batch_size,
            address=args.ray or None,
            force=args.force,
            device=args.device,
            dtype=args.dtype,
        )
    table = import_pyarrow()[1].read_table(out, columns=["error"])
    failed = len(table) - table["error"].null_count
    unread = f", {failed} could not be read (listed in {out})" if failed else ""
    print(
        f"{len(table) - failed} images embedded{unread}; wrote {out} on Ray: a folder of "
        f"Parquet files (backend {args.backend})"
    )
    return 0


def run_embed(args: argparse.Namespace) -> int:
    """One embedding per image into Parquet or .npy + CSV, streamed in batches, resumable.

    Unreadable images are rows with their error, not a failure: exit status 0.
    """
    from vit_core.batching import expand_inputs

    spec = EmbedSpec(args.pool, args.layer, args.normalize)
    if args.ray is not None:
        return _embed_on_ray(args, spec)
    paths = list(dict.fromkeys(expand_inputs(args.images)))  # a file named twice: one row
    source = str(args.model) if args.model else SHIPPED_MODEL
    settings = {
        "model": identity(args.model, args.revision) if args.model else SHIPPED_MODEL,
        "backend": args.backend,
        "dtype": args.dtype or "float32",  # half precision gives other numbers
        "pool": spec.pool,
        "layer": spec.layer,
        "normalize": spec.normalize,
    }
    output = EmbeddingsOutput(args.output, settings, resume=args.resume, force=args.force)
    with contextlib.ExitStack() as stack:
        folder = args.model or stack.enter_context(asset(SHIPPED_MODEL))
        model, processor = _open_model(args, folder, model_type="base")
    config, kind, backend = model.config, model.kind, get_backend(args.backend)
    spec.check(config, kind, source)
    width = spec.width(config, kind)
    done = output.done
    todo = [p for p in paths if str(p) not in done]
    try:
        _embed_stream(
            args,
            todo,
            lambda pixels: embed_pixels(backend, model, config, pixels, spec),
            width,
            processor,
            output,
        )
        embedded, failed = output.finish(paths, width)
    except KeyboardInterrupt:  # the store keeps every finished batch; OUT is not written
        saved = len(output.done & set(map(str, paths)))
        print(
            f"interrupted: {saved} of {len(paths)} images are saved in {output.store}; run "
            "the same command with --resume to finish",
            file=sys.stderr,
        )
        return 130
    counts = f"{embedded} images embedded"
    if failed:
        counts += f", {failed} could not be read (listed in {output.listing})"
    if len(todo) < len(paths):
        counts += f"; resumed with {len(paths) - len(todo)} of {len(paths)} already done"
    files = output.path if output.listing == output.path else f"{output.path} + {output.listing}"
    print(
        f"{counts}; wrote {files}: {width} floats per image, {spec.describe(config, kind)} "
        f"(backend {args.backend})"
    )
    return 0


# ----------------------------------------------------------------------- explain
def _prediction_title(path: Path, logits: np.ndarray | None, config: ViTConfig) -> str:
    """`photo.png: label (p %)` for a classifier, the file name alone otherwise."""
    if logits is None or not config.num_labels or not config.id2label:
        return path.name
    probs = softmax(logits)[0]
    best = int(probs.argmax())
    return f"{path.name}: {config.id2label[best]} ({100 * probs[best]:.1f} %)"


def run_explain(args: argparse.Namespace) -> int:
    """Attention rollout and the last layer's per-head attention of one image, as a PNG."""
    from vit_core.explain import explain, figure_size_px, plot_explanation

    image = open_image(args.image)
    with contextlib.ExitStack() as stack:
        folder = args.model or stack.enter_context(asset(SHIPPED_MODEL))
        model, processor = _open_model(args, folder)
    config = model.config
    out = get_backend(args.backend).run(
        model, processor([image])["pixel_values"], output_attentions=True
    )
    logits, attentions = out.get("logits"), out["attentions"]
    maps = explain(
        attentions,
        config.grid_hw,
        config.num_prefix_tokens,
        config.pooling_type,
        args.discard_ratio,
    )
    output = args.output or Path(f"{args.image.stem}-attention.png")
    title = _prediction_title(args.image, logits, config)
    plot_explanation(
        np.asarray(image.convert("RGB")),
        maps.rollout_map[0],
        maps.head_maps[0],
        output,
        head_grid=args.head_grid,
        title=title,
        layer_count=len(attentions),
    )
    width, height = figure_size_px(config.num_attention_heads, args.head_grid)
    pooled = "class-token row" if config.pooling_type == "cls" else "mean of the patch rows"
    if config.num_register_tokens:
        pooled += f" ({config.num_register_tokens} register tokens excluded)"
    (gh, gw), heads = config.grid_hw, config.num_attention_heads
    print(title)
    print(
        f"wrote {output} ({width}x{height} px): rollout of the {pooled} over {len(attentions)} "
        f"layers on {gh}x{gw} patches, last layer's {heads} heads"
    )
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


# ------------------------------------------------------------------------ export
def run_export(args: argparse.Namespace) -> int:
    """One ONNX or StableHLO file, verified against its twin on a probe batch first."""
    from vit_core.export import export_model

    report = export_model(
        args.folder,
        args.format,
        args.output,
        image_size=args.image_size,
        force=args.force,
        opset=args.opset,
    )
    print(report.summary())
    return 0


# ---------------------------------------------------------------------- finetune
def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a model folder on an ImageFolder (`vit_core.finetune`); exit status 130
    when interrupted, the last checkpoint kept for --resume."""
    from vit_core.finetune import Launch, Options, Settings, checkpoints, finetune

    image_size = args.image_size
    settings = Settings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        warmup_steps=args.warmup_steps,
        label_smoothing=args.label_smoothing,
        layer_decay=args.layer_decay,
        drop_path_rate=args.drop_path,
        image_size=(image_size, image_size) if isinstance(image_size, int) else image_size,
        interpolation=args.interpolation,
        crop_scale=tuple(args.crop_scale),
        hflip=args.hflip,
        val_fraction=args.val_fraction,
        new_head=args.new_head,
        seed=args.seed,
    )
    launch = Launch.detect(args.backend, args.coordinator, args.num_processes, args.process_id)
    options = Options(
        backend=args.backend,
        grad_checkpointing=args.grad_checkpointing,
        workers=args.workers,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        force=args.force,
        launch=launch,
    )
    with contextlib.ExitStack() as stack:
        folder = args.model or stack.enter_context(asset(SHIPPED_MODEL))
        try:
            finetune(args.data, folder, args.output, settings, options)
        except KeyboardInterrupt:
            saved = checkpoints(args.output)
            where = f"the last checkpoint is {saved[-1][1]}" if saved else "no epoch finished"
            print(
                f"interrupted: {where}; run the same command with --resume to continue",
                file=sys.stderr,
            )
            return 130
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


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0; got {value}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1); got {value}")
    return value


def _image_size(text: str) -> int | tuple[int, int]:
    """N (square) or HxW, as `load(image_size=)` takes it."""
    parts = text.lower().split("x")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        sizes = [_positive_int(part) for part in parts]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"must be N or HxW in pixels (e.g. 384 or 384x512); got {text!r}"
        ) from None
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def _results_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in (".csv", ".json"):
        raise argparse.ArgumentTypeError(f"must end in .csv or .json; got {text!r}")
    return path


def _model_arguments(parser: argparse.ArgumentParser, backends: Sequence[str] = BACKENDS) -> None:
    """--model and --backend (one of `backends`), the same on every subcommand that runs a
    model."""
    exported = [b for b in backends if REGISTRY[b].exported]
    parser.add_argument(
        "--model",
        metavar="FOLDER|REPO_ID",
        help="model folder (model.safetensors + config.json [+ preprocessor_config.json]), or "
        "a Hugging Face repo id in the local cache, read offline (never downloaded; a timm "
        "or other-family repo is converted in memory), e.g. google/vit-base-patch16-224"
        + (
            f"; with --backend {'/'.join(exported)}: an exported .onnx file (or a folder "
            "holding model.onnx), written by `export`"
            if exported
            else ""
        )
        + "; default: the shipped 8x8 digits model",
    )
    parser.add_argument(
        "--revision",
        metavar="REV",
        help="branch, tag or commit hash of a repo id --model (default: main)",
    )
    parser.add_argument("--backend", choices=backends, default="torch", help="default: torch")
    parser.add_argument(
        "--device",
        metavar="DEVICE",
        help="where the model runs: torch takes cpu, cuda, cuda:1, mps; flax cpu, gpu (or "
        "cuda), tpu, or PLATFORM:N for its N-th device (e.g. cpu:1); default: the "
        "framework's default device (flax's predict: every device of it)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="compute dtype (softmax and LayerNorm statistics stay float32); half precision "
        "is for GPUs and TPUs and warns on a CPU, where it is slow (default: float32)",
    )


def _stream_arguments(parser: argparse.ArgumentParser) -> None:
    """IMAGE... , --batch-size and --workers, the same on every subcommand that streams
    images in batches."""
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, globs (quote them; ** recurses) or folders (searched recursively "
        "for image files by extension)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        metavar="N",
        help="images per forward pass; at most a few batches are in memory (default: 32)",
    )
    parser.add_argument(
        "--workers",
        type=_non_negative_int,
        default=default_workers(),
        metavar="N",
        help="decoding workers: DataLoader processes (torch) or threads (flax); 0 decodes "
        f"in the main process (default: min(2, CPU count) = {default_workers()})",
    )


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


def _finetune_parser(subparsers: Any) -> None:
    """The `finetune` subcommand's flags (`vit_core.finetune.Settings` and `Options`)."""
    from vit_core.finetune import Settings, training_backends
    from vit_core.resample import INTERPOLATIONS

    defaults = Settings()
    finetune = _subcommand(
        subparsers,
        "finetune",
        "fine-tune a model folder on an ImageFolder of labelled images (AdamW, warm-up + "
        "cosine, checkpoints every epoch, --resume); data-parallel under torchrun or "
        "jax.distributed",
        f"{PROG} finetune --data digits-32/ --model vit_core/assets/vit-digits "
        "--image-size 16 -o digits-16\n"
        f"  torchrun --nproc_per_node 2 -m vit_core finetune --data photos/ --model "
        "./vit-base-patch16-224 --epochs 5 --layer-decay 0.75 -o photos-vit",
        run_finetune,
    )
    finetune.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="DIR",
        help="ImageFolder layout: DIR/<class>/<image>, or DIR/train/<class>/<image> with "
        "DIR/val/<class>/<image>; the sorted class names become the labels",
    )
    finetune.add_argument(
        "--model",
        type=Path,
        metavar="FOLDER",
        help="the model folder to start from; default: the shipped 8x8 digits model",
    )
    finetune.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="OUT",
        help="the fine-tuned model folder; OUT/checkpoints/epoch-NNN/ after every epoch",
    )
    backends = training_backends()
    finetune.add_argument("--backend", choices=backends, default=backends[0], help="default: torch")
    finetune.add_argument(
        "--image-size",
        type=_image_size,
        metavar="N|HxW",
        help="train at this input size, the position embeddings resampled once at load "
        "(default: the model's)",
    )
    finetune.add_argument(
        "--interpolation",
        choices=INTERPOLATIONS,
        default=defaults.interpolation,
        help=f"how --image-size resamples the positions (default: {defaults.interpolation})",
    )
    finetune.add_argument(
        "--epochs",
        type=_positive_int,
        default=defaults.epochs,
        metavar="N",
        help=f"default: {defaults.epochs}",
    )
    finetune.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        metavar="N",
        help="images per step, all processes together; an epoch's last, incomplete batch is "
        f"dropped (default: {defaults.batch_size})",
    )
    finetune.add_argument(
        "--lr",
        default=defaults.lr,
        type=float,
        metavar="X",
        help=f"peak learning rate of AdamW, after the warm-up (default: {defaults.lr:g})",
    )
    finetune.add_argument(
        "--weight-decay",
        default=defaults.weight_decay,
        type=float,
        metavar="X",
        help="AdamW's decoupled weight decay; none on biases, norms, positions and prefix "
        f"tokens (default: {defaults.weight_decay:g})",
    )
    warmup = finetune.add_mutually_exclusive_group()
    warmup.add_argument(
        "--warmup-epochs",
        default=defaults.warmup_epochs,
        type=float,
        metavar="X",
        help="epochs of linear warm-up from 0 before the cosine decay to 0 (default: "
        f"{defaults.warmup_epochs:g})",
    )
    warmup.add_argument(
        "--warmup-steps",
        type=_non_negative_int,
        metavar="N",
        help="the warm-up in steps instead",
    )
    finetune.add_argument(
        "--label-smoothing",
        default=defaults.label_smoothing,
        type=float,
        metavar="X",
        help=f"default: {defaults.label_smoothing:g}",
    )
    finetune.add_argument(
        "--layer-decay",
        type=float,
        metavar="X",
        help="layer-wise learning-rate decay (timm's, e.g. 0.75): the head at the full "
        "rate, each earlier layer at X times the next one's (default: none)",
    )
    finetune.add_argument(
        "--drop-path",
        metavar="RATE",
        type=float,
        help="stochastic depth rate of the last block, timm's linear rule below it "
        "(default: the model config's drop_path_rate)",
    )
    finetune.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute each block in the backward pass instead of keeping its activations "
        "(less memory, about a third more time; the same weights)",
    )
    finetune.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=defaults.crop_scale,
        metavar=("MIN", "MAX"),
        help="RandomResizedCrop's range of the image area kept (default: "
        f"{defaults.crop_scale[0]:g} {defaults.crop_scale[1]:g})",
    )
    finetune.add_argument(
        "--hflip",
        default=defaults.hflip,
        type=float,
        metavar="X",
        help=f"probability of a horizontal flip (default: {defaults.hflip:g}; 0 for digits "
        "and text)",
    )
    finetune.add_argument(
        "--val-fraction",
        default=defaults.val_fraction,
        type=float,
        metavar="X",
        help="without DIR/train and DIR/val: the part of each class held out for "
        f"validation, by a fixed seeded split (default: {defaults.val_fraction:g})",
    )
    finetune.add_argument(
        "--new-head",
        action="store_true",
        help="a new classifier even when the model's labels are already the classes",
    )
    finetune.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        metavar="N",
        help="the new head, the data order, the crops and the dropout masks (default: 0)",
    )
    finetune.add_argument(
        "--workers",
        type=_non_negative_int,
        default=default_workers(),
        metavar="N",
        help=f"decoding threads (default: {default_workers()})",
    )
    finetune.add_argument(
        "--keep-checkpoints",
        type=_positive_int,
        metavar="N",
        help="keep only the N newest checkpoints (default: every epoch's)",
    )
    finetune.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT's last checkpoint: the weights, the optimizer state, the "
        "schedule and the data order (the same settings required); starts afresh when OUT "
        "has none yet",
    )
    finetune.add_argument("--force", action="store_true", help="replace an existing OUT")
    jax = finetune.add_argument_group(
        "JAX processes (flax; torch is made data-parallel by torchrun)",
        "one process per host, each with the same flags but its own --process-id",
    )
    jax.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    jax.add_argument("--num-processes", type=_positive_int, metavar="N")
    jax.add_argument("--process-id", type=_non_negative_int, metavar="I")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Vision Transformer twins (PyTorch and Flax) from one safetensors file.",
        epilog=f"examples:\n  {PROG} demo\n  {PROG} predict digit.png --backend flax\n"
        f"  {PROG} predict photos/ --output results.csv\n"
        f"  {PROG} embed photos/ -o embeddings.parquet\n"
        f"  {PROG} explain digit.png -o digit-attention.png\n"
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
        "print (or write to CSV/JSON) the top-k labels of each image; files, globs or folders",
        f"{PROG} predict cat.jpg dog.png --model ./vit-base-patch16-224 --backend flax --top-k 3\n"
        f"  {PROG} predict photos/ 'more/**/*.jpg' --model ./vit-base-patch16-224 "
        "--batch-size 64 --output results.csv\n"
        f"  {PROG} predict photos/ --model vit-base.onnx --backend onnx",
        run_predict,
    )
    _stream_arguments(predict)
    _model_arguments(predict, ALL_BACKENDS)
    predict.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="default: 5")
    predict.add_argument(
        "-o",
        "--output",
        type=_results_path,
        metavar="FILE",
        help="write path, top-k labels and probabilities to FILE.csv or FILE.json "
        "instead of printing them",
    )
    predict.add_argument(
        "--quantize",
        choices=["int8"],
        help="torch backend: run the encoder's Linear layers as int8 matmuls (about 1.6x "
        "faster on x86 CPUs, at a small accuracy cost; see the README's speed table). "
        "int8-static, which needs calibration images and a compile, is in the Python API",
    )
    predict.add_argument(
        "--skip-errors",
        action="store_true",
        help="warn about unreadable images and go on (exit status 1 at the end) instead of "
        "stopping at the first",
    )
    embed = _subcommand(
        subparsers,
        "embed",
        "write one embedding per image (files, globs or folders) to Parquet or .npy + CSV",
        f"{PROG} embed photos/ --model ./dinov2-small -o embeddings.parquet\n"
        f"  {PROG} embed 'shots/**/*.jpg' --model ./vit-base-patch16-224 --pool mean "
        "--layer -2 --normalize --backend flax -o embeddings.npy",
        run_embed,
    )
    _stream_arguments(embed)
    _model_arguments(embed, ALL_BACKENDS)
    embed.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="FILE",
        help="FILE.parquet (columns path, embedding, error; needs pyarrow) or FILE.npy "
        "(N x D float32, NaN rows for unreadable images) with FILE.csv (index, path, error)",
    )
    embed.add_argument(
        "--pool",
        choices=POOLS,
        default="auto",
        help="auto: the model's pooler_output where it has one (its pooling layer, or the "
        "family's embedding: DINOv2, CLIP, SigLIP), else the class token, else the mean "
        "of the patch tokens; cls: the class token; mean: the mean of the patch tokens "
        "(class, distillation and register tokens left out); pooler: pooler_output "
        "(default: auto)",
    )
    embed.add_argument(
        "--layer",
        type=int,
        metavar="N",
        help="pool the tokens of block N (0-based; -1 is the last, -2 the one before) with "
        "the final norm applied, instead of the model's output",
    )
    embed.add_argument(
        "--normalize", action="store_true", help="scale each embedding to unit L2 norm"
    )
    embed.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run: the images already saved in FILE.partial/ are "
        "skipped (same options required)",
    )
    embed.add_argument(
        "--force",
        action="store_true",
        help="replace an existing FILE (and FILE.csv), and discard a FILE.partial/ left by "
        "an interrupted run unless --resume",
    )
    embed.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run on a Ray cluster (pip install 'vit-twin[ray]'; docs/distributed.md): "
        "ADDRESS as ray.init takes it ('auto': the cluster this machine is part of; "
        "ray://HOST:10001), or none: RAY_ADDRESS, else a new local one. FILE.parquet is "
        "then a folder of Parquet files, rows in no set order",
    )
    explain = _subcommand(
        subparsers,
        "explain",
        "draw attention rollout and the last layer's attention per head over an image (PNG)",
        f"{PROG} explain cat.jpg --model ./vit-base-patch16-224 --backend flax "
        "-o cat-attention.png --head-grid",
        run_explain,
    )
    explain.add_argument("image", type=Path, metavar="IMAGE", help="image file")
    _model_arguments(explain)
    explain.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="PNG",
        help="where to write the figure (default: IMAGE-STEM-attention.png here)",
    )
    explain.add_argument(
        "--head-grid",
        action="store_true",
        help="add one panel per head of the last layer below the main row",
    )
    explain.add_argument(
        "--discard-ratio",
        type=_ratio,
        metavar="RATIO",
        default=0.0,
        help="drop this fraction of the weakest attention links per row before rolling out "
        "(0 = the paper's rollout; default: 0)",
    )
    info = _subcommand(
        subparsers,
        "info",
        "describe a model folder: architecture, parameters, file, dtypes, compatibility",
        f"{PROG} info ./vit-base-patch16-224 --json",
        run_info,
    )
    info.add_argument("folder", type=Path, metavar="FOLDER", help="model folder or .safetensors")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    export = _subcommand(
        subparsers,
        "export",
        "write a model folder as one ONNX or StableHLO file for any batch size, verified "
        "against its twin before it is written",
        f"{PROG} export ./vit-base-patch16-224 --format onnx -o vit-base.onnx\n"
        f"  {PROG} export ./vit-base-patch16-224 --format stablehlo --image-size 384 "
        "-o vit-base-384.stablehlo",
        run_export,
    )
    export.add_argument(
        "folder",
        type=Path,
        metavar="FOLDER",
        help="model folder (model.safetensors + config.json [+ preprocessor_config.json])",
    )
    export.add_argument(
        "--format",
        choices=FORMATS,
        required=True,
        help="onnx: the torch twin through torch.onnx, run back by onnxruntime (pip install "
        "'vit-twin[onnx]'); stablehlo: the Flax twin through jax.export, run back by "
        "jax.export.deserialize (a ZIP of program, weights and configs; docs/cli.md)",
    )
    export.add_argument(
        "-o", "--output", type=Path, required=True, metavar="OUT", help="the file to write"
    )
    export.add_argument(
        "--image-size",
        type=_image_size,
        metavar="N|HxW",
        help="export for this input size, the position embeddings resampled (bicubic) at "
        "load (default: the config's image_size)",
    )
    export.add_argument(
        "--opset",
        type=_positive_int,
        metavar="N",
        help="onnx only: the ONNX operator set to target (default: vit_torch.export's "
        "DEFAULT_OPSET)",
    )
    export.add_argument("--force", action="store_true", help="replace an existing OUT")
    _finetune_parser(subparsers)
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
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as the Python docs advise, and
        # point stdout at /dev/null so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
