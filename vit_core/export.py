"""`export`: a model folder -> one deployable file (ONNX or StableHLO), verified first.

Each format is a row of `FORMATS`: the twin it exports (torch for ONNX, flax for
StableHLO), the backends whose frameworks write and run it, and its writer and runner as
"module:function" names, imported only when that format is asked for (so the core names
no framework; a missing one is the registry's "install the extra" message, before the
model is read).

`export_model` does it in one order: load the twin in float32 (`image_size=` resamples
the position table, as `load` does), write the artefact into a hidden staging file beside
the output (`vit_core._io.staged_file`), run the staged file with the format's own runtime
(onnxruntime; `jax.export.deserialize`) and the twin on the same seeded probe batch, and
compare every output. Only if each lies within `TOLERANCE` does the file take its name;
otherwise it is removed and nothing is written. An existing output is refused without
`force`, and never touched on a failure. The file carries the model's `config.json` and
`preprocessor_config.json` (`artefact_metadata`), so that it runs on its own.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vit_core._io import check_target, staged_file
from vit_core.backend import REGISTRY, Outputs, get_backend
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.errors import InputError, ViTError
from vit_core.hub import open_source
from vit_core.loading import PROBE_BATCH, PROBE_SEED, load, probe
from vit_core.processing import PROCESSOR_NAME, ViTImageProcessor

# float32: the largest difference allowed between the file's outputs and the twin's, times
# max(1, the output's largest magnitude): a runtime that fuses a block's ops rounds them
# otherwise, and ViT-B's hidden states run into the tens
TOLERANCE = 1e-5


@dataclass(frozen=True)
class ExportFormat:
    """How one format is written and checked; the callables are "module:function" names."""

    twin: str  # the backend whose model is exported, and verified against
    needs: tuple[str, ...]  # the backends whose frameworks write and run the file
    writer: str  # (model, path, image_size, metadata[, opset]) -> None
    runner: str  # (path, pixels) -> {output name: float32 array}
    describe: str  # the version written, in words: a template of {opset} and {version}
    suffix: str  # how the file's name ends (what readers recognise it by)
    requires: tuple[str, ...] = ()  # modules the writer imports beyond its backends' own
    opset: str | None = None  # "module:CONSTANT": the default opset, for formats with one
    version: str | None = None  # "module:function" (written path) -> its {version} text


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(
        twin="torch",
        needs=("torch", "onnx"),
        writer="vit_torch.export:write_onnx",
        runner="vit_onnx.backend:run_onnx_file",
        describe="ONNX opset {opset}, dynamic batch",
        suffix=".onnx",
        requires=("onnxscript",),  # what torch's ONNX exporter (dynamo=True) writes with
        opset="vit_torch.export:DEFAULT_OPSET",
    ),
    "stablehlo": ExportFormat(
        twin="flax",
        needs=("flax",),
        writer="vit_flax.export:write_stablehlo",
        runner="vit_flax.export:run_stablehlo",
        describe="StableHLO ({version}), symbolic batch",
        suffix=".stablehlo",
        version="vit_flax.export:describe",
    ),
}


class ExportVerificationError(ViTError):
    """The exported file does not compute what the twin computes; nothing was written."""


@dataclass(frozen=True)
class ExportReport:
    """What `export_model` wrote, and how closely the file reproduced the twin."""

    path: Path
    format: str
    version: str  # the format's version in words (the opset; jax.export's convention)
    twin: str
    image_size: tuple[int, int]
    differences: dict[str, float]  # output name -> max abs difference on the probe batch

    def summary(self) -> str:
        h, w = self.image_size
        size = self.path.stat().st_size / 1e6
        diffs = ", ".join(f"{name} {diff:.2e}" for name, diff in self.differences.items())
        return (
            f"wrote {self.path} ({size:.1f} MB): {self.version}, {h}x{w} pixels\n"
            f"verified against the {self.twin} twin on {PROBE_BATCH} seeded probe images "
            f"(seed {PROBE_SEED}, float32, bound {TOLERANCE:g} x max(1, |output|)): max abs "
            f"difference {diffs}"
        )


def _attribute(name: str) -> Any:
    """The object a "module:attribute" name points at (the module imported now)."""
    module, attribute = name.split(":")
    return getattr(importlib.import_module(module), attribute)


def artefact_metadata(config: ViTConfig, processor: ViTImageProcessor) -> dict[str, str]:
    """The text an exported file carries so that it runs on its own: `config.json`, and
    `preprocessor_config.json` (the model's processor) with its size set to the export
    size, so that the processor makes the pixels the file takes."""
    height, width = config.image_hw
    if processor.size != {"height": height, "width": width}:
        processor = ViTImageProcessor.from_dict(
            processor.to_dict(), size={"height": height, "width": width}
        )
    return {CONFIG_NAME: config.to_json_string(), PROCESSOR_NAME: processor.to_json_string()}


def _compare(
    path: Path, twin: str, expected: Outputs, got: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Max abs difference per output; a missing, extra or mis-shaped output, or one past
    `TOLERANCE` (NaN included), is an `ExportVerificationError`."""
    if set(got) != set(expected):
        raise ExportVerificationError(
            f"{path}: the exported file gives the outputs {sorted(got)}, the {twin} twin "
            f"{sorted(expected)}; nothing was written"
        )
    differences = {}
    for name, want in expected.items():
        value = np.asarray(got[name])
        if value.shape != want.shape:
            raise ExportVerificationError(
                f"{path}: output {name} has shape {value.shape}, the {twin} twin's "
                f"{want.shape}; nothing was written"
            )
        differences[name] = float(np.max(np.abs(value.astype(np.float64) - want)))
    bounds = {n: TOLERANCE * max(1.0, float(np.max(np.abs(w)))) for n, w in expected.items()}
    failed = {n: d for n, d in differences.items() if not d <= bounds[n]}
    if failed:
        listed = ", ".join(f"{n} by {d:.3e} (bound {bounds[n]:.1e})" for n, d in failed.items())
        raise ExportVerificationError(
            f"{path}: the exported file does not compute what the {twin} twin computes: on "
            f"the probe batch it differs in {listed}; the bound is {TOLERANCE:g} x max(1, "
            "the output's largest magnitude) in float32; nothing was written"
        )
    return differences


def export_model(
    folder: str | Path,
    fmt: str,
    output: str | Path,
    image_size: int | tuple[int, int] | None = None,
    force: bool = False,
    opset: int | None = None,
) -> ExportReport:
    """Export the model in `folder` as `fmt` ("onnx" or "stablehlo") to `output`, verified
    against its twin on the probe batch before the file takes its name (module docstring).

    `image_size` (int or (height, width)) exports for that input size, the position
    embeddings resampled at load; `opset` (ONNX only) picks the operator set, by default
    the writer's `DEFAULT_OPSET`; `force` replaces an existing `output`.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    if opset is not None and spec.opset is None:
        raise InputError(f"opset (--opset) is an ONNX setting; the {fmt} format has none")
    output = Path(output)
    if output.suffix.lower() != spec.suffix:
        raise InputError(
            f"{output}: an exported {fmt} file's name ends in {spec.suffix} (how `load` and "
            f"--backend read it); name it {output.name}{spec.suffix}?"
        )
    check_target(output, force, kind="file")  # before anything is read
    for backend in spec.needs:
        get_backend(backend)  # a missing framework: the extra to install, before loading
    missing = [name for name in spec.requires if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"export --format {fmt} needs {', '.join(missing)}, which is not installed; "
            f"install it with `pip install 'vit-twin[{REGISTRY[spec.needs[-1]].extra}]'`"
        )
    writer: Callable[..., None] = _attribute(spec.writer)
    runner: Callable[[Path, np.ndarray], Mapping[str, np.ndarray]] = _attribute(spec.runner)
    options: dict[str, int] = {}
    if spec.opset is not None:
        options["opset"] = opset if opset is not None else int(_attribute(spec.opset))
    source = open_source(folder)  # a folder, or a repo id in the local Hugging Face cache
    model = load(source, backend=spec.twin, dtype="float32", image_size=image_size)
    if model.kind.decoder:
        raise InputError(
            f"{folder}: holds a masked-image-modeling model (a pre-training head); export "
            "takes an encoder or a classifier: load it with model_type='base' or "
            "num_labels=N and save that, then export it"
        )
    config = model.config
    metadata = artefact_metadata(config, source.processor())
    pixels = probe(config)
    expected = get_backend(spec.twin).run(model, pixels)
    with staged_file(output, replace=force) as staged:
        writer(model, staged, config.image_hw, metadata, **options)
        differences = _compare(output, spec.twin, expected, runner(staged, pixels))
    version = spec.describe.format(
        **options, version=_attribute(spec.version)(output) if spec.version else None
    )
    return ExportReport(output, fmt, version, spec.twin, config.image_hw, differences)
