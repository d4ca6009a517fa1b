"""The safetensors header, read and checked by hand before any tensor is touched.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the
tensor bytes. The JSON maps each tensor name to `{"dtype", "shape", "data_offsets"}`
(offsets relative to the end of the header) plus an optional `__metadata__` object of
strings. `read_header` checks everything a hostile or broken file could get wrong, and
says which, before the safetensors library maps a single byte of tensor data:

- the file is long enough to hold the length field and the header it declares, and the
  declared length is not absurd (at most `MAX_HEADER_BYTES`, the library's own limit);
- the header is UTF-8 JSON, one object, with no name given twice (JSON allows duplicate
  keys and a parser silently keeps the last one);
- each entry has a known dtype, a shape of non-negative ints and two int offsets, and
  the byte count its offsets span equals shape x dtype size;
- the tensors tile the data area exactly: sorted by offset, each starts where the
  previous one ended, none overlaps another, and the last ends at the end of the file
  (so a truncated file, or bytes appended to one, is named as such).

Only numbers and names are read here; nothing in the file is executed or decoded as
anything but JSON.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vit_core.errors import CheckpointError

# The safetensors library refuses longer headers; a header this size already describes
# hundreds of thousands of tensors.
MAX_HEADER_BYTES = 100_000_000
# Bits per element of every dtype the format defines (safetensors 0.8).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}
_NEXT_STEP = "the file is damaged or not a safetensors file: re-download or re-export it"


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype name as the format spells it, shape, byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A checked header: tensors by name, in file order, and the metadata strings."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_bytes: int = 0
    file_bytes: int = 0


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` that refuses a name given twice, at any depth."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _looks_like(head: bytes) -> str:
    """What a file that is not safetensors starts like, for the error message."""
    if not head:
        return "it is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return "it starts like a zip archive (a PyTorch .pth/.bin or a numpy .npz?)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "it starts like a Python pickle (a PyTorch .pth/.bin?)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "it starts like a JSON text file"
    if head[:1] in (b"\xde", b"\xdf") or 0x81 <= head[0] <= 0x8F:
        return "it starts like a msgpack file (a Flax flax_model.msgpack?)"
    if head[:4] == b"\x89HDF":
        return "it starts like an HDF5 file (a Keras .h5?)"
    return "its first bytes match no known weights format"


def _fail(path: Path, problem: str, next_step: str = _NEXT_STEP) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file: {problem}; {next_step}")


def read_header(path: str | os.PathLike[str]) -> Header:
    """The checked header of the safetensors file at `path`, or a `CheckpointError` naming
    the file and what is wrong with it. Reads 8 + N bytes, never the tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            if len(head) < 8:
                raise _fail(
                    path,
                    f"{_looks_like(head)}; a safetensors file is at least 8 bytes "
                    f"(found {len(head)})",
                )
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length > size - 8:
                what = _looks_like(head)
                raise _fail(
                    path,
                    f"it declares a {length}-byte header but "
                    + (
                        f"the limit is {MAX_HEADER_BYTES} bytes"
                        if length > MAX_HEADER_BYTES
                        else f"the file holds only {size - 8} bytes after the length field"
                    )
                    + (f" ({what})" if not what.startswith("its first bytes") else "")
                    + ("; truncated?" if length <= MAX_HEADER_BYTES else ""),
                )
            raw = handle.read(length)
    except CheckpointError:
        raise
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a safetensors file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the file ({exc})") from None
    if len(raw) != length:  # the file shrank while being read
        raise _fail(path, f"header cut short ({len(raw)} of {length} bytes)")
    return _parse(path, raw, size)


def _parse(path: Path, raw: bytes, size: int) -> Header:
    if not raw.lstrip()[:1] == b"{":
        raise _fail(path, "the header is not a JSON object (it must start with '{')")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise _fail(
            path,
            f"the header names {exc.key!r} twice (a reader would silently keep one of the two)",
            "the file was written by a broken or hostile tool: re-export it",
        ) from None
    except UnicodeDecodeError as exc:
        raise _fail(path, f"the header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(path, f"the header is a JSON {type(data).__name__}, not an object")
    metadata = data.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ must be an object of strings")
    data_bytes = size - 8 - len(raw)
    tensors = {name: _entry(path, name, entry) for name, entry in data.items()}
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            problem = (
                f"tensor {name!r} starts at byte {info.begin}, inside the previous tensor "
                f"(which ends at {position}): tensors overlap"
                if info.begin < position
                else f"a gap of {info.begin - position} unused bytes before tensor {name!r} "
                f"(bytes {position}..{info.begin})"
            )
            raise _fail(path, problem)
        position = info.end
    if position != data_bytes:
        problem = (
            f"the header describes {position} bytes of tensor data but the file holds "
            f"{data_bytes}: "
            + ("the file is truncated" if position > data_bytes else "extra bytes at the end")
        )
        raise _fail(path, problem)
    return Header(path, tensors, dict(metadata), len(raw), size)


def _entry(path: Path, name: str, entry: Any) -> TensorInfo:
    """One tensor's header entry, checked."""
    where = f"tensor {name!r}"
    if not isinstance(entry, dict):
        raise _fail(path, f"{where}: entry is a JSON {type(entry).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise _fail(path, f"{where}: entry lacks {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _fail(
            path,
            f"{where}: unknown dtype {dtype!r} (the format defines {', '.join(DTYPE_BITS)})",
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _fail(path, f"{where}: shape must be a list of ints >= 0; found {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(
            path, f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end; found "
            f"{offsets!r}"
        )  # fmt: skip
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    span = offsets[1] - offsets[0]
    if bits % 8 or bits // 8 != span:
        raise _fail(
            path,
            f"{where}: shape {tuple(shape)} of {dtype} needs {bits / 8:g} bytes but its offsets "
            f"{offsets} span {span}",
        )
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
