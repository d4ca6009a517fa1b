"""The source readers, by kind, and what they share: safe container reading, the size table.

Each kind is a module `conversion.sources.<kind>` with `detect(path)` and
`read(path, hints)` (see `base.SourceReader`). Modules are imported by name only when
asked for, so a kind whose module (or whose framework) is missing costs nothing until
it is used, and an error then says which.

The container helpers read weights without ever running code from the file: safetensors
(a header and raw bytes) and PyTorch files through `torch.load(weights_only=True)`, which
refuses any pickle that names a function or class outside the tensor vocabulary.
"""

from __future__ import annotations

import importlib
import json
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from vit_core.errors import CheckpointError, ConfigError
from vit_core.names import SIZES
from vit_core.safetensors_header import MAX_HEADER_BYTES

# Detection order is irrelevant (exactly one reader may claim a file); this is the order
# `--from` lists them in.
KINDS: dict[str, str] = {
    "timm": "conversion.sources.timm",
    "jax": "conversion.sources.jax",
    "hf": "conversion.sources.hf",
}
# Heads by width in the standard ViT sizes (ViT paper Table 1; tiny/small from DeiT).
HEADS_BY_WIDTH = {fields["hidden_size"]: fields["num_attention_heads"] for fields in SIZES.values()}


def reader(kind: str) -> ModuleType:
    """The reader module of `kind`, imported now; a `CheckpointError` if it is not there."""
    if kind not in KINDS:
        raise CheckpointError(f"unknown source kind {kind!r}; choose one of {', '.join(KINDS)}")
    try:
        return importlib.import_module(KINDS[kind])
    except ModuleNotFoundError as exc:
        if exc.name != KINDS[kind]:
            raise  # the reader is there, one of its own imports is not: say that one
        raise CheckpointError(
            f"the {kind!r} reader ({KINDS[kind]}) is not part of this installation"
        ) from None


def available_readers() -> dict[str, ModuleType]:
    """Every reader module that can be imported, by kind."""
    found = {}
    for kind in KINDS:
        try:
            found[kind] = reader(kind)
        except CheckpointError:
            continue
    return found


# ------------------------------------------------------------------ what a file is
def sniff(path: Path) -> str:
    """The container format of a file from its first bytes (never its name).

    One of "safetensors", "torch-zip", "npz", "zip" (unreadable archive), "pickle",
    "json", "msgpack", "empty", "unknown".
    """
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, UnicodeDecodeError, NotImplementedError):
            return "zip"
        if any(name.endswith("data.pkl") for name in names):
            return "torch-zip"
        return "npz" if names and all(name.endswith(".npy") for name in names) else "zip"
    if len(head) >= 9:
        (header_size,) = struct.unpack("<Q", head[:8])
        if 0 < header_size <= MAX_HEADER_BYTES and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    if head[:1] in (b"\xde", b"\xdf") or 0x81 <= head[0] <= 0x8F:
        return "msgpack"
    return "unknown"


# ------------------------------------------------------------------- safetensors
def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as numpy, header metadata). bfloat16 stays bfloat16 (ml_dtypes)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            try:
                return {key: handle.get_tensor(key) for key in keys}, metadata
            except (KeyError, TypeError):  # a dtype numpy lacks (bfloat16): via torch
                pass
        with safe_open(path, framework="pt") as handle:
            return {key: torch_to_numpy(handle.get_tensor(key)) for key in keys}, metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({exc})"
        ) from None


def safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({exc})"
        ) from None


