"""What a model folder holds, read from the safetensors header and config alone.

No tensor is loaded and no framework imported, so `python -m vit_core info` answers in
milliseconds even for a large checkpoint, and can describe a folder whose framework is not
installed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from vit_core.checkpoint import resolve_files
from vit_core.config import EXTENSION_FIELDS, ViTConfig
from vit_core.errors import CheckpointError
from vit_core.layout import check_layout, model_kind
from vit_core.safetensors_header import read_header


class _ShapeOnly:
    """Stands in for a tensor where only `.shape` is read (`check_layout`)."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)


def folder_info(path: str | Path) -> dict[str, Any]:
    """Architecture, parameter count, file size, dtypes, metadata and compatibility."""
    weights, config_file = resolve_files(path)
    config = ViTConfig.from_json_file(config_file)
    header = read_header(weights)  # checked: offsets, dtypes, duplicate names
    shapes = {key: list(t.shape) for key, t in header.tensors.items()}
    dtypes = Counter(t.dtype for t in header.tensors.values())
    metadata = header.metadata
    kind = model_kind(shapes, config)
    layout_problem = None
    try:
        check_layout({k: _ShapeOnly(v) for k, v in shapes.items()}, config, kind, str(weights))
    except CheckpointError as exc:
        layout_problem = str(exc)
    parameters = sum(_product(shape) for shape in shapes.values())
    departures = [
        f"{k}={getattr(config, k)!r}"
        for k, v in EXTENSION_FIELDS.items()
        if getattr(config, k) != v
    ]
    return {
        "folder": str(weights.parent),
        "model": "ViTForImageClassification" if kind.classifier else "ViTModel",
        "pooler": kind.pooler,
        "config": config,
        "parameters": parameters,
        "file_bytes": weights.stat().st_size,
        "dtypes": dict(dtypes),
        "metadata": metadata,
        "layout_problem": layout_problem,
        "transformers_compatible": not departures and layout_problem is None,
        "departures": departures,
    }


def _product(shape: list[int]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def format_info(info: dict[str, Any]) -> str:
    """The human-readable report of `folder_info`."""
    c: ViTConfig = info["config"]
    (h, w), (ph, pw), (gh, gw) = c.image_hw, c.patch_hw, c.grid_hw
    labels = ", ".join(f"{i}: {c.id2label[i]}" for i in list(c.id2label)[:3])
    more = ", ..." if c.num_labels > 3 else ""
    compatible = (
        "yes (transformers' ViT computes the same function from this folder)"
        if info["transformers_compatible"]
        else "no: " + "; ".join(info["departures"] or [info["layout_problem"]])
    )
    lines = [
        f"folder:        {info['folder']}",
        f"model:         {info['model']}" + (" with pooler" if info["pooler"] else ""),
        f"architecture:  width {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads} heads, MLP {c.intermediate_size}, patch {ph}x{pw}, "
        f"image {h}x{w} ({gh}x{gw} patches), {c.num_channels} channels",
        f"numerics:      layer_norm_eps {c.layer_norm_eps:g}, hidden_act {c.hidden_act}, "
        f"pooling {c.pooling_type}, class token {'yes' if c.use_class_token else 'no'}",
        f"labels:        {c.num_labels}" + (f" ({labels}{more})" if c.num_labels else ""),
        f"parameters:    {info['parameters']:,}",
        f"file:          model.safetensors, {info['file_bytes'] / 2**20:.1f} MiB, dtypes "
        + ", ".join(f"{d} x{n}" for d, n in sorted(info["dtypes"].items())),
        "metadata:      "
        + (", ".join(f"{k}={v}" for k, v in sorted(info["metadata"].items())) or "none"),
        f"transformers:  {compatible}",
    ]
    if info["layout_problem"]:
        lines.append(f"layout:        {info['layout_problem']}")
    return "\n".join(lines)
