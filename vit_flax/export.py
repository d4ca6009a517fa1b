"""StableHLO export of the Flax twin (`jax.export`), and the runner that reads it back.

`write_stablehlo` lowers the twin's forward to StableHLO with `jax.export`, the batch a
symbolic dimension `b` (one artefact serves every batch size; height and width are fixed,
as the position table is resampled for one grid), and writes one file: a ZIP archive
(stored, not compressed) of

    manifest.json          what the file is: format name and version, jax version and
                           calling convention, platforms, the input and output shapes,
                           the metadata members
    program.bin            `Exported.serialize()`: the StableHLO module and its calling
                           convention (`jax.export.deserialize` reads it)
    weights.safetensors    the parameters, one tensor per Flax leaf, named by its
                           "/"-joined path (e.g. "vit/embeddings/cls_token")
    config.json, ...       each `metadata` entry (the model's config and preprocessor
                           config) as a text member of that name

A ZIP because the standard library writes and reads it, every member carries a CRC-32
that reading checks (a truncated or damaged file is caught before `deserialize` sees its
bytes), ZIP64 lifts the 4 GiB limit, and `unzip -l` lists what is inside.

The parameters are arguments of the program, not constants baked into it: the serialised
program is a flatbuffer, capped at 2 GiB (a ViT-H/14 is 2.5 GB of float32 weights), and
every compile would carry hundreds of MB of literals through XLA, which tries to fold
them. So the program stays small (tens to hundreds of KB, whatever the width), and the
weights travel as safetensors, checked on read. Its arguments are `(weights,
pixel_values)`: the weights a dict in sorted name order, then the (b, C, H, W) float32
pixels; its outputs a dict named as the twin's fields (`logits`, or `last_hidden_state`
and `pooler_output`; a distilled model's `cls_logits` and `distillation_logits` too).
It is lowered for the platform jax runs on where it is exported (`manifest.json` says
which), the platform the verification in `vit_core.export` runs it on.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import export
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from vit_core.errors import CheckpointError, InputError
from vit_core.layout import EXPORT_INPUT_NAME as INPUT_NAME
from vit_flax.modeling import FlaxViTForImageClassification, FlaxViTModel

ExportableModel = FlaxViTModel | FlaxViTForImageClassification

FORMAT = "vit-twin-stablehlo"
FORMAT_VERSION = 1
MANIFEST, PROGRAM, WEIGHTS = "manifest.json", "program.bin", "weights.safetensors"
BATCH = "b"  # the symbolic batch dimension's name
# A metadata entry becomes a member of its name: a plain file name, never a path.
_MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # ZIP's epoch: no wall-clock stamps in the file


# --------------------------------------------------------------------------- write
def _program(
    model: ExportableModel, names: list[str]
) -> Callable[[dict[str, Any], Any], tuple[Any, ...]]:
    """The twin's own forward as a function of (flat weights, pixels) -> the output fields
    `names`, in that order (a dict would come back in sorted order, not the twin's)."""

    def forward(weights: dict[str, Any], pixel_values: Any) -> tuple[Any, ...]:
        record = model(pixel_values, params=traverse_util.unflatten_dict(weights, sep="/"))
        return tuple(getattr(record, name) for name in names)

    return forward


def _member(name: str, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.external_attr = 0o644 << 16  # an ordinary file when unzipped
    return info, data


def _shape(aval: Any) -> list[int | str]:
    return [int(d) if isinstance(d, int) else str(d) for d in aval.shape]


def write_stablehlo(
    model: ExportableModel,
    path: Path,
    image_size: tuple[int, int],
    metadata: Mapping[str, str],
) -> None:
    """Export the float32 Flax twin at `image_size` (its config's size) with a symbolic
    batch, and write the archive the module docstring describes to `path` (directly:
    `vit_core.export` stages and verifies it before it takes the name asked for)."""
    if jnp.dtype(model.module.dtype) != jnp.float32:
        raise InputError(
            f"write_stablehlo exports float32 models; this one computes in "
            f"{jnp.dtype(model.module.dtype)} (load it with dtype='float32')"
        )
    if tuple(image_size) != model.config.image_hw:
        raise InputError(
            f"image_size {image_size} is not the model's {model.config.image_hw}; load it "
            "with vit_core.load(..., image_size=) to export at another size"
        )
    for key in metadata:
        if not _MEMBER_NAME.fullmatch(key) or key in (MANIFEST, PROGRAM, WEIGHTS):
            raise InputError(f"metadata key {key!r} cannot name an archive member")
    weights = {
        name: np.asarray(leaf, dtype=np.float32)
        for name, leaf in traverse_util.flatten_dict(model.params, sep="/").items()
    }
    (batch,) = export.symbolic_shape(BATCH)
    pixels = jax.ShapeDtypeStruct((batch, model.config.num_channels, *image_size), jnp.float32)
    specs = {name: jax.ShapeDtypeStruct(w.shape, jnp.float32) for name, w in weights.items()}
    names = list(jax.eval_shape(model, pixels))  # the fields with a value, in record order
    exported = export.export(jax.jit(_program(model, names)))(specs, pixels)
    outputs = [
        {"name": name, "shape": _shape(aval)}
        for name, aval in zip(names, exported.out_avals, strict=True)
    ]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "platforms": list(exported.platforms),
        "input": {"name": INPUT_NAME, "shape": _shape(pixels), "dtype": "float32"},
        "outputs": outputs,
        "metadata": sorted(metadata),
    }
    members = [
        _member(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode()),
        _member(PROGRAM, bytes(exported.serialize())),
        _member(WEIGHTS, save_safetensors(weights, metadata={"format": FORMAT})),
        *(_member(key, text.encode("utf-8")) for key, text in sorted(metadata.items())),
    ]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for info, data in members:
            archive.writestr(info, data)


# ---------------------------------------------------------------------------- read
class StableHLOModel:
    """A StableHLO archive read back and checked: call it on (N, C, H, W) pixels.

    `metadata` holds the text members (`config.json`, `preprocessor_config.json`),
    `manifest` the archive's description. The program is jitted once; each new batch size
    compiles once, from the one symbolic program.
    """

    def __init__(
        self,
        path: Path,
        exported: export.Exported,
        weights: dict[str, np.ndarray],
        manifest: dict[str, Any],
        metadata: dict[str, str],
    ) -> None:
        self.path, self.manifest, self.metadata = path, manifest, metadata
        self.exported = exported
        self.input_shape = tuple(exported.in_avals[-1].shape[1:])  # (C, H, W)
        self.output_names = [output["name"] for output in manifest["outputs"]]
        self._weights = jax.device_put(weights)
        self._call = jax.jit(exported.call)

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs on `pixels`, as float32 numpy arrays (waits for the device)."""
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != self.input_shape or not len(pixels):
            c, h, w = self.input_shape
            raise InputError(
                f"{self.path}: takes pixel_values of shape (batch >= 1, {c}, {h}, {w}); got "
                f"{pixels.shape} (an exported model runs at the one size it was exported at)"
            )
        outputs = self._call(self._weights, pixels)
        return {
            name: np.asarray(value, dtype=np.float32)
            for name, value in zip(self.output_names, outputs, strict=True)
        }


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what}; it is not a usable StableHLO file written by `python -m vit_core "
        "export --format stablehlo` (export it again)"
    )


def _read_manifest(path: Path, archive: zipfile.ZipFile) -> dict[str, Any]:
    names = set(archive.namelist())
    missing = [n for n in (MANIFEST, PROGRAM, WEIGHTS) if n not in names]
    if missing:
        raise _corrupt(path, f"a ZIP archive without {', '.join(missing)}")
    try:
        manifest = json.loads(archive.read(MANIFEST))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"its {MANIFEST} is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupt(path, f"its {MANIFEST} does not name the format {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: {FORMAT} version {manifest.get('format_version')!r}; this version of "
            f"the package reads version {FORMAT_VERSION} (export it again, or upgrade)"
        )
    listed = manifest.get("metadata")
    if not isinstance(listed, list) or not all(isinstance(k, str) and k in names for k in listed):
        raise _corrupt(path, f"its {MANIFEST} lists metadata members it does not hold")
    outputs = manifest.get("outputs")
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise _corrupt(path, f"its {MANIFEST} does not name the outputs")
    return manifest


def _check_weights(path: Path, exported: export.Exported, weights: dict[str, np.ndarray]) -> None:
    """The stored weights are exactly the program's weight arguments, shape for shape."""
    (expected, _), _ = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise _corrupt(
            path, f"its weights do not fit its program (missing {missing}, unexpected {unexpected})"
        )
    for name, aval in expected.items():
        if weights[name].shape != aval.shape or weights[name].dtype != aval.dtype:
            raise _corrupt(
                path,
                f"weight {name!r} is {weights[name].dtype}{list(weights[name].shape)}, its "
                f"program takes {aval.dtype}{list(aval.shape)}",
            )


def read_stablehlo(path: Path) -> StableHLOModel:
    """Read and check an archive `write_stablehlo` wrote; a file that is not one (another
    format, truncated, damaged, from a newer format version, or exported for another
    platform) is a clear error naming it."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = _read_manifest(path, archive)
            program, stored = archive.read(PROGRAM), archive.read(WEIGHTS)
            metadata = {key: archive.read(key).decode("utf-8") for key in manifest["metadata"]}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a StableHLO file") from None
    except zipfile.BadZipFile as exc:  # not a ZIP, cut short, or a member's CRC-32 is wrong
        raise _corrupt(path, f"not a readable ZIP archive ({exc})") from None
    except UnicodeDecodeError as exc:
        raise _corrupt(path, f"a metadata member is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc})") from None
    try:
        weights = load_safetensors(stored)
    except SafetensorError as exc:
        raise _corrupt(path, f"its {WEIGHTS} cannot be read ({exc})") from None
    try:
        exported = export.deserialize(bytearray(program))
    except Exception as exc:  # whatever jax raises on bytes it cannot read: name the file
        raise _corrupt(path, f"its {PROGRAM} cannot be deserialised ({exc})") from exc
    _check_weights(path, exported, weights)
    if len(manifest["outputs"]) != len(exported.out_avals):
        raise _corrupt(
            path,
            f"its {MANIFEST} names {len(manifest['outputs'])} outputs, its program gives "
            f"{len(exported.out_avals)}",
        )
    platform = export.default_export_platform()
    if platform not in exported.platforms:
        raise InputError(
            f"{path}: exported for {', '.join(exported.platforms)}, but jax runs on {platform} "
            "here; export it on this platform, or choose one it was exported for "
            "(e.g. JAX_PLATFORMS=cpu)"
        )
    return StableHLOModel(path, exported, weights, manifest, metadata)


def describe(path: Path) -> str:
    """The version of what `path` holds, in words (for `export`'s report): the calling
    convention of its serialised program, the jax that wrote it, the platforms it runs on."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = _read_manifest(path, archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise _corrupt(path, f"not a readable ZIP archive ({exc})") from None
    return (
        f"jax.export calling convention {manifest['calling_convention_version']}, jax "
        f"{manifest['jax_version']}, for {', '.join(manifest['platforms'])}"
    )


def run_stablehlo(path: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs of the StableHLO file at `path` on `pixels` (N, C, H, W), float32 numpy."""
    return read_stablehlo(path)(pixels)
