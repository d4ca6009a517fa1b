"""timm `VisionTransformer` checkpoints (every family it builds) -> canonical tensors.

Reads a state dict from `.pth`/`.pt`/`.bin` (plain, `{"model": ...}`, `{"state_dict":
...}`, `module.`-prefixed) or `.safetensors`, or a timm hub folder (`config.json` with an
`architecture` + weights). The architecture comes from the weights: patch size from the
conv kernel, width, depth, MLP width (and whether it is gated), classes, the prefix
tokens (class, distillation, registers), layer scale, the norms (`norm_pre`, `norm`,
`fc_norm`), the attention-pooling head, and the image size from the position table (a
square grid unless the hints give the size). What a state dict does not hold comes from
the hints (a timm folder's `config.json`, a training checkpoint's `arch`, --model-name,
--config, --set): the head count (else the standard ViT table), LayerNorm eps and
activation (else timm's defaults, 1e-6 and exact GELU), and the pooling where timm's
`global_pool` says it (else the keys: `attn_pool` -> map, `fc_norm` or no class token ->
mean). The result says what was assumed.

The families timm builds from `VisionTransformer` that the canonical layout expresses
exactly convert (docs/families.md): DINOv2 (+ registers), DeiT (distilled), DeiT-3, CLIP,
SigLIP (MAP head), the gap and register models, RADIO-style models without a final norm,
the SwiGLU giants. The ones that compute something else are refused by name (`FAMILIES`,
`NAME_FAMILIES`), never converted into a model that computes a different function.
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
from conversion.sources.base import Architecture, Rule, SourceWeights, copy
from vit_core.config import hw_pair
from vit_core.errors import CheckpointError, ConfigError

SOURCE_FORMAT = "timm"
# timm's own loader resamples position tables with antialiased bicubic.
DEFAULT_INTERPOLATION = "bicubic_antialias"
NUMERICS = {"layer_norm_eps": 1e-6, "hidden_act": "gelu"}  # timm: LayerNorm(eps=1e-6), nn.GELU
GATED_ACT = "silu"  # timm's SwiGLUPacked: SiLU on the first half
DEFAULT_LAYERSCALE = 1e-5  # only the init of LayerScale (DINOv2's, DeiT-3 uses 1e-6)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # inside a timm hub folder
_PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_GLOBAL_POOL = {"token": "cls", "": "cls", "avg": "mean", "map": "map"}
# timm `act_layer` names (as a hub config's model_args may record them) -> hidden_act
_ACT_LAYERS = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "quick_gelu": "quick_gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "tanh": "tanh",
}
# The switches the weights decide (docs/families.md): a hint may not contradict them.
SWITCHES = (
    "num_register_tokens",
    "use_distillation_token",
    "no_embed_class",
    "use_pre_norm",
    "patch_embedding_bias",
    "use_final_norm",
    "use_fc_norm",
    "use_swiglu_ffn",
)
# The attention pool's q and kv projections, fused before the rules into one key in the
# canonical order (q rows, then kv's: k then v): `_fuse_pool_projections`.
POOL_QKV = "attn_pool.q_kv"


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
    Rule("dist_token", "embeddings.distillation_token", copy),
    Rule("reg_token", "embeddings.register_tokens", copy),
    # (1, patches [+ prefix tokens], D): the table is the model's either way (no_embed_class)
    Rule("pos_embed", "embeddings.position_embeddings", copy),
    Rule("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight", copy),
    Rule("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias", copy),
    Rule("norm_pre.weight", "pre_layrnorm.weight", copy),
    Rule("norm_pre.bias", "pre_layrnorm.bias", copy),
    Rule("blocks.{i}.norm1.weight", "encoder.layer.{i}.layernorm_before.weight", copy),
    Rule("blocks.{i}.norm1.bias", "encoder.layer.{i}.layernorm_before.bias", copy),
    Rule("blocks.{i}.attn.qkv.weight", "encoder.layer.{i}.attention.attention.{qkv}.weight",
         split_qkv),
    Rule("blocks.{i}.attn.qkv.bias", "encoder.layer.{i}.attention.attention.{qkv}.bias",
         split_qkv),
    Rule("blocks.{i}.attn.proj.weight", "encoder.layer.{i}.attention.output.dense.weight", copy),
    Rule("blocks.{i}.attn.proj.bias", "encoder.layer.{i}.attention.output.dense.bias", copy),
    Rule("blocks.{i}.ls1.gamma", "encoder.layer.{i}.layer_scale1.lambda1", copy),
    Rule("blocks.{i}.norm2.weight", "encoder.layer.{i}.layernorm_after.weight", copy),
    Rule("blocks.{i}.norm2.bias", "encoder.layer.{i}.layernorm_after.bias", copy),
    # fc1 is (I, D), or (2I, D) for the gated MLP (GluMlp/SwiGLUPacked: act(first) * second)
    Rule("blocks.{i}.mlp.fc1.weight", "encoder.layer.{i}.intermediate.dense.weight", copy),
    Rule("blocks.{i}.mlp.fc1.bias", "encoder.layer.{i}.intermediate.dense.bias", copy),
    Rule("blocks.{i}.mlp.fc2.weight", "encoder.layer.{i}.output.dense.weight", copy),
    Rule("blocks.{i}.mlp.fc2.bias", "encoder.layer.{i}.output.dense.bias", copy),
    Rule("blocks.{i}.ls2.gamma", "encoder.layer.{i}.layer_scale2.lambda1", copy),
    # the original DeiT-3 release (facebookresearch/deit) names layer scale gamma_1/gamma_2
    Rule("blocks.{i}.gamma_1", "encoder.layer.{i}.layer_scale1.lambda1", copy),
    Rule("blocks.{i}.gamma_2", "encoder.layer.{i}.layer_scale2.lambda1", copy),
    Rule("norm.weight", "layernorm.weight", copy),
    Rule("norm.bias", "layernorm.bias", copy),
    Rule("fc_norm.weight", "fc_norm.weight", copy),
    Rule("fc_norm.bias", "fc_norm.bias", copy),
    # AttentionPoolLatent (global_pool='map') = the canonical MAP head
    Rule("attn_pool.latent", "head.probe", copy),
    Rule(POOL_QKV + ".weight", "head.attention.in_proj_weight", copy),
    Rule(POOL_QKV + ".bias", "head.attention.in_proj_bias", copy),
    Rule("attn_pool.proj.weight", "head.attention.out_proj.weight", copy),
    Rule("attn_pool.proj.bias", "head.attention.out_proj.bias", copy),
    Rule("attn_pool.norm.weight", "head.layernorm.weight", copy),
    Rule("attn_pool.norm.bias", "head.layernorm.bias", copy),
    Rule("attn_pool.mlp.fc1.weight", "head.mlp.fc1.weight", copy),
    Rule("attn_pool.mlp.fc1.bias", "head.mlp.fc1.bias", copy),
    Rule("attn_pool.mlp.fc2.weight", "head.mlp.fc2.weight", copy),
    Rule("attn_pool.mlp.fc2.bias", "head.mlp.fc2.bias", copy),
    # timm before 0.6: the ImageNet-21k representation layer (Dense + tanh) = HF's pooler
    Rule("pre_logits.fc.weight", "pooler.dense.weight", copy),
    Rule("pre_logits.fc.bias", "pooler.dense.bias", copy),
    Rule("head.weight", "classifier.weight", copy),
    Rule("head.bias", "classifier.bias", copy),
    Rule("head_dist.weight", "distillation_classifier.weight", copy),
    Rule("head_dist.bias", "distillation_classifier.bias", copy),
)
# Consumed by `_fuse_pool_projections` (into POOL_QKV) before the rules run.
POOL_PROJECTIONS = ("attn_pool.q.weight", "attn_pool.q.bias", "attn_pool.kv.weight",
                    "attn_pool.kv.bias")
# Keys that give away a timm family the canonical layout cannot express: pattern -> what
# it is and why it is refused.
FAMILIES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)[qk]_norm\.", "query/key normalisation (qk_norm: `q_norm`, `k_norm`), which the "
                           "canonical attention does not have"),
    (r"^patch_embed\.backbone\.", "a CNN stem (`patch_embed.backbone`): a hybrid ResNet-ViT, "
                                  "not a patch projection"),
    (r"^patch_embed\.norm\.", "a LayerNorm inside the patch embedding (`patch_embed.norm`), "
                              "which the canonical embedding does not have"),
    (r"\.attn\.norm\.|\.mlp\.norm\.", "extra LayerNorms inside the blocks (scale_attn_norm / "
                                      "scale_mlp_norm: BEiT-3-style `attn.norm`, `mlp.norm`)"),
    (r"\.mlp\.fc1_[gx]\.|\.mlp\.w12\.", "a SwiGLU MLP with separate gate and value "
                                        "projections (`mlp.fc1_g`/`fc1_x`: AIMv2-style)"),
    (r"\.attns\.\d+\.|\.ffns\.\d+\.", "parallel blocks (ParallelThingsBlock: `attns.N`, "
                                       "`ffns.N` side by side)"),
    (r"^blocks\.\d+\.(in_proj|in_norm|attn_out_proj|mlp_out_proj|mlp_bias)",
     "parallel blocks (ParallelScalingBlock: one fused `in_proj` for attention and MLP)"),
    (r"rope|freqs", "rotary position embeddings, which the canonical attention does not apply"),
    (r"^head\.(fc|norm)\.", "a head with more than one layer"),
    (r"^attn_pool\.pos_embed$", "an attention pool with its own position embedding "
                               "(pos_embed='abs'), which the canonical MAP head does not add"),
)
# Architecture names (a timm folder's `architecture`, a checkpoint's `arch`) whose model
# the keys alone cannot tell apart from one that converts.
NAME_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"_rpn(_|$)", "ResPostBlock (the LayerNorm after each residual branch, not before it)"),
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
    weights_file, timm_config = _locate(path)
    tensors, extras = read_state_dict(weights_file)
    kernel = tensors.get("patch_embed.proj.weight")
    width = int(kernel.shape[0]) if kernel is not None and kernel.ndim == 4 else None
    file_hints, processor = hints_from_timm_config(timm_config or {}, width)
    side_hints, side_processor = _hints_from_extras(extras, width)
    hints = {**side_hints, **file_hints, **hints}  # what the user says wins
    processor = {**side_processor, **processor}
    _refuse_other_families(tensors, weights_file)
    arch, config, assumed = _architecture(tensors, hints, weights_file)
    tensors = _fuse_pool_projections(tensors, arch.width, weights_file)
    canonical = _apply_rules(tensors, arch, weights_file)
    if not processor:
        assumed.append(
            "preprocessing: mean = std = 0.5 and bicubic resize to the image size (timm's "
            "values for the augreg and original ViT weights; no pretrained_cfg in the file)"
        )
    assumed += _numerics_notes(config, hints)
    height, width = config["image_size"]
    processor = {
        "size": {"height": height, "width": width},
        "resample": _PIL_RESAMPLE["bicubic"],
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        **processor,
    }
    # the switches, and whether there is LayerScale (a hint's number is its init: kept)
    fixed = {*SWITCHES, "layerscale_value"}
    if config["pooling_type"] == "map":
        fixed.add("pooling_type")
    return SourceWeights(
        tensors=canonical,
        config=config,
        source_format=SOURCE_FORMAT,
        assumed=assumed,
        processor=processor,
        fixed=frozenset(fixed),
    )


def weight_files(path: Path) -> list[Path]:
    """The files whose bytes the conversion depends on (hashed into the metadata)."""
    return [_locate(Path(path))[0]]


def _locate(path: Path) -> tuple[Path, dict[str, Any] | None]:
    """(weights file, timm config.json or None) of a file or a timm hub folder."""
    if not path.is_dir():
        return path, None
    if not _is_timm_folder(path):
        raise CheckpointError(f"{path}: not a timm folder (no config.json with `architecture`)")
    file = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
    if file is None:
        raise CheckpointError(f"{path}: a timm folder without {' or '.join(WEIGHT_FILES)}")
    return file, read_json(path / "config.json")


# ---------------------------------------------------------------------- hints
def name_hints(name: str, width: int | None = None) -> dict[str, Any]:
    """Config hints a timm architecture name gives (`vit_core.names`): the head count (when
    the name's width is the model's, `width` None meaning unknown), the numerics (LayerNorm
    eps, activation) and the LayerScale init, which a state dict does not hold. A name
    whose model this package cannot run (`vit_core.names.refused_models`, and
    `NAME_FAMILIES`: those the keys cannot tell from one that converts) is refused here."""
    from vit_core import names

    arch = name.split(".")[0]
    reasons = [meaning for pattern, meaning in NAME_FAMILIES if re.search(pattern, arch)]
    refused = getattr(names, "refused_models", None)
    if refused is not None:
        table = refused()
        reasons += [table[n] for n in (name, arch) if n in table][:1]
    if reasons:
        raise CheckpointError(
            f"timm model {name!r} uses {reasons[0]}, which the canonical layout cannot "
            "express (its keys may look like a convertible model's, but it computes a "
            "different function), so it is refused"
        )
    fields: dict[str, Any] = {}
    for candidate in dict.fromkeys((name, arch)):  # an unknown tag: the architecture's
        with contextlib.suppress(ConfigError):
            fields = names.name_fields(candidate)
            break
    hints: dict[str, Any] = {k: fields[k] for k in ("layer_norm_eps", "hidden_act") if k in fields}
    if isinstance(fields.get("layerscale_value"), int | float):
        hints["layerscale_value"] = float(fields["layerscale_value"])
    if "num_attention_heads" in fields and width in (None, fields.get("hidden_size")):
        hints["num_attention_heads"] = fields["num_attention_heads"]
    return hints


def hints_from_timm_config(
    data: Mapping[str, Any], width: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config hints, processor fields) from a timm `config.json` (as `save_for_hf` writes);
    `width`: the weights' (None: unknown), so that a name's head count is used only for
    the width it describes."""
    args = data.get("model_args") or {}
    if not isinstance(args, Mapping):
        args = {}
    hints: dict[str, Any] = {}
    architecture = data.get("architecture")
    if isinstance(architecture, str):
        embed_dim = args.get("embed_dim")
        hints.update(name_hints(architecture, embed_dim if isinstance(embed_dim, int) else width))
    if isinstance(args.get("num_heads"), int):
        hints["num_attention_heads"] = args["num_heads"]
    if "img_size" in args:
        hints["image_size"] = args["img_size"]
    if isinstance(args.get("no_embed_class"), bool):
        hints["no_embed_class"] = args["no_embed_class"]
    init_values = args.get("init_values")
    if isinstance(init_values, int | float) and not isinstance(init_values, bool) and init_values:
        hints["layerscale_value"] = float(init_values)
    act = args.get("act_layer")
    if isinstance(act, str):
        if act not in _ACT_LAYERS:
            raise CheckpointError(
                f"timm config says act_layer={act!r}; supported: {', '.join(_ACT_LAYERS)}"
            )
        hints["hidden_act"] = _ACT_LAYERS[act]
    if args.get("pool_include_prefix"):
        raise CheckpointError(
            "timm config says pool_include_prefix=True: the pooling reads the prefix tokens "
            "too, while the canonical pooling reads the patch tokens only; refused"
        )
    pool = data.get("global_pool", args.get("global_pool"))
    if pool is not None:
        if pool not in _GLOBAL_POOL:
            raise CheckpointError(
                f"timm config says global_pool={pool!r}, which the canonical layout cannot "
                "express (supported: token, avg, map)"
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


def _hints_from_extras(
    extras: Mapping[str, Any], width: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Hints from what sits beside the weights: a training checkpoint's `arch`, a
    `pretrained_cfg` entry (a mapping, or JSON text in safetensors metadata)."""
    import json

    hints: dict[str, Any] = {}
    arch = extras.get("arch")
    if isinstance(arch, str):
        hints.update(name_hints(arch, width))
    cfg = extras.get("pretrained_cfg")
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except json.JSONDecodeError:
            cfg = None
    return hints, processor_from_pretrained_cfg(cfg)


def _numerics_notes(config: Mapping[str, Any], hints: Mapping[str, Any]) -> list[str]:
    """What was assumed about the numerics a state dict does not hold."""
    missing = [k for k in ("layer_norm_eps", "hidden_act") if k not in hints]
    if not missing:
        return []
    said = ", ".join(f"{k}={config[k]!r}" for k in missing)
    why = "timm's defaults (LayerNorm eps 1e-6, exact GELU"
    why += "; SiLU for the gated SwiGLU MLP)" if config["use_swiglu_ffn"] else ")"
    family = ""
    if config["use_pre_norm"]:
        family = (
            "; CLIP image towers (norm_pre) use layer_norm_eps=1e-5, and the OpenAI ones "
            "(timm *_clip_quickgelu_*) hidden_act='quick_gelu'"
        )
    return [
        f"{said}: {why}, since a state dict does not record them{family}; give "
        "--model-name with the timm name, or --set, if the model differs"
    ]


# --------------------------------------------------------------------- checks
def _refuse_other_families(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """Refuse, naming what was found and why, a checkpoint whose model the canonical
    layout cannot express."""
    found = []
    for pattern, meaning in FAMILIES:
        hits = [k for k in tensors if re.search(pattern, k)]
        if hits:
            found.append(f"{meaning} [{preview_keys(hits, 2)}]")
    shiftless = [
        k
        for k in tensors
        if re.search(r"(^|\.)(norm\d?|norm_pre|fc_norm)\.weight$", k)
        and k[: -len("weight")] + "bias" not in tensors
    ]
    if shiftless:
        found.append(
            "norms without a shift (RmsNorm, as in AIMv2; the canonical LayerNorm has a bias) "
            f"[{preview_keys(shiftless, 2)}]"
        )
    if _res_post_order(tensors):
        found.append(
            "ResPostBlock (the LayerNorm after each residual branch: its modules are stored "
            "in the order attn, norm1, mlp, norm2)"
        )
    known = [
        k
        for k in tensors
        if k in POOL_PROJECTIONS
        or (not k.startswith(POOL_QKV) and any(regex.match(k) for regex, _ in _COMPILED))
    ]
    unknown = sorted(set(tensors) - set(known))
    if unknown and not found:
        found.append(f"keys no timm ViT family here has: {preview_keys(unknown)}")
    if found:
        raise CheckpointError(
            f"{path}: a timm model this package cannot express; found "
            + "; ".join(found)
            + ". Converting it would compute a different function, so it is refused"
        )


def _res_post_order(tensors: Mapping[str, np.ndarray]) -> bool:
    """Whether block 0's modules come in ResPostBlock's registration order (attn, norm1,
    mlp, norm2). A `Block` stores norm1, attn, norm2, mlp and a sorted file attn, mlp,
    norm1, norm2, so neither is mistaken for it; a file whose order was lost (safetensors
    sorts) says nothing, and the architecture name (`NAME_FAMILIES`) is the other guard."""
    order = []
    for key in tensors:
        m = re.match(r"blocks\.0\.(norm1|attn|norm2|mlp)\.", key)
        if m and m[1] not in order:
            order.append(m[1])
    return order == ["attn", "norm1", "mlp", "norm2"]


def _require(tensors: Mapping[str, np.ndarray], key: str, path: Path, what: str) -> np.ndarray:
    if key not in tensors:
        raise CheckpointError(
            f"{path}: no `{key}` ({what}); a timm ViT state dict has it (keys found: "
            f"{preview_keys(tensors)})"
        )
    return tensors[key]


def _token(tensors: Mapping[str, np.ndarray], key: str, width: int, path: Path) -> int:
    """How many tokens a (1, n, width) token parameter holds; 0 when absent."""
    if key not in tensors:
        return 0
    value = tensors[key]
    if value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != width or not value.shape[1]:
        raise CheckpointError(
            f"{path}: {key} has shape {tuple(value.shape)}; expected (1, tokens, {width})"
        )
    return int(value.shape[1])


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
    positions: int,
    patch: tuple[int, int],
    prefix: int,
    hints: Mapping[str, Any],
    path: Path,
) -> tuple[tuple[int, int], bool]:
    """(patch grid, no_embed_class) from the table's length: patches + `prefix` rows, or
    patches alone (timm no_embed_class: the prefix tokens get no position)."""
    candidates = [(positions - prefix, False)] if prefix else []  # (cells, no_embed_class)
    candidates.append((positions, True) if prefix else (positions, False))
    stated = hints.get("no_embed_class")
    if prefix and isinstance(stated, bool):  # the hint decides where both would fit
        candidates.sort(key=lambda c: c[1] != stated)
    image = hints.get("image_size")
    if image is not None:
        h, w = hw_pair(image, "image_size")
        for cells, no_embed in candidates:
            grid = (h // patch[0], w // patch[1])
            if grid[0] * grid[1] == cells and h % patch[0] == 0 and w % patch[1] == 0:
                return grid, no_embed
    squares = []
    for cells, no_embed in candidates:
        side = round(cells**0.5) if cells > 0 else 0
        if side and side * side == cells:
            squares.append(((side, side), no_embed))
    if len(squares) == 1 or (squares and isinstance(stated, bool)):
        return squares[0]
    if squares:
        raise CheckpointError(
            f"{path}: the position table's {positions} rows fit a square grid both with and "
            f"without rows for the {prefix} prefix tokens; give the image size with --set "
            "image_size=[H,W] (or --set no_embed_class=true/false)"
        )
    raise CheckpointError(
        f"{path}: the position table has {positions} rows, which is no square patch grid "
        f"(with or without {prefix} prefix-token rows); give the image size with "
        "--set image_size=[H,W]"
    )


# --------------------------------------------------------------- architecture
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
    table = _require(
        tensors, "pos_embed", path, "learned position embeddings; a model without them "
        "(pos_embed='none', rotary positions) cannot be expressed"
    )  # fmt: skip
    if table.ndim != 3 or table.shape[0] != 1 or table.shape[2] != width:
        raise CheckpointError(
            f"{path}: pos_embed has shape {tuple(table.shape)}; expected (1, positions, {width})"
        )
    has_cls = bool(_token(tensors, "cls_token", width, path))
    distilled = bool(_token(tensors, "dist_token", width, path))
    registers = _token(tensors, "reg_token", width, path)
    head = tensors.get("head.weight")
    _check_distillation(tensors, has_cls, distilled, registers, path)
    prefix = int(has_cls) + int(distilled) + registers
    grid, no_embed_class = _grid(int(table.shape[1]), (ph, pw), prefix, hints, path)
    heads, assumed = heads_for_width(width, hints, "a timm file does not store the head count")
    notes = [assumed] if assumed else []
    intermediate, gated = _mlp(tensors, width, path)
    pooling, note = _pooling(tensors, hints, has_cls, prefix, intermediate, path)
    notes += [note] if note else []
    final_norm, fc_norm = _final_norm(tensors, path)
    pre_logits = "pre_logits.fc.weight" in tensors
    scaled = any(re.search(r"\.(ls[12]\.gamma|gamma_[12])$", k) for k in tensors)
    layerscale = hints.get("layerscale_value")
    if not isinstance(layerscale, int | float):
        layerscale = DEFAULT_LAYERSCALE
    act = hints.get("hidden_act", GATED_ACT if gated else NUMERICS["hidden_act"])
    config: dict[str, Any] = {
        "layer_norm_eps": hints.get("layer_norm_eps", NUMERICS["layer_norm_eps"]),
        "hidden_act": act,
        "hidden_size": width,
        "num_hidden_layers": _layer_count(tensors, path),
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "patch_size": ph if ph == pw else [ph, pw],
        "image_size": [grid[0] * ph, grid[1] * pw],
        "num_channels": channels,
        "encoder_stride": ph,
        "qkv_bias": "blocks.0.attn.qkv.bias" in tensors,
        "use_class_token": has_cls,
        "pooling_type": pooling,
        "num_labels": int(head.shape[0]) if head is not None else 0,
        "classifier_uses_pooler": pre_logits and head is not None,
        "num_register_tokens": registers,
        "use_distillation_token": distilled,
        "no_embed_class": no_embed_class,
        "layerscale_value": float(layerscale) if scaled else None,
        "use_pre_norm": "norm_pre.weight" in tensors,
        "patch_embedding_bias": "patch_embed.proj.bias" in tensors,
        "use_final_norm": final_norm,
        "use_fc_norm": fc_norm,
        "use_swiglu_ffn": gated,
    }
    if pre_logits:
        config["pooler_output_size"] = int(tensors["pre_logits.fc.weight"].shape[0])
        config["pooler_act"] = "tanh"
    if "id2label" in hints and head is not None:
        config["id2label"] = hints["id2label"]
    arch = Architecture(
        width=width, use_class_token=has_cls, table_has_class_slot=not no_embed_class
    )
    return arch, config, notes


def _check_distillation(
    tensors: Mapping[str, np.ndarray], has_cls: bool, distilled: bool, registers: int, path: Path
) -> None:
    """A distillation token as timm's VisionTransformerDistilled has it, or an error."""
    head_dist = any(k.startswith("head_dist.") for k in tensors)
    head = "head.weight" in tensors
    if head_dist and not distilled:
        raise CheckpointError(f"{path}: a distillation head (`head_dist`) without `dist_token`")
    if not distilled:
        return
    if not has_cls:
        raise CheckpointError(
            f"{path}: a distillation token without a class token; DeiT distilled has both"
        )
    if registers:
        raise CheckpointError(
            f"{path}: a distillation token and register tokens: timm's "
            "VisionTransformerDistilled never adds register tokens to its input, so such a "
            "file's function is unclear; refused"
        )
    if head != head_dist:
        raise CheckpointError(
            f"{path}: DeiT distilled has both heads (`head`, `head_dist`) or neither; this "
            f"file has only `{'head' if head else 'head_dist'}`"
        )


def _mlp(tensors: Mapping[str, np.ndarray], width: int, path: Path) -> tuple[int, bool]:
    """(intermediate_size, gated): fc1 (I, D) with fc2 (D, I), or fc1 (2I, D): a gated MLP
    (timm GluMlp / SwiGLUPacked), act(first half) * second half."""
    fc1 = _require(tensors, "blocks.0.mlp.fc1.weight", path, "the first MLP layer")
    fc2 = _require(tensors, "blocks.0.mlp.fc2.weight", path, "the second MLP layer")
    if fc1.ndim != 2 or fc2.ndim != 2:
        raise CheckpointError(f"{path}: blocks.0.mlp.fc1/fc2 weights are not matrices")
    rows, columns = int(fc1.shape[0]), int(fc2.shape[1])
    if rows == columns:
        return columns, False
    if rows == 2 * columns:
        return columns, True
    raise CheckpointError(
        f"{path}: blocks.0.mlp.fc1.weight has {rows} rows but fc2 reads {columns} features: "
        "neither a plain MLP (equal) nor a gated one (fc1 twice fc2's input); inconsistent"
    )


def _pooling(
    tensors: Mapping[str, np.ndarray],
    hints: Mapping[str, Any],
    has_cls: bool,
    prefix: int,
    intermediate: int,
    path: Path,
) -> tuple[str, str | None]:
    """(pooling_type, what was assumed): timm's global_pool where a hint says it, else the
    keys' (attn_pool: map; fc_norm or no class token: mean; else the class token)."""
    pool = any(k.startswith("attn_pool.") for k in tensors)
    fc_norm = "fc_norm.weight" in tensors
    stated = hints.get("pooling_type")
    note = None
    if stated is None:
        if pool:
            stated = "map"
        elif has_cls and fc_norm:
            stated = "mean"
            note = (
                "pooling_type='mean' from the keys: timm turns on fc_norm for "
                "global_pool='avg' (a model built with global_pool='token', fc_norm=True "
                "pools the class token instead: then pass --set pooling_type=cls)"
            )
        elif not has_cls:
            stated = "mean"
            note = (
                "pooling_type='mean': no class token and no attention pool, so the patch "
                "tokens are averaged (timm global_pool='avg'; its 'max' and 'avgmax' pools "
                "would look the same in the file)"
            )
        else:
            stated = "cls"
    if stated == "map" and not pool:
        raise CheckpointError(
            f"{path}: pooling_type='map' (global_pool='map') but no attention pool "
            "(`attn_pool.*`) in the weights"
        )
    if pool and stated != "map":
        raise CheckpointError(
            f"{path}: an attention pool (`attn_pool.*`) in the weights, but the pooling is "
            f"said to be {stated!r} (global_pool); timm would not use the pool: refused "
            "rather than dropping its weights"
        )
    if pool:
        _check_pool(tensors, intermediate, path)
    return stated, note


def _check_pool(tensors: Mapping[str, np.ndarray], intermediate: int, path: Path) -> None:
    """An AttentionPoolLatent the canonical MAP head computes exactly, or an error."""
    latent = _require(tensors, "attn_pool.latent", path, "the attention pool's query")
    if latent.ndim != 3 or latent.shape[0] != 1:
        raise CheckpointError(f"{path}: attn_pool.latent has shape {tuple(latent.shape)}")
    if latent.shape[1] != 1:
        raise CheckpointError(
            f"{path}: attn_pool.latent holds {latent.shape[1]} queries (latent_len="
            f"{latent.shape[1]}); the canonical MAP head has one probe (latent_len=1)"
        )
    for part in ("proj", "norm", "mlp.fc1", "mlp.fc2"):
        if f"attn_pool.{part}.weight" not in tensors:
            raise CheckpointError(
                f"{path}: an attention pool without `attn_pool.{part}` (out_features=0 or no "
                "norm): not the MAP head (attention, output projection, LayerNorm + MLP)"
            )
    fc1 = tensors["attn_pool.mlp.fc1.weight"]
    hidden = int(fc1.shape[0]) if fc1.ndim == 2 else -1
    if hidden != intermediate:
        raise CheckpointError(
            f"{path}: the attention pool's MLP is {hidden} wide, the blocks' {intermediate}; "
            "the canonical MAP head uses the blocks' width (intermediate_size)"
        )


def _final_norm(tensors: Mapping[str, np.ndarray], path: Path) -> tuple[bool, bool]:
    """(use_final_norm, use_fc_norm): `norm` on every token, `fc_norm` after pooling, or
    neither (timm final_norm=False); timm never has both."""
    norm, fc_norm = "norm.weight" in tensors, "fc_norm.weight" in tensors
    if norm and fc_norm:
        raise CheckpointError(
            f"{path}: both a final norm (`norm`) and one after pooling (`fc_norm`); timm builds "
            "one or the other, and the canonical layout too"
        )
    return norm or fc_norm, fc_norm


# ---------------------------------------------------------------------- rules
def _fuse_pool_projections(
    tensors: Mapping[str, np.ndarray], width: int, path: Path
) -> dict[str, np.ndarray]:
    """The attention pool's `q` (D, D) and `kv` (2D, D) projections as one (3D, D)
    in-projection: query rows, then key, then value (kv holds k then v). Without `q`
    (q_proj=False) the probe is the query itself: an identity, exactly."""
    out = {k: v for k, v in tensors.items() if k not in POOL_PROJECTIONS}
    if "attn_pool.kv.weight" not in tensors:
        if any(k.startswith("attn_pool.") for k in tensors):
            raise CheckpointError(f"{path}: an attention pool without `attn_pool.kv.weight`")
        return out
    kv = tensors["attn_pool.kv.weight"]
    if kv.shape != (2 * width, width):
        raise CheckpointError(
            f"{path}: attn_pool.kv.weight has shape {tuple(kv.shape)}; expected "
            f"({2 * width}, {width})"
        )
    q = tensors.get("attn_pool.q.weight")
    if q is None:
        q = np.eye(width, dtype=kv.dtype)
    elif q.shape != (width, width):
        raise CheckpointError(
            f"{path}: attn_pool.q.weight has shape {tuple(q.shape)}; expected ({width}, {width}) "
            "(a latent_dim other than the width is not the MAP head)"
        )
    out[POOL_QKV + ".weight"] = np.concatenate([q, kv], axis=0)
    kv_bias, q_bias = tensors.get("attn_pool.kv.bias"), tensors.get("attn_pool.q.bias")
    if kv_bias is None and q_bias is not None:
        raise CheckpointError(f"{path}: attn_pool.q has a bias but attn_pool.kv has none")
    if kv_bias is None:  # qkv_bias=False: zero biases are exact
        kv_bias = np.zeros(2 * width, dtype=kv.dtype)
    if q_bias is None:
        q_bias = np.zeros(width, dtype=kv_bias.dtype)
    if q_bias.shape != (width,) or kv_bias.shape != (2 * width,):
        raise CheckpointError(
            f"{path}: attn_pool.q.bias / kv.bias have shapes {tuple(q_bias.shape)} / "
            f"{tuple(kv_bias.shape)}; expected ({width},) / ({2 * width},)"
        )
    out[POOL_QKV + ".bias"] = np.concatenate([q_bias, kv_bias], axis=0)
    return out


def _apply_rules(
    tensors: Mapping[str, np.ndarray], arch: Architecture, path: Path
) -> dict[str, np.ndarray]:
    """Every timm tensor through its rule; the `vit.` prefix when there is a classifier
    (except on the heads, `classifier.` and `distillation_classifier.`)."""
    from vit_core.layout import HEADS

    prefix = "vit." if "head.weight" in tensors else ""
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        rule, match = next((rule, m) for regex, rule in _COMPILED if (m := regex.match(key)))
        try:
            pairs = rule.apply(value, arch, **match.groupdict())
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {key} {exc}") from None
        for name, array in pairs.items():
            full = name if name.startswith(HEADS) else prefix + name
            if full in out:
                raise CheckpointError(
                    f"{path}: two timm keys give {full} (e.g. ls1.gamma and gamma_1)"
                )
            out[full] = np.ascontiguousarray(array)
    return out
