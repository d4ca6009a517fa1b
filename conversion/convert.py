"""The conversion pipeline, one way through:

    detect -> read -> hints and overrides -> ViTConfig -> check_layout
      -> resample positions (--image-size) -> dtype -> stage, [verify], commit

Readers (`conversion.sources.*`) know their source; everything after them is shared and
knows only the canonical layout. What the weights fix cannot be overridden by a hint: a
contradiction is an error naming both values, never a silently broken model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from conversion.detect import detect
from conversion.sources import is_timm_config
from conversion.sources.base import SourceWeights
from conversion.write import OutputExistsError, staged, write_files
from vit_core import __version__
from vit_core._io import local_path, read_json_object
from vit_core.checkpoint import numpy_dtype
from vit_core.config import ViTConfig, hw_pair
from vit_core.errors import ConfigError, LayoutError
from vit_core.hub import find_snapshot
from vit_core.layout import WEIGHTS_NAME, ModelKind, check_layout, model_kind
from vit_core.progress import progress_bar
from vit_core.resample import check_interpolation
from vit_core.surgery import resize_for_image_size

SOURCES = ("auto", "timm", "jax", "hf")
DTYPES = ("float32", "bfloat16", "float16")
GELU = {"exact": "gelu", "tanh": "gelu_pytorch_tanh"}
# Fields the weights' shapes decide; a hint that contradicts them is an error.
WEIGHT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "patch_size",
    "image_size",
    "num_channels",
    "qkv_bias",
    "use_class_token",
    "pooler_output_size",
)
# What a model name (--model-name) contributes: the architecture and the family's switches
# (docs/families.md), never labels (those belong to the checkpoint). A later layer
# (--config, --set) overrides any of them: `--set num_hidden_layers=2` on a cut-down model.
NAME_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "patch_size",
    "image_size",
    "qkv_bias",
    "use_class_token",
    "num_register_tokens",
    "use_distillation_token",
    "no_embed_class",
    "layerscale_value",
    "use_pre_norm",
    "patch_embedding_bias",
    "use_final_norm",
    "use_fc_norm",
    "use_swiglu_ffn",
    "pooling_type",
)
# ... and, from a timm name, the numerics: a timm state dict holds neither its LayerNorm
# eps nor its activation (CLIP: 1e-5, quick_gelu for OpenAI's; SigLIP 2: tanh GELU). Hub
# names say transformers' 1e-12 and JAX names the release's tanh GELU, which belong to
# those ecosystems' own files, so a name in their spelling gives the architecture only.
NAME_NUMERICS = ("layer_norm_eps", "hidden_act")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ViTConfig) if f.name != "extra")
# Other ecosystems' words for config fields (timm, big_vision), for "did you mean".
FIELD_ALIASES = {
    "num_heads": "num_attention_heads",
    "embed_dim": "hidden_size",
    "width": "hidden_size",
    "depth": "num_hidden_layers",
    "mlp_dim": "intermediate_size",
    "img_size": "image_size",
    "num_classes": "num_labels",
    "eps": "layer_norm_eps",
    "act_layer": "hidden_act",
}


@dataclass
class ConversionResult:
    """What `convert` did: where, from what, the model it wrote, and what it assumed."""

    out: Path
    source: Path
    source_kind: str
    source_format: str
    config: ViTConfig
    kind: ModelKind
    parameters: int
    file_bytes: int
    dtype: str
    assumed: list[str] = field(default_factory=list)
    resampled: str | None = None
    seconds: float = 0.0
    verification: Any = None


# ------------------------------------------------------------------ hints
def _comparable(name: str, value: Any) -> Any:
    """image_size/patch_size as (h, w), so that 224 and [224, 224] agree; else `value`."""
    if name in ("image_size", "patch_size"):
        with contextlib.suppress(ConfigError):
            return hw_pair(value, name)
    return value


def check_fields(fields: Iterable[str], origin: str) -> None:
    """Refuse names that are not ViTConfig fields, suggesting the closest one."""
    for name in fields:
        if name not in CONFIG_FIELDS:
            close = [FIELD_ALIASES[name]] if name in FIELD_ALIASES else []
            close = close or difflib.get_close_matches(name, CONFIG_FIELDS, n=1)
            hint = (
                f"; did you mean {close[0]}?" if close else f"; fields: {', '.join(CONFIG_FIELDS)}"
            )
            raise ConfigError(f"{origin}: {name!r} is not a ViTConfig field{hint}")


def name_layer(model_name: str) -> dict[str, Any]:
    """The hint fields a model name gives (`NAME_FIELDS`, and `NAME_NUMERICS` for a timm
    name); a `ConfigError` for a name that is unknown or that this package cannot run."""
    from vit_core.names import name_fields, name_source

    fields = name_fields(model_name)
    wanted = NAME_FIELDS + (NAME_NUMERICS if name_source(model_name) == "timm" else ())
    return {k: fields[k] for k in wanted if k in fields}


def hint_layers(
    model_name: str | None, config_file: str | Path | None, overrides: Mapping[str, Any] | None
) -> list[tuple[str, dict[str, Any]]]:
    """(origin, fields) in increasing precedence: --model-name, --config, --set."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if model_name:
        layers.append((f"--model-name {model_name}", name_layer(model_name)))
    if config_file is not None:
        data = read_json_object(local_path(config_file))
        if is_timm_config(data):
            from conversion.sources.timm import hints_from_timm_config

            data = hints_from_timm_config(data)[0]
        elif data.get("model_type", "vit") != "vit":
            raise ConfigError(
                f"{config_file}: model_type={data['model_type']!r}; only ViT configs apply"
            )
        data = {k: v for k, v in data.items() if k != "model_type"}
        layers.append((f"--config {config_file}", data))
    if overrides:
        check_fields(overrides, "--set")
        layers.append(("--set", dict(overrides)))
    return layers


