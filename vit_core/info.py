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
from vit_core.layout import ModelKind, check_layout, model_kind
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
    name, transformers_class = family(config, kind)
    return {
        "folder": str(weights.parent),
        "model": kind.architecture,
        "family": name,
        "transformers_class": transformers_class if layout_problem is None else None,
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


def family(config: ViTConfig, kind: ModelKind) -> tuple[str, str | None]:
    """(the family a config belongs to, the transformers class that computes the same
    function from the same weights, or None), judged from the switches (docs/families.md)."""
    c = config
    if kind.decoder:  # only transformers' ViT has the SimMIM decoder
        name, _ = family(config, ModelKind(classifier=False, pooler=False))
        return name, kind.architecture if c.transformers_compatible else None
    plain_blocks = c.layerscale_value is None and not c.use_swiglu_ffn
    if c.transformers_compatible:
        return "ViT", kind.architecture
    if c.use_distillation_token:
        if not plain_blocks or c.num_register_tokens or c.use_pre_norm:
            return "DeiT (distilled) variant", None
        return "DeiT (distilled)", (
            "DeiTForImageClassificationWithTeacher" if kind.classifier else "DeiTModel"
        )
    if c.pooling_type == "map":
        siglip = (
            plain_blocks
            and not (c.use_class_token or c.num_register_tokens or c.use_pre_norm)
            and c.patch_embedding_bias
            and c.has_token_norm
            and not kind.classifier
        )
        return "SigLIP (MAP head)", "SiglipVisionModel" if siglip else None
    if c.use_pre_norm and not c.patch_embedding_bias:
        clip = plain_blocks and c.pooling_type == "cls" and not c.num_register_tokens
        head = "CLIPVisionModelWithProjection (a head without bias)" if kind.classifier else None
        return "CLIP", (head or "CLIPVisionModel") if clip and c.has_token_norm else None
    if c.layerscale_value is not None and c.pooling_type == "cls" and c.has_token_norm:
        if c.num_register_tokens:
            dinov2 = c.no_embed_class and not kind.classifier
            return "DINOv2 with registers", "Dinov2WithRegistersModel" if dinov2 else None
        if not c.no_embed_class:
            return "DINOv2", None if kind.classifier else "Dinov2Model"
        return "DeiT-3", None
    if c.num_register_tokens:
        return "ViT with registers", None
    if c.pooling_type == "mean":
        return "ViT, average-pooled (gap)", None
    return "ViT variant", None


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
        f"family:        {info['family']} (the same function in transformers: "
        f"{info['transformers_class'] or 'none'})",
        f"architecture:  width {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads} heads, MLP {c.intermediate_size}, patch {ph}x{pw}, "
        f"image {h}x{w} ({gh}x{gw} patches), {c.num_channels} channels",
        f"numerics:      layer_norm_eps {c.layer_norm_eps:g}, hidden_act {c.hidden_act}, "
        f"pooling {c.pooling_type}, class token {'yes' if c.use_class_token else 'no'}, "
        f"{c.num_register_tokens} register tokens",
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