# ----------------------------------------------------------------------- PyTorch
def torch_to_numpy(tensor: Any) -> np.ndarray:
    """A CPU tensor as numpy without changing its values; bfloat16 becomes ml_dtypes'."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _unpickling_refusal(path: Path, exc: Exception) -> CheckpointError:
    """Say which code a refused pickle asked for, and that it did not run."""
    text = str(exc)
    wanted = re.search(r"GLOBAL ([\w.]+)", text)
    if wanted:
        reason = f"it asks to call or build {wanted[1]}, which a weights file never needs"
    else:
        detail = next(
            (line.strip() for line in text.splitlines() if "Unsupported" in line),
            text.splitlines()[0] if text else type(exc).__name__,
        )
        reason = f"it holds something other than tensors ({detail})"
    return CheckpointError(
        f"{path}: refused to unpickle: {reason}. Nothing in it was run (read with "
        "torch.load(weights_only=True)). If you made this file yourself, re-save only the "
        "state dict: torch.save(model.state_dict(), path), or save_file(...) from safetensors"
    )


def load_torch_file(path: Path) -> Any:
    """The object in a PyTorch file, read safely: no code from the file is run.

    Zip-format files are memory-mapped, so detection and reading share one cheap load.
    `argparse.Namespace` (the `args` entry of timm training checkpoints) is allowed: it
    is plain data.
    """
    import argparse
    import pickle

    import torch

    kind = sniff(path)
    if kind not in ("torch-zip", "pickle"):
        raise CheckpointError(_not_torch_reason(path, kind))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "torch-zip")
    except pickle.UnpicklingError as exc:
        raise _unpickling_refusal(path, exc) from None
    except (
        RuntimeError, EOFError, OSError, ValueError, struct.error,
        KeyError, IndexError, TypeError, AttributeError,  # a mangled pickle stream
    ) as exc:  # fmt: skip
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch file, truncated or corrupt ({first})"
        ) from None


def _not_torch_reason(path: Path, kind: str) -> str:
    return {
        "empty": f"{path}: the file is empty",
        "zip": f"{path}: a zip archive that cannot be read (truncated or corrupt)",
        "json": f"{path}: a JSON file, not weights",
    }.get(kind, f"{path}: not a PyTorch file (its first bytes say {kind})")


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """The tensor mapping inside a checkpoint: `{"model": ...}`, `{"state_dict": ...}`
    (timm training checkpoints) or the state dict itself; a `module.` prefix (from
    DistributedDataParallel) is removed from every key when every key has it."""
    import torch

    for _ in range(3):  # wrappers nest at most a couple of levels
        if not isinstance(obj, Mapping):
            break
        inner = next(
            (obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names "
            "to tensors)"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{path}: holds a mapping with no tensors (keys: {_preview(obj)}); not weights"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def wrapper_entries(obj: Any) -> dict[str, Any]:
    """Non-tensor entries beside a wrapped state dict (timm's `arch`, `args`...)."""
    if not isinstance(obj, Mapping) or not any(k in obj for k in ("state_dict", "model")):
        return {}
    return {k: v for k, v in obj.items() if k not in ("state_dict", "model", "optimizer")}


def state_dict_keys(path: Path) -> list[str]:
    """Tensor names of a PyTorch or safetensors weights file (cheap: mmap or header)."""
    kind = sniff(path)
    if kind == "safetensors":
        return safetensors_keys(path)
    return list(unwrap_state_dict(load_torch_file(path), path))


def read_state_dict(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(numpy state dict, extras) of a PyTorch or safetensors weights file.

    extras: safetensors metadata, or the entries beside a wrapped state dict.
    """
    if sniff(path) == "safetensors":
        return read_safetensors(path)
    obj = load_torch_file(path)
    tensors = unwrap_state_dict(obj, path)
    return {k: torch_to_numpy(v) for k, v in tensors.items()}, wrapper_entries(obj)


def _preview(keys: Any, count: int = 6) -> str:
    names = [str(k) for k in keys]
    more = f", ... ({len(names)} in all)" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def preview_keys(keys: Any, count: int = 6) -> str:
    """A few names of a long key list, for error messages."""
    return _preview(sorted(keys), count)


# ---------------------------------------------------------------------- sizes
def heads_for_width(width: int, hints: Mapping[str, Any], why: str) -> tuple[int, str | None]:
    """(head count, what was assumed or None): from the hints, else the standard table.

    `why` says why the source cannot tell (e.g. "a timm file does not store it").
    """
    if "num_attention_heads" in hints:
        heads = hints["num_attention_heads"]
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0:
            raise ConfigError(f"num_attention_heads must be a positive int; got {heads!r}")
        return heads, None
    if width not in HEADS_BY_WIDTH:
        known = ", ".join(f"{w}->{h}" for w, h in HEADS_BY_WIDTH.items())
        raise ConfigError(
            f"the head count is unknown: {why}, and width {width} is not a standard ViT "
            f"width ({known}); pass --set num_attention_heads=N or --model-name NAME"
        )
    heads = HEADS_BY_WIDTH[width]
    return heads, (
        f"num_attention_heads={heads}: {why}; the standard ViT table gives {heads} heads for "
        f"width {width} (pass --set num_attention_heads=N or --model-name if yours differs)"
    )


def is_timm_config(data: Mapping[str, Any]) -> bool:
    """Whether a config.json is timm's (`architecture`, as `save_for_hf` writes), not
    transformers' (`model_type`)."""
    return "architecture" in data and "model_type" not in data


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or a `CheckpointError` naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