def merge_config(
    source: SourceWeights, layers: Sequence[tuple[str, dict[str, Any]]], gelu: str | None
) -> dict[str, Any]:
    """The reader's fields, then each hint layer; contradicting the weights is an error.

    Only the value that wins is held to the weights: a name's depth that --set replaces
    is not a contradiction, the --set value is checked in its place.
    """
    fixed = set(WEIGHT_FIELDS) | source.fixed
    if any(k.startswith("classifier.") for k in source.tensors):
        fixed.add("num_labels")
    winners: dict[str, tuple[str, Any]] = {}
    for origin, layer in layers:
        for name, value in layer.items():
            winners[name] = (origin, value)
    fields = dict(source.config)
    for name, (origin, value) in winners.items():
        said = source.config.get(name)
        if (
            name in fixed
            and name in source.config
            and _comparable(name, value) != _comparable(name, said)
        ):
            override = (
                f", override it with --set {name}={_set_value(said)}"
                if origin.startswith(("--model-name", "--config"))
                else ""
            )
            raise ConfigError(
                f"{origin} gives {name}={value!r}, but the weights say {said!r}; leave it "
                f"out{override}, or convert a matching checkpoint"
            )
        fields[name] = value
    if gelu is not None:
        fields["hidden_act"] = GELU[gelu]
    return fields


def _set_value(value: Any) -> str:
    """`value` as --set reads it (JSON): true, 2, [224,224]."""
    import json

    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


