"""timm `VisionTransformer` checkpoints -> canonical tensors.

Reads a state dict from `.pth`/`.pt`/`.bin` (plain, `{"model": ...}`, `{"state_dict":
...}`, `module.`-prefixed) or `.safetensors`, or a timm hub folder (`config.json` with an
`architecture` + weights). The architecture comes from the weights: patch size from the
conv kernel, width, depth, MLP width, classes, and the image size from the position table
(a square grid unless the hints give the size). The head count is not in the weights: it
comes from the hints, else the standard ViT table, and the result says so.

Only plain ViT is converted. timm's other families share most key names but compute
something else (registers, distillation, layer scale, fc_norm, qk-norm, MAP head, ...):
`FAMILIES` names each by the keys that give it away, and such a file is refused with
that name, never converted into a model that computes a different function.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from conversion.sources import (
    is_timm_config,
    preview_keys,
    read_json,
    read_state_dict,
    sniff,
    state_dict_keys,
)
from conversion.sources.base import Architecture, Rule, SourceWeights, copy, position_table
from vit_core.config import hw_pair
from vit_core.errors import CheckpointError, ConfigError

SOURCE_FORMAT = "timm"
# timm's own loader resamples position tables with antialiased bicubic.
DEFAULT_INTERPOLATION = "bicubic_antialias"
NUMERICS = {"layer_norm_eps": 1e-6, "hidden_act": "gelu"}  # timm: LayerNorm(eps=1e-6), nn.GELU
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # inside a timm hub folder
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_GLOBAL_POOL = {"token": "cls", "": "cls", "avg": "mean"}


# ------------------------------------------------------------------ transforms
def split_qkv(value: np.ndarray, arch: Architecture) -> np.ndarray:
    """timm's fused (3D, ...) projection: rows 0:D query, D:2D key, 2D:3D value, stacked."""
    if value.shape[0] != 3 * arch.width:
        raise CheckpointError(
            f"has {value.shape[0]} rows (shape {tuple(value.shape)}); a fused query/key/value "
            f"projection needs 3 x width = {3 * arch.width}: inconsistent shapes"
        )
    return value.reshape(3, arch.width, *value.shape[1:])


# ------------------------------------------------------------------ key rules
# timm key -> canonical key (before the `vit.` prefix), and the transform.
# fmt: off
RULES: tuple[Rule, ...] = (
    Rule("cls_token", "embeddings.cls_token", copy),
    Rule("pos_embed", "embeddings.position_embeddings", position_table),
    Rule("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight", copy),
    Rule("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias", copy),
    Rule("blocks.{i}.norm1.weight", "encoder.layer.{i}.layernorm_before.weight", copy),
    Rule("blocks.{i}.norm1.bias", "encoder.layer.{i}.layernorm_before.bias", copy),
    Rule("blocks.{i}.attn.qkv.weight", "encoder.layer.{i}.attention.attention.{qkv}.weight",
         split_qkv),
    Rule("blocks.{i}.attn.qkv.bias", "encoder.layer.{i}.attention.attention.{qkv}.bias",
         split_qkv),
    Rule("blocks.{i}.attn.proj.weight", "encoder.layer.{i}.attention.output.dense.weight", copy),
    Rule("blocks.{i}.attn.proj.bias", "encoder.layer.{i}.attention.output.dense.bias", copy),
    Rule("blocks.{i}.norm2.weight", "encoder.layer.{i}.layernorm_after.weight", copy),
    Rule("blocks.{i}.norm2.bias", "encoder.layer.{i}.layernorm_after.bias", copy),
    Rule("blocks.{i}.mlp.fc1.weight", "encoder.layer.{i}.intermediate.dense.weight", copy),
    Rule("blocks.{i}.mlp.fc1.bias", "encoder.layer.{i}.intermediate.dense.bias", copy),
    Rule("blocks.{i}.mlp.fc2.weight", "encoder.layer.{i}.output.dense.weight", copy),
    Rule("blocks.{i}.mlp.fc2.bias", "encoder.layer.{i}.output.dense.bias", copy),
    Rule("norm.weight", "layernorm.weight", copy),
    Rule("norm.bias", "layernorm.bias", copy),
    # timm before 0.6: the ImageNet-21k representation layer (Dense + tanh) = HF's pooler
    Rule("pre_logits.fc.weight", "pooler.dense.weight", copy),
    Rule("pre_logits.fc.bias", "pooler.dense.bias", copy),
    Rule("head.weight", "classifier.weight", copy),
    Rule("head.bias", "classifier.bias", copy),
)
# Keys that give away a timm family other than plain ViT: pattern -> what it is.
FAMILIES: tuple[tuple[str, str], ...] = (
    (r"^reg_token$", "register tokens (`reg_token`): a ViT with registers"),
    (r"^dist_token$|^head_dist\.", "a distillation token (`dist_token`, `head_dist`): "
                                   "DeiT distilled"),
    (r"\.ls[12]\.gamma$|\.gamma_[12]$", "layer scale (`ls1.gamma`/`ls2.gamma`): "
                                        "DeiT-3/CaiT-style blocks (init_values)"),
    (r"^fc_norm\.", "a LayerNorm after pooling (`fc_norm`): an average-pooled head"),
    (r"^norm_pre\.", "a LayerNorm before the blocks (`norm_pre`): a CLIP-style ViT"),
    (r"\.attn\.[qk]_norm\.", "query/key normalisation (`attn.q_norm`, `attn.k_norm`)"),
    (r"^attn_pool\.", "an attention-pooling head (`attn_pool`): a MAP head"),
    (r"^patch_embed\.backbone\.", "a CNN stem (`patch_embed.backbone`): a hybrid ResNet-ViT"),
    (r"^patch_embed\.norm\.", "a LayerNorm inside the patch embedding (`patch_embed.norm`)"),
    (r"\.attn\.norm\.|\.mlp\.norm\.", "extra LayerNorms inside the blocks "
                                      "(scale_attn_norm / scale_mlp_norm)"),
    (r"\.mlp\.fc1_[gx]\.|\.mlp\.w12\.", "a gated MLP (SwiGLU)"),
    (r"rope|freqs", "rotary position embeddings"),
    (r"^head\.(fc|norm)\.", "a head with more than one layer"),
)
# fmt: on


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_COMPILED = tuple((_compile(rule.source), rule) for rule in RULES)


