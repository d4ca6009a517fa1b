"""Reading and checking a canonical checkpoint: the files of a folder, then its tensors.

The safetensors header is checked (sizes, offsets, dtypes, names:
`vit_core.safetensors_header`) before any tensor is read; the tensors are then views of
a copy-on-write memory map (no pickle, no copy of the whole file), and non-finite values
are refused. What is done with each stored dtype is `DTYPE_POLICY` (and docs/errors.md).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vit_core._io import local_path
from vit_core.config import CONFIG_NAME
from vit_core.errors import CheckpointError, ConfigError, LayoutError
from vit_core.layout import WEIGHTS_NAME
from vit_core.safetensors_header import Header, read_header

# Files a user may hand us that are checkpoints, just not canonical ones.
_OTHER_FORMATS = ("pytorch_model.bin", "flax_model.msgpack", "model.safetensors.index.json")
CONVERT_HINT = "convert the original checkpoint with `python -m conversion SRC -o OUT`"

# What `load` does with each dtype a safetensors file can store (header dtype names).
# Accepted dtypes are computed in float32 unless `load(dtype=...)` asks otherwise.
DTYPE_POLICY: dict[str, str] = {
    "F32": "loaded as is",
    "F16": "accepted; cast to float32 (exact) unless dtype= asks otherwise",
    "BF16": "accepted; cast to float32 (exact) unless dtype= asks otherwise",
    "F64": "accepted; cast to float32 (rounded); a value beyond float32's range is refused",
    "F8_*, F6_*, F4": "refused (LayoutError): quantised weights; dequantise them first",
    "I8..I64, U8..U64, BOOL": "refused (LayoutError): integer tensors are not ViT weights",
    "C64": "refused (LayoutError): complex tensors are not ViT weights",
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def resolve_files(path: str | Path) -> tuple[Path, Path]:
    """(weights file, config file) of a canonical folder, or of a `.safetensors` file."""
    path = local_path(path)
    if path.is_dir():
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            found = sorted(p.name for p in path.iterdir())
            hint = (
                " It holds a checkpoint in another format: convert it first with "
                f"`python -m conversion {path} -o OUT`."
                if any(name in found for name in _OTHER_FORMATS)
                else ""
            )
            raise CheckpointError(
                f"{path}: no {WEIGHTS_NAME} in this folder "
                f"(found: {', '.join(found) or 'nothing'})." + hint
            )
    elif path.suffix == ".safetensors":
        weights = path
    elif path.suffix.lower() == ".onnx":
        raise CheckpointError(
            f"{path}: an exported graph, which the twins do not read; run it with "
            "backend='onnx' (--backend onnx), or load the model folder it was exported from"
        )
    else:
        raise CheckpointError(
            f"{path}: expected a model folder or a .safetensors file; for other formats run "
            f"`python -m conversion {path} -o OUT` first"
        )
    config = weights.parent / CONFIG_NAME
    if not config.is_file():
        raise ConfigError(f"{weights}: no {CONFIG_NAME} beside it; the architecture is unknown")
    return weights, config


def read_tensors(weights: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (no code is ever executed).

    The header is checked first (`read_header`: sizes, offsets, duplicate names), then
    the dtypes (`DTYPE_POLICY`), then the values (`check_finite`). The arrays are views
    of a copy-on-write memory map (`map_tensors`): the file is read once, by the page
    cache, and never copied whole into memory. Each tensor's pages leave this process as
    soon as it is checked: reading it again is a minor fault from the page cache, and a
    tensor the model never reads again (a weight quantized to int8, query/key/value once
    fused) then never comes back, so int8 models need no float copy in memory.
    """
    header = read_header(weights)
    check_dtypes(header)
    tensors = map_tensors(header)
    check_finite(tensors, str(weights), checked=release_pages)
    return tensors