def build_config(fields: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> ViTConfig:
    classifier = any(k.startswith(("vit.", "classifier.")) for k in tensors)
    architectures = ["ViTForImageClassification" if classifier else "ViTModel"]
    try:
        return ViTConfig.from_dict({**fields, "architectures": architectures})
    except TypeError as exc:  # a field of the wrong JSON type
        raise ConfigError(f"config: {exc}") from None


# ------------------------------------------------------------ later stages
def parse_image_size(text: str | int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """ "384" or "384x512" (or an int, or a pair) -> (height, width)."""
    if not isinstance(text, str):
        return hw_pair(text, "image_size")
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) <= 0:
        raise ConfigError(f"image size {text!r}: expected H or HxW, e.g. 384 or 384x512")
    return (values[0], values[-1])


def target_dtype(tensors: Mapping[str, np.ndarray], requested: str | None) -> str:
    """The requested dtype, else the source's (when it is one of DTYPES), else float32."""
    if requested is not None:
        if requested not in DTYPES:
            raise ConfigError(f"dtype {requested!r}; choose one of {', '.join(DTYPES)}")
        return requested
    found = {str(v.dtype) for v in tensors.values()}
    return found.pop() if len(found) == 1 and found <= set(DTYPES) else "float32"


def file_digest(files: Sequence[Path], progress: bool | None) -> str:
    """sha256 of the files' bytes, in order (one file: what `sha256sum` prints)."""
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    with progress_bar(total, enabled=progress, unit="B", unit_scale=True, desc="sha256") as bar:
        for file in files:
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def _refuse_self_overwrite(src: Path, out: Path) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    real_src, real_out = src.resolve(), out.resolve()
    if real_src == real_out or real_out in real_src.parents:
        raise OutputExistsError(
            f"{out}: holds the source {src}; replacing it would delete the source, so choose "
            "another output folder"
        )


# -------------------------------------------------------------------- convert
@dataclass
class Canonical:
    """A source checkpoint in canonical form, in memory: what `convert` writes, and what
    `vit_core.load` reads from a cached Hugging Face repo that is not canonical already.

    `tensors` are HF-named numpy arrays checked against `config` (`check_layout`);
    `processor` is the source's preprocessing at the model's input size; `reader` the
    module that read the source (its `weight_files` and `--verify` use it).
    """

    tensors: dict[str, np.ndarray]
    config: ViTConfig
    kind: ModelKind
    processor: Any
    source: Path
    source_kind: str
    source_format: str
    reader: ModuleType
    dtype: str
    assumed: list[str] = field(default_factory=list)
    resampled: str | None = None


def canonical(
    src: str | Path,
    *,
    source: str = "auto",
    model_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    image_size: str | int | list[int] | tuple[int, ...] | None = None,
    interpolation: str | None = None,
    dtype: str | None = None,
    gelu: str | None = None,
    stage: Callable[[str], None] | None = None,
) -> Canonical:
    """Read a timm, JAX `.npz` or Hugging Face checkpoint into canonical tensors + config,
    writing nothing: `convert` without the folder. The options are `convert`'s; `stage`
    is told the name of each step as it starts (`convert`'s progress bar)."""
    _check_options(source, gelu, interpolation, image_size)
    size = parse_image_size(image_size) if image_size is not None else None
    stage = stage or (lambda name: None)
    src_path = local_path(src)
    stage("detecting")
    layers = hint_layers(model_name, config_file, overrides)
    kind_name, reader = detect(src_path, source)
    stage(f"reading {kind_name}")
    hints = {k: v for _, layer in layers for k, v in layer.items()}
    if gelu is not None:  # so the reader records the asked-for form, not its default
        hints["hidden_act"] = GELU[gelu]
    weights = reader.read(src_path, hints)
    stage("checking")
    config = build_config(merge_config(weights, layers, gelu), weights.tensors)
    tensors = dict(weights.tensors)
    kind = model_kind(tensors, config)
    check_layout(tensors, config, kind, str(src_path))
    resampled = None
    if size is not None and size != config.image_hw:
        mode = str(interpolation or reader.DEFAULT_INTERPOLATION)
        stage(f"resampling positions ({mode})")
        resampled = f"{config.image_hw[0]}x{config.image_hw[1]} -> {size[0]}x{size[1]} ({mode})"
        tensors, config = resize_for_image_size(tensors, config, kind, size, mode)
        check_layout(tensors, config, kind, f"{src_path} resampled to {size}")
    stage("casting")
    dtype = target_dtype(tensors, dtype)
    tensors = cast(tensors, dtype)
    if "torch_dtype" in config.extra:  # transformers' record of the stored dtype
        config.extra["torch_dtype"] = dtype
    return Canonical(
        tensors=tensors,
        config=config,
        kind=kind,
        processor=_processor(weights, config),
        source=src_path,
        source_kind=kind_name,
        source_format=weights.source_format,
        reader=reader,
        dtype=dtype,
        assumed=list(weights.assumed),
        resampled=resampled,
    )


def convert(
    src: str | Path,
    out: str | Path,
    *,
    source: str = "auto",
    model_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    image_size: str | int | list[int] | tuple[int, ...] | None = None,
    interpolation: str | None = None,
    dtype: str | None = None,
    gelu: str | None = None,
    verify: bool = False,
    force: bool = False,
    progress: bool | None = None,
    revision: str | None = None,
) -> ConversionResult:
    """Convert a timm, JAX `.npz` or Hugging Face checkpoint into a canonical folder.

    `src` is a file or folder, or a Hugging Face repo id in the local cache (`revision`:
    its branch, tag or commit; `vit_core.hub`, never a download). `overrides` are config
    fields (as `--set`); `image_size` resamples the position embeddings (`interpolation`:
    one of `vit_core.resample.INTERPOLATIONS`, default the source's own);
    `dtype` casts the weights (default: the source's). With `verify`, OUT is checked in
    both backends (and against the source library where importable) before it appears;
    a mismatch raises `VerificationError` and OUT is not written. Nothing is left behind
    on error, and an existing OUT is replaced only with `force`.
    """
    started = time.perf_counter()
    _check_options(source, gelu, interpolation, image_size)
    src_path, name_hint = conversion_source(src, revision)
    out_path = Path(os.path.abspath(out))
    _refuse_self_overwrite(src_path, out_path)
    with staged(out_path, force) as staging, _stages(progress) as stage:
        result = canonical(
            src_path,
            source=source,
            model_name=model_name or name_hint,
            config_file=config_file,
            overrides=overrides,
            image_size=image_size,
            interpolation=interpolation,
            dtype=dtype,
            gelu=gelu,
            stage=stage,
        )
        stage("hashing the source")
        metadata = {
            "format": "pt",
            "source_format": result.source_format,
            "source_sha256": file_digest(result.reader.weight_files(src_path), progress),
            "converter_version": __version__,
        }
        stage("writing")
        write_files(staging, result.tensors, result.config, result.processor, metadata)
        report = None
        if verify:
            stage("verifying")
            from conversion.verify import VerificationError, verify_folder

            report = verify_folder(
                staging,
                src_path,
                result.source_kind,
                result.reader,
                result.dtype,
                bool(result.resampled),
            )
            if not report.ok:
                raise VerificationError(report)
    return ConversionResult(
        out=out_path,
        source=src_path,
        source_kind=result.source_kind,
        source_format=result.source_format,
        config=result.config,
        kind=result.kind,
        parameters=int(sum(v.size for v in result.tensors.values())),
        file_bytes=(out_path / WEIGHTS_NAME).stat().st_size,
        dtype=result.dtype,
        assumed=result.assumed,
        resampled=result.resampled,
        seconds=time.perf_counter() - started,
        verification=report,
    )


def conversion_source(src: str | Path, revision: str | None = None) -> tuple[Path, str | None]:
    """(the path to read, a model name for what the files do not say) of `src`: a local
    path as it is, a repo id's cached snapshot (`vit_core.hub`)."""
    snapshot = find_snapshot(src, revision)
    if snapshot is None:
        return local_path(src), None
    return snapshot.conversion_source()


def _check_options(
    source: str, gelu: str | None, interpolation: str | None, image_size: Any
) -> None:
    """Refuse bad option values before any file is touched."""
    if source not in SOURCES:
        raise ConfigError(f"source kind {source!r}; choose one of {', '.join(SOURCES)}")
    if gelu is not None and gelu not in GELU:
        raise ConfigError(f"gelu {gelu!r}; choose one of {', '.join(GELU)}")
    if interpolation is not None:
        check_interpolation(interpolation)
    if interpolation is not None and image_size is None:
        raise ConfigError("--interpolation applies only with --image-size")
    if image_size is not None:
        parse_image_size(image_size)


@contextlib.contextmanager
def _stages(progress: bool | None) -> Iterator[Callable[[str], None]]:
    """A progress bar over the pipeline's stages; `stage(name)` moves it on."""
    with progress_bar(8, enabled=progress, desc="converting", leave=False) as bar:

        def stage(name: str) -> None:
            bar.set_description(name)
            bar.update()

        yield stage


def cast(tensors: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Every tensor in `dtype` (numpy rounds to nearest even, as torch does).

    Only floating-point weights are cast: integer or boolean tensors in a ViT checkpoint
    mean a file that is not what it claims, refused as `vit_core.load` refuses them.
    """
    odd = sorted(f"{k} ({v.dtype})" for k, v in tensors.items() if v.dtype.kind not in "fV")
    if odd:
        raise LayoutError(
            f"non-floating-point weights ({len(odd)}): {', '.join(odd[:10])}; a ViT checkpoint "
            "holds float tensors only: check the source file"
        )
    target = numpy_dtype(dtype)
    return {k: v if v.dtype == target else v.astype(target) for k, v in tensors.items()}


def _processor(weights: SourceWeights, config: ViTConfig) -> Any:
    """The source's preprocessor, resizing to the (possibly resampled) model's input size."""
    from vit_core.processing import ViTImageProcessor

    height, width = config.image_hw
    return ViTImageProcessor.from_dict(
        dict(weights.processor), size={"height": height, "width": width}
    )


# -------------------------------------------------------------------- summary
def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{count} B"
        size /= 1024
    return f"{count} B"


def summary(result: ConversionResult) -> str:
    """A few lines for the terminal: architecture, size, file, assumptions, time."""
    c = result.config
    (h, w), (ph, pw) = c.image_hw, c.patch_hw
    model = result.kind.architecture
    head = f", {c.num_labels} classes" if result.kind.classifier else ""
    pooler = " + pooler" if result.kind.pooler else ""
    lines = [
        f"converted {result.source_kind} checkpoint ({result.source_format}) {result.source}"
        f" -> {result.out}",
        f"  architecture: {model}{pooler}: width {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads} heads, MLP {c.intermediate_size}, patch {ph}x{pw}, "
        f"image {h}x{w}{head}; layer_norm_eps {c.layer_norm_eps:g}, {c.hidden_act}",
        f"  parameters:   {result.parameters:,} ({result.dtype})",
        f"  file:         {WEIGHTS_NAME} {_bytes(result.file_bytes)}"
        " (+ config.json, preprocessor_config.json)",
    ]
    if result.resampled:
        lines.append(f"  resampled:    position embeddings {result.resampled}")
    if result.assumed:
        lines.append("  assumed:")
        lines += [f"    - {note}" for note in result.assumed]
    else:
        lines.append("  assumed:      nothing (everything came from the source)")
    lines.append(f"  time:         {result.seconds:.1f} s")
    return "\n".join(lines)