# --------------------------------------------------------------------- detect
def _is_timm_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        data = read_json(config)
    except CheckpointError:
        return False
    return is_timm_config(data)


def detect(path: Path) -> bool:
    """A timm state dict (by its keys) or a timm hub folder (config.json `architecture`)."""
    path = Path(path)
    if path.is_dir():
        return _is_timm_folder(path) and any((path / n).is_file() for n in WEIGHT_FILES)
    try:
        if sniff(path) not in ("safetensors", "torch-zip", "pickle"):
            return False
        keys = set(state_dict_keys(path))
    except (CheckpointError, OSError):
        return False
    return "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys)


# ----------------------------------------------------------------------- read
def read(path: Path, hints: dict[str, Any]) -> SourceWeights:
    """Canonical tensors and config fields of a timm ViT checkpoint."""
    path = Path(path)
    weights_file, file_hints, processor = _locate(path)
    tensors, extras = read_state_dict(weights_file)
    side_hints, side_processor = _hints_from_extras(extras)
    hints = {**side_hints, **file_hints, **hints}  # what the user says wins
    processor = {**side_processor, **processor}
    _refuse_other_families(tensors, weights_file)
    arch, config, assumed = _architecture(tensors, hints, weights_file)
    canonical = _apply_rules(tensors, arch, weights_file)
    if not processor:
        assumed.append(
            "preprocessing: mean = std = 0.5 and bicubic resize to the image size (timm's "
            "values for the augreg and original ViT weights; no pretrained_cfg in the file)"
        )
    height, width = config["image_size"]
    processor = {
        "size": {"height": height, "width": width},
        "resample": _PIL_RESAMPLE["bicubic"],
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        **processor,
    }
    return SourceWeights(
        tensors=canonical,
        config=config,
        source_format=SOURCE_FORMAT,
        assumed=assumed,
        processor=processor,
    )


def weight_files(path: Path) -> list[Path]:
    """The files whose bytes the conversion depends on (hashed into the metadata)."""
    return [_locate(Path(path))[0]]