def map_tensors(header: Header) -> dict[str, np.ndarray]:
    """The tensors of a checked header as views into a copy-on-write map of its file.

    Nothing is read until a tensor is used and nothing is copied until one is written
    (a model that trains gets private copies of the pages it changes; the file is never
    written). The header check guarantees every byte range lies inside the file.
    """
    start = 8 + header.header_bytes
    if header.file_bytes == start:  # every tensor is empty: there is nothing to map
        return {
            name: np.zeros(info.shape, numpy_dtype(info.dtype))
            for name, info in header.tensors.items()
        }
    try:
        with open(header.path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{header.path}: cannot map the file ({exc})") from None
    data = np.frombuffer(mapping, dtype=np.uint8)[start:]
    tensors = {}
    for name, info in header.tensors.items():
        array = data[info.begin : info.end].view(numpy_dtype(info.dtype)).reshape(info.shape)
        tensors[name] = array if array.flags.aligned else array.copy()  # frameworks want alignment
    return tensors


def release_pages(array: np.ndarray) -> None:
    """Drop the pages that lie wholly inside a mapped tensor from this process's memory.

    For tensors that were only read to check them (`read_tensors`), copied into another
    buffer (query, key and value, once fused) or replaced by another form (weights
    quantized to int8): their pages would otherwise stay resident for as long as the model
    holds the rest of the map. Reading the tensor again faults its pages back in from the
    page cache. Only for tensors never written: a written page of this copy-on-write map is
    private, and dropping it would bring back the file's values. A tensor that is not
    mapped is left alone.
    """
    owner: Any = array
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    mapping = owner.base.obj if isinstance(owner.base, memoryview) else None
    if not isinstance(mapping, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    begin = array.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
    first = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours stay
    last = (begin + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype of a safetensors header name ("F32", "BF16", ...) or of a numpy
    name ("float32", "bfloat16", ...); bfloat16 is ml_dtypes'."""
    name = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(
        name, name
    )
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_dtypes(header: Header) -> None:
    """Refuse, before reading them, tensors whose dtype `DTYPE_POLICY` does not accept."""
    if not header.tensors:
        raise CheckpointError(
            f"{header.path}: holds no tensors (an empty safetensors file); {CONVERT_HINT}, or "
            "save the model again"
        )
    bad = {k: info.dtype for k, info in header.tensors.items() if info.dtype not in FLOAT_DTYPES}
    if not bad:
        return
    kinds = set(bad.values())
    if any(d.startswith(("F8", "F6", "F4")) for d in kinds):
        why = "low-precision floats are quantised weights: dequantise them to float32 first"
    elif "C64" in kinds:
        why = "complex numbers are not ViT weights"
    else:
        why = (
            "integers are quantised weights or not weights at all (step counters, indices): "
            f"use a floating-point checkpoint, or {CONVERT_HINT}"
        )
    listed = ", ".join(f"{k} ({d})" for k, d in list(bad.items())[:5])
    more = f", ... ({len(bad)} in all)" if len(bad) > 5 else ""
    raise LayoutError(
        f"{header.path}: {len(bad)} tensor(s) of a dtype ViT weights cannot have: {listed}"
        f"{more}; expected a float dtype ({', '.join(FLOAT_DTYPES)}); {why}"
    )


def non_finite_report(
    tensors: Mapping[str, np.ndarray], checked: Callable[[np.ndarray], None] | None = None
) -> str | None:
    """'N tensor(s) hold non-finite values: key: 2 NaN of 768 values; ...', or None.

    Counted in each float tensor: NaN, +-inf, and float64 values beyond float32's range
    (they would become inf in the float32 model). `checked` is called with each tensor
    once it is counted (`read_tensors` gives its mapped pages back there, one tensor at a
    time, so checking never holds the whole file resident).
    """
    problems = []
    for key, value in tensors.items():
        if value.dtype.name not in ("float32", "float16", "bfloat16", "float64"):
            continue
        nan = int(np.count_nonzero(np.isnan(value)))
        inf = int(np.count_nonzero(np.isinf(value)))
        big = 0
        if value.dtype == np.float64:
            big = int(np.count_nonzero(np.abs(np.nan_to_num(value)) > _FLOAT32_MAX)) - inf
        if checked is not None:
            checked(value)
        if nan or inf or big:
            parts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n]
            parts += [f"{big} beyond float32's range"] if big else []
            problems.append(f"{key}: {', '.join(parts)} of {value.size} values")
    if not problems:
        return None
    more = f"; ... ({len(problems)} tensors in all)" if len(problems) > 5 else ""
    return f"{len(problems)} tensor(s) hold non-finite values: {'; '.join(problems[:5])}{more}"


def check_finite(
    tensors: Mapping[str, np.ndarray],
    source: str,
    checked: Callable[[np.ndarray], None] | None = None,
) -> None:
    """Refuse NaN or infinite weights, and float64 values that overflow float32.

    A trained checkpoint never holds them: the model would answer NaN for every input.
    The error names each tensor and how many values are bad. `checked` is called with
    each tensor once it is checked (see `non_finite_report`).
    """
    report = non_finite_report(tensors, checked)
    if report:
        raise CheckpointError(
            f"{source}: {report}. A usable model never does (the file is corrupt, or "
            "training diverged): re-export it from a good checkpoint"
        )