def _locate(path: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(weights file, hints, processor fields) of a file or a timm hub folder."""
    if not path.is_dir():
        return path, {}, {}
    if not _is_timm_folder(path):
        raise CheckpointError(f"{path}: not a timm folder (no config.json with `architecture`)")
    file = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
    if file is None:
        raise CheckpointError(f"{path}: a timm folder without {' or '.join(WEIGHT_FILES)}")
    hints, processor = hints_from_timm_config(read_json(path / "config.json"))
    return file, hints, processor


def hints_from_timm_config(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config hints, processor fields) from a timm `config.json` (as `save_for_hf` writes)."""
    from vit_core.names import name_fields

    hints: dict[str, Any] = {}
    architecture = data.get("architecture")
    if isinstance(architecture, str):
        # not a standard plain-ViT name: the keys decide what it is
        with contextlib.suppress(ConfigError):
            hints["num_attention_heads"] = name_fields(architecture)["num_attention_heads"]
    args = data.get("model_args") or {}
    if isinstance(args.get("num_heads"), int):
        hints["num_attention_heads"] = args["num_heads"]
    if "img_size" in args:
        hints["image_size"] = args["img_size"]
    pool = data.get("global_pool", args.get("global_pool"))
    if pool is not None:
        if pool not in _GLOBAL_POOL:
            raise CheckpointError(
                f"timm config says global_pool={pool!r}: not plain ViT (supported: token, avg "
                "without fc_norm)"
            )
        hints["pooling_type"] = _GLOBAL_POOL[pool]
    labels = data.get("label_names")
    if isinstance(labels, list):
        hints["id2label"] = dict(enumerate(map(str, labels)))
    elif isinstance(labels, dict):
        hints["id2label"] = {int(k): str(v) for k, v in labels.items()}
    return hints, processor_from_pretrained_cfg(data.get("pretrained_cfg"))


def processor_from_pretrained_cfg(cfg: Any) -> dict[str, Any]:
    """ViTImageProcessor fields from timm's pretrained_cfg (mean, std, input size, filter)."""
    if not isinstance(cfg, Mapping):
        return {}
    out: dict[str, Any] = {}
    if "mean" in cfg and "std" in cfg:
        out["image_mean"], out["image_std"] = list(cfg["mean"]), list(cfg["std"])
    size = cfg.get("input_size")
    if isinstance(size, list | tuple) and len(size) == 3:
        out["size"] = {"height": int(size[1]), "width": int(size[2])}
    if cfg.get("interpolation") in _PIL_RESAMPLE:
        out["resample"] = _PIL_RESAMPLE[cfg["interpolation"]]
    return out


def _hints_from_extras(extras: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Hints from what sits beside the weights: a training checkpoint's `arch`, a
    `pretrained_cfg` entry (a mapping, or JSON text in safetensors metadata)."""
    import json

    hints: dict[str, Any] = {}
    arch = extras.get("arch")
    if isinstance(arch, str):
        from vit_core.names import name_fields

        with contextlib.suppress(ConfigError):
            hints["num_attention_heads"] = name_fields(arch)["num_attention_heads"]
    cfg = extras.get("pretrained_cfg")
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except json.JSONDecodeError:
            cfg = None
    return hints, processor_from_pretrained_cfg(cfg)


def _refuse_other_families(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """Refuse, naming what was found, any checkpoint that is not plain ViT."""
    found = []
    for pattern, meaning in FAMILIES:
        hits = [k for k in tensors if re.search(pattern, k)]
        if hits:
            found.append(f"{meaning} [{preview_keys(hits, 2)}]")
    known = [k for k in tensors if any(regex.match(k) for regex, _ in _COMPILED)]
    unknown = sorted(set(tensors) - set(known))
    if unknown and not found:
        found.append(f"keys a plain ViT does not have: {preview_keys(unknown)}")
    if found:
        raise CheckpointError(
            f"{path}: a timm model that is not a plain ViT; found "
            + "; ".join(found)
            + ". Converting it would compute a different function, so it is refused"
        )


def _require(tensors: Mapping[str, np.ndarray], key: str, path: Path, what: str) -> np.ndarray:
    if key not in tensors:
        raise CheckpointError(
            f"{path}: no `{key}` ({what}); a timm ViT state dict has it (keys found: "
            f"{preview_keys(tensors)})"
        )
    return tensors[key]


def _layer_count(tensors: Mapping[str, np.ndarray], path: Path) -> int:
    indices = {int(m[1]) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not indices:
        raise CheckpointError(f"{path}: no transformer blocks (`blocks.N.*` keys)")
    if indices != set(range(len(indices))):
        raise CheckpointError(
            f"{path}: block indices {sorted(indices)} are not 0..{len(indices) - 1}; "
            "blocks are missing"
        )
    return len(indices)


def _grid(
    positions: int, patch: tuple[int, int], has_cls: bool, hints: Mapping[str, Any], path: Path
) -> tuple[tuple[int, int], bool]:
    """(patch grid, whether the table has a class-token slot) from the table's length."""
    candidates = []  # (cells, class slot)
    if has_cls:
        candidates.append((positions - 1, True))
    candidates.append((positions, False))
    image = hints.get("image_size")
    for cells, slot in candidates:
        if image is not None:
            h, w = hw_pair(image, "image_size")
            grid = (h // patch[0], w // patch[1])
            if grid[0] * grid[1] == cells and h % patch[0] == 0 and w % patch[1] == 0:
                return grid, slot
        side = round(cells**0.5) if cells > 0 else 0
        if side and side * side == cells:
            return (side, side), slot
    raise CheckpointError(
        f"{path}: the position table has {positions} rows, which is no square patch grid "
        f"(plus {int(has_cls)} class-token row); give the image size with "
        "--set image_size=[H,W]"
    )


def _architecture(
    tensors: Mapping[str, np.ndarray], hints: Mapping[str, Any], path: Path
) -> tuple[Architecture, dict[str, Any], list[str]]:
    """(what the transforms read, the config fields, what was assumed) from the weights."""
    from conversion.sources import heads_for_width

    kernel = _require(tensors, "patch_embed.proj.weight", path, "the patch projection")
    if kernel.ndim != 4:
        raise CheckpointError(
            f"{path}: patch_embed.proj.weight has shape {tuple(kernel.shape)}; expected a "
            "Conv2d kernel (width, channels, patch, patch)"
        )
    width, channels, ph, pw = (int(s) for s in kernel.shape)
    table = _require(tensors, "pos_embed", path, "learned position embeddings")
    if table.ndim != 3 or table.shape[0] != 1 or table.shape[2] != width:
        raise CheckpointError(
            f"{path}: pos_embed has shape {tuple(table.shape)}; expected (1, positions, {width})"
        )
    has_cls = "cls_token" in tensors
    pooling = hints.get("pooling_type", "cls")
    if not has_cls and pooling != "mean":
        raise CheckpointError(
            f"{path}: no class token (`cls_token`): a timm ViT with class_token=False pools by "
            "averaging, not a plain ViT. If it averages the tokens after its final norm "
            "(global_pool='avg', fc_norm=False), say so with --set pooling_type=mean"
        )
    grid, slot = _grid(int(table.shape[1]), (ph, pw), has_cls, hints, path)
    heads, assumed = heads_for_width(width, hints, "a timm file does not store the head count")
    fc1 = _require(tensors, "blocks.0.mlp.fc1.weight", path, "the first MLP layer")
    head = tensors.get("head.weight")
    pre_logits = "pre_logits.fc.weight" in tensors
    config: dict[str, Any] = {
        **NUMERICS,
        "hidden_size": width,
        "num_hidden_layers": _layer_count(tensors, path),
        "num_attention_heads": heads,
        "intermediate_size": int(fc1.shape[0]),
        "patch_size": ph if ph == pw else [ph, pw],
        "image_size": [grid[0] * ph, grid[1] * pw],
        "num_channels": channels,
        "encoder_stride": ph,
        "qkv_bias": "blocks.0.attn.qkv.bias" in tensors,
        "use_class_token": has_cls,
        "pooling_type": pooling,
        "num_labels": int(head.shape[0]) if head is not None else 0,
        "classifier_uses_pooler": pre_logits and head is not None,
    }
    if pre_logits:
        config["pooler_output_size"] = int(tensors["pre_logits.fc.weight"].shape[0])
        config["pooler_act"] = "tanh"
    if "id2label" in hints and head is not None:
        config["id2label"] = hints["id2label"]
    arch = Architecture(width=width, use_class_token=has_cls, table_has_class_slot=slot)
    notes = [assumed] if assumed else []
    if has_cls and not slot:
        notes.append(
            "the position table has no class-token row (timm no_embed_class): a zero row was "
            "put in its place, which computes the same function"
        )
    return arch, config, notes


def _apply_rules(
    tensors: Mapping[str, np.ndarray], arch: Architecture, path: Path
) -> dict[str, np.ndarray]:
    """Every timm tensor through its rule; the `vit.` prefix when there is a classifier."""
    prefix = "vit." if "head.weight" in tensors else ""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        rule, match = next((rule, m) for regex, rule in _COMPILED if (m := regex.match(key)))
        try:
            pairs = rule.apply(value, arch, **match.groupdict())
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {key} {exc}") from None
        for name, array in pairs.items():
            full = name if name.startswith("classifier.") else prefix + name
            out[full] = np.ascontiguousarray(array)
    return out
