"""transformers' ViT-family models (docs/families.md) -> canonical tensors: the key tables.

Each model_type below is a `Family`: a table of key rules from the model's own names to
the canonical (transformers ViT) ones, transformers' config and image-processor defaults
for what the folder's JSON files omit, and a `switches` function that sets the family's
`ViTConfig` switches and checks config.json against the weights:

| model_type | models | switches |
|---|---|---|
| dinov2 | Dinov2Model, Dinov2Backbone | layerscale_value, use_swiglu_ffn |
| dinov2_with_registers | Dinov2WithRegistersModel | + num_register_tokens, no_embed_class |
| clip_vision_model, clip | CLIPVisionModel(WithProjection), CLIPModel | use_pre_norm, no bias |
| siglip_vision_model, siglip | SiglipVisionModel, SiglipModel | no class token, pooling map |
| deit | DeiTModel, DeiTForImageClassificationWithTeacher | use_distillation_token |
| vit_mae | ViTMAEModel, ViTMAEForPreTraining (the encoder) | none: a plain ViT encoder |

Only the image encoder of a dual encoder (CLIPModel, SiglipModel) is read; CLIP's
`visual_projection` becomes the classifier (its logits are the image embeddings).
Heads the canonical model cannot express (Dinov2ForImageClassification reads the class
token beside the mean patch token; DeiTForImageClassification one head while the
distillation token is in the sequence; the CLIP and SigLIP classifiers) are refused with
the reason, as are text towers and every key no rule knows. Parts that do not take part
in inference (mask tokens, the MAE decoder, the text tower of a dual encoder) are dropped,
and the result says so.

This module never opens a weights file: `conversion.sources.hf` finds and reads them (and
refuses the Flax ones, which these PyTorch key tables do not describe) and hands the
tensors here, so the import runs one way, hf -> hf_families.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from conversion.sources import preview_keys, read_json
from conversion.sources.base import Architecture, Rule, SourceWeights, copy
from vit_core.config import CONFIG_NAME, hw_pair
from vit_core.errors import CheckpointError, ConfigError
from vit_core.layout import BASE_PREFIX, HEADS, LAYER
from vit_core.processing import PROCESSOR_NAME

# The patch projection's canonical name, which DINOv2, DeiT and ViT-MAE share.
PATCH = "embeddings.patch_embeddings.projection"
PATCH_KERNEL = PATCH + ".weight"
# One encoder block in CLIP and SigLIP (the canonical one, `LAYER`, is DINOv2's, DeiT's
# and ViT-MAE's too).
CLIP_LAYER = "encoder.layers.{i}."
# transformers' constants (image_utils), and PIL's resample codes as its processors store them.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_STANDARD_MEAN = IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
PIL_BILINEAR, PIL_BICUBIC = 2, 3
# The text halves of the dual encoders: named so that the refusal can say what to convert.
TEXT_TOWERS = {"clip_text_model": "CLIP", "siglip_text_model": "SigLIP"}


# ----------------------------------------------------------------- transforms
def as_token(value: np.ndarray, arch: Architecture) -> np.ndarray:
    """CLIP's class embedding (D,) as a (1, 1, D) token."""
    if tuple(value.shape) != (arch.width,):
        raise CheckpointError(f"has shape {tuple(value.shape)}; expected ({arch.width},)")
    return value.reshape(1, 1, arch.width)


def as_table(value: np.ndarray, arch: Architecture) -> np.ndarray:
    """An nn.Embedding position table (T, D) as the canonical (1, T, D)."""
    if value.ndim != 2 or value.shape[1] != arch.width:
        raise CheckpointError(f"has shape {tuple(value.shape)}; expected (positions, {arch.width})")
    return value[None]


def _weight_bias(source: str, target: str) -> tuple[Rule, Rule]:
    """The weight and bias rules of one layer renamed as it is (Linear or LayerNorm)."""
    return (
        Rule(f"{source}.weight", f"{target}.weight", copy),
        Rule(f"{source}.bias", f"{target}.bias", copy),
    )


def _same(*keys: str) -> tuple[Rule, ...]:
    """Keys the family already spells canonically."""
    return tuple(Rule(key, key, copy) for key in keys)


# ---------------------------------------------------------------- key tables
# fmt: off
_VIT_EMBEDDINGS = (
    *_same("embeddings.cls_token", "embeddings.position_embeddings"),
    *_weight_bias(PATCH, PATCH),
)
_VIT_ATTENTION = (
    *_same(LAYER + "attention.attention.{qkv}.weight", LAYER + "attention.attention.{qkv}.bias"),
    *_weight_bias(LAYER + "attention.output.dense", LAYER + "attention.output.dense"),
)
_VIT_BLOCK = (
    *_weight_bias(LAYER + "layernorm_before", LAYER + "layernorm_before"), *_VIT_ATTENTION,
    *_weight_bias(LAYER + "layernorm_after", LAYER + "layernorm_after"),
    *_weight_bias(LAYER + "intermediate.dense", LAYER + "intermediate.dense"),
    *_weight_bias(LAYER + "output.dense", LAYER + "output.dense"),
)
_FINAL_NORM = _weight_bias("layernorm", "layernorm")
# Dinov2Model / Dinov2Backbone (keys as in the model; `dinov2.` inside a head model).
DINOV2_RULES: tuple[Rule, ...] = (
    *_VIT_EMBEDDINGS,
    *_weight_bias(LAYER + "norm1", LAYER + "layernorm_before"), *_VIT_ATTENTION,
    *_same(LAYER + "layer_scale1.lambda1"),
    *_weight_bias(LAYER + "norm2", LAYER + "layernorm_after"),
    *_weight_bias(LAYER + "mlp.fc1", LAYER + "intermediate.dense"),
    *_weight_bias(LAYER + "mlp.fc2", LAYER + "output.dense"),
    # Dinov2SwiGLUFFN: weights_in (2I, D), first half through SiLU times the second half,
    # which is the canonical gated MLP (use_swiglu_ffn) as it is.
    *_weight_bias(LAYER + "mlp.weights_in", LAYER + "intermediate.dense"),
    *_weight_bias(LAYER + "mlp.weights_out", LAYER + "output.dense"),
    *_same(LAYER + "layer_scale2.lambda1"),
    *_FINAL_NORM,
)
DINOV2_REGISTERS_RULES = (*DINOV2_RULES, *_same("embeddings.register_tokens"))
# CLIPEncoderLayer and SiglipEncoderLayer: the same block, CLIP's names.
_CLIP_BLOCK: tuple[Rule, ...] = (
    *_weight_bias(CLIP_LAYER + "layer_norm1", LAYER + "layernorm_before"),
    *_weight_bias(CLIP_LAYER + "self_attn.q_proj", LAYER + "attention.attention.query"),
    *_weight_bias(CLIP_LAYER + "self_attn.k_proj", LAYER + "attention.attention.key"),
    *_weight_bias(CLIP_LAYER + "self_attn.v_proj", LAYER + "attention.attention.value"),
    *_weight_bias(CLIP_LAYER + "self_attn.out_proj", LAYER + "attention.output.dense"),
    *_weight_bias(CLIP_LAYER + "layer_norm2", LAYER + "layernorm_after"),
    *_weight_bias(CLIP_LAYER + "mlp.fc1", LAYER + "intermediate.dense"),
    *_weight_bias(CLIP_LAYER + "mlp.fc2", LAYER + "output.dense"),
)
# CLIPVisionTransformer (`vision_model.` in every CLIP model).
CLIP_RULES: tuple[Rule, ...] = (
    Rule("embeddings.class_embedding", "embeddings.cls_token", as_token),
    Rule("embeddings.patch_embedding.weight", PATCH_KERNEL, copy),
    Rule("embeddings.position_embedding.weight", "embeddings.position_embeddings", as_table),
    *_weight_bias("pre_layrnorm", "pre_layrnorm"),
    *_CLIP_BLOCK,
    *_weight_bias("post_layernorm", "layernorm"),
)
# SiglipVisionTransformer (`vision_model.`), its MAP head under the canonical `head.*`.
SIGLIP_RULES: tuple[Rule, ...] = (
    *_weight_bias("embeddings.patch_embedding", PATCH),
    Rule("embeddings.position_embedding.weight", "embeddings.position_embeddings", as_table),
    *_CLIP_BLOCK,
    *_weight_bias("post_layernorm", "layernorm"),
    *_same("head.probe", "head.attention.in_proj_weight", "head.attention.in_proj_bias"),
    *_weight_bias("head.attention.out_proj", "head.attention.out_proj"),
    *_weight_bias("head.layernorm", "head.layernorm"),
    *_weight_bias("head.mlp.fc1", "head.mlp.fc1"),
    *_weight_bias("head.mlp.fc2", "head.mlp.fc2"),
)
# DeiTModel (`deit.` inside a head model); its pooler is the canonical one.
DEIT_RULES: tuple[Rule, ...] = (
    *_VIT_EMBEDDINGS, *_same("embeddings.distillation_token"), *_VIT_BLOCK, *_FINAL_NORM,
    *_weight_bias("pooler.dense", "pooler.dense"),
)
# ViTMAEModel (`vit.` inside ViTMAEForPreTraining): a plain ViT encoder.
MAE_RULES: tuple[Rule, ...] = (*_VIT_EMBEDDINGS, *_VIT_BLOCK, *_FINAL_NORM)
# fmt: on

# Keys dropped (pattern on the full key, what it is): they take no part in inference.
_MASK_TOKEN = (
    r"(^|\.)embeddings\.mask_token$",
    "the mask token (used only for masked-image training, with bool_masked_pos)",
)  # fmt: skip
_POSITION_IDS = (r"(^|\.)embeddings\.position_ids$", "the position-id buffer (0..T-1)")
_TEXT_TOWER = ((r"^text_model\.", "the text tower"),
               (r"^text_projection\.", "the text projection"),
               (r"^logit_(scale|bias)$", "the contrastive logit scale and bias"))  # fmt: skip


def _dinov2_classifier(model: str) -> tuple[str, str]:
    """The refusal of `{model}ForImageClassification`, whose head the canonical one is not."""
    return (
        r"^classifier\.",
        f"{model}ForImageClassification: its classifier reads the class token concatenated "
        "with the mean of the patch tokens (2 x hidden_size features), which the canonical "
        f"ViT head cannot express. Convert the backbone instead: {model}Model.from_pretrained"
        "(folder).save_pretrained(backbone), then convert that folder",
    )


# -------------------------------------------------------------------- records
@dataclass
class _Sizes:
    """What the canonical (unprefixed) tensors say about the architecture."""

    width: int
    channels: int
    patch: tuple[int, int]
    layers: int
    intermediate: int
    gated: bool  # the first MLP layer is 2I wide (SwiGLU)
    qkv_bias: bool
    labels: int
    registers: int
    pooler: int  # pooler width, 0 without a pooler
    map_head: bool


# (config fields, sizes, where, notes) -> the family's ViTConfig switches; raises where
# config.json contradicts the weights, and says in `notes` what it had to decide.
Switches = Callable[[Mapping[str, Any], _Sizes, str, list[str]], dict[str, Any]]
# (canonical tensors, config fields, notes): a last change to the tensors that needs the
# config (a folded or computed position table, a zero bias).
Finish = Callable[[dict[str, np.ndarray], dict[str, Any], list[str]], None]


@dataclass(frozen=True)
class Family:
    """One transformers model_type of the ViT family: its key table and what it fixes.

    The encoder's keys are unprefixed (the base model) or under `prefix` (a head model, or
    the image tower of a dual encoder); `heads` are top-level keys kept; `dropped` and
    `refused` are (regex on the full key, what it is): parts that play no role in
    inference, and heads the canonical model cannot compute.
    """

    title: str
    base_class: str
    prefix: str
    rules: tuple[Rule, ...]
    defaults: Mapping[str, Any]  # transformers' config defaults for what config.json omits
    switches: Switches
    processor: Mapping[str, Any]  # transformers' image processor defaults
    marker: str = PATCH_KERNEL  # the patch kernel's key inside the encoder
    heads: tuple[Rule, ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    refused: tuple[tuple[str, str], ...] = ()
    sub_config: str | None = None  # "vision_config" in a dual encoder's config.json
    finish: Finish | None = None


def _sizes(tensors: Mapping[str, np.ndarray], where: str) -> _Sizes:
    def need(key: str) -> np.ndarray:
        if key not in tensors:
            raise CheckpointError(f"{where}: no tensor for the canonical {key}")
        return tensors[key]

    width, channels, ph, pw = (int(s) for s in need(PATCH_KERNEL).shape)
    layers = {int(m[1]) for k in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if not layers or layers != set(range(len(layers))):
        raise CheckpointError(
            f"{where}: encoder layer indices {sorted(layers)} are not 0..N-1; layers are missing"
        )
    fc1 = int(need("encoder.layer.0.intermediate.dense.weight").shape[0])
    intermediate = int(need("encoder.layer.0.output.dense.weight").shape[1])
    registers = tensors.get("embeddings.register_tokens")
    pooler = tensors.get("pooler.dense.weight")
    classifier = tensors.get("classifier.weight")
    return _Sizes(
        width=width,
        channels=channels,
        patch=(ph, pw),
        layers=len(layers),
        intermediate=intermediate,
        gated=fc1 == 2 * intermediate,
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in tensors,
        labels=int(classifier.shape[0]) if classifier is not None else 0,
        registers=int(registers.shape[1]) if registers is not None else 0,
        pooler=int(pooler.shape[0]) if pooler is not None else 0,
        map_head="head.probe" in tensors,
    )


# ------------------------------------------------------------ family switches
def _dinov2_switches(
    src: Mapping[str, Any], sizes: _Sizes, where: str, notes: list[str]
) -> dict[str, Any]:
    """Layer scale and the MLP kind. DINOv2's config gives the MLP width as mlp_ratio, and
    a SwiGLU MLP rounds 2/3 of it up to a multiple of 8 (Dinov2SwiGLUFFN), so the stated
    width is checked against the weights rather than trusted."""
    swiglu = bool(src["use_swiglu_ffn"])
    if swiglu != sizes.gated:
        found = "a gated MLP (mlp.weights_in)" if sizes.gated else "a plain MLP (mlp.fc1)"
        raise CheckpointError(f"{where}: use_swiglu_ffn={swiglu}, but the weights hold {found}")
    hidden = int(src["hidden_size"] * src["mlp_ratio"])
    expected = (int(hidden * 2 / 3) + 7) // 8 * 8 if swiglu else hidden
    if expected != sizes.intermediate:
        raise CheckpointError(
            f"{where}: mlp_ratio={src['mlp_ratio']} gives an MLP width of {expected}, but the "
            f"weights have {sizes.intermediate}; the config does not describe these weights"
        )
    fields: dict[str, Any] = {
        "layerscale_value": float(src["layerscale_value"]),
        "use_swiglu_ffn": swiglu,
    }
    if swiglu:
        fields["hidden_act"] = "silu"
        if src["hidden_act"] != "silu":
            notes.append(
                f"hidden_act=silu: transformers' Dinov2SwiGLUFFN always gates with SiLU, "
                f"whatever config.json's hidden_act ({src['hidden_act']!r}) says"
            )
    return fields


def _registers_switches(
    src: Mapping[str, Any], sizes: _Sizes, where: str, notes: list[str]
) -> dict[str, Any]:
    """DINOv2's switches, the register count, and no_embed_class: transformers adds the
    class token's position and gives the registers none, which the canonical model says
    as no_embed_class with the class row folded into cls_token (`_fold_class_position`)."""
    if int(src["num_register_tokens"]) != sizes.registers:
        raise CheckpointError(
            f"{where}: num_register_tokens={src['num_register_tokens']}, but "
            f"embeddings.register_tokens holds {sizes.registers}"
        )
    notes.append(
        "position table: DINOv2-with-registers adds the class token's position before the "
        "registers are inserted, and gives the registers none; converted exactly as "
        "no_embed_class=True, the class row folded into cls_token"
    )
    return {
        **_dinov2_switches(src, sizes, where, notes),
        "num_register_tokens": sizes.registers,
        "no_embed_class": True,
    }


def _fold_class_position(
    tensors: dict[str, np.ndarray], fields: dict[str, Any], notes: list[str]
) -> None:
    """cls' = cls + pos[:, :1]; pos' = pos[:, 1:] (the patches' rows only). The fold holds
    at any image size: transformers never resamples the class row either."""
    table = tensors["embeddings.position_embeddings"]
    tensors["embeddings.cls_token"] = tensors["embeddings.cls_token"] + table[:, :1]
    tensors["embeddings.position_embeddings"] = np.ascontiguousarray(table[:, 1:])


def _clip_switches(
    src: Mapping[str, Any], sizes: _Sizes, where: str, notes: list[str]
) -> dict[str, Any]:
    """The pre-norm and the bias-free patch projection; a kept visual_projection is
    checked against projection_dim and described, since its `logits` are embeddings."""
    if sizes.labels:
        projection = src.get("projection_dim")
        if projection is not None and int(projection) != sizes.labels:
            raise CheckpointError(
                f"{where}: projection_dim={projection}, but visual_projection has "
                f"{sizes.labels} rows"
            )
        notes.append(
            f"visual_projection became the classifier (num_labels = projection_dim = "
            f"{sizes.labels}, zero bias): `logits` are CLIP's image embeddings, unnormalised, "
            "as CLIPVisionModelWithProjection's image_embeds and CLIPModel.get_image_features"
        )
    return {"use_pre_norm": True, "patch_embedding_bias": False}


def _add_projection_bias(
    tensors: dict[str, np.ndarray], fields: dict[str, Any], notes: list[str]
) -> None:
    """visual_projection has no bias and the canonical classifier has one: a zero bias
    is exact."""
    weight = tensors.get("classifier.weight")
    if weight is not None:
        tensors["classifier.bias"] = np.zeros(weight.shape[0], dtype=weight.dtype)


def _siglip_switches(
    src: Mapping[str, Any], sizes: _Sizes, where: str, notes: list[str]
) -> dict[str, Any]:
    """No class token; MAP pooling where the weights hold the head (vision_use_head)."""
    use_head = bool(src.get("vision_use_head", True))
    if use_head != sizes.map_head:
        found = "head.* tensors" if sizes.map_head else "no head.* tensors"
        raise CheckpointError(f"{where}: vision_use_head={use_head}, but the weights hold {found}")
    if not use_head:
        notes.append(
            "vision_use_head=False: no MAP head, so pooling_type='mean' (the mean of the "
            "final-normed patch tokens) gives pooler_output; transformers returns none"
        )
    return {"use_class_token": False, "pooling_type": "map" if use_head else "mean"}


def _deit_switches(
    src: Mapping[str, Any], sizes: _Sizes, where: str, notes: list[str]
) -> dict[str, Any]:
    """The distillation token (every DeiT model has one), and the pooler where stored."""
    fields: dict[str, Any] = {"use_distillation_token": True}
    if sizes.pooler:
        fields["pooler_output_size"] = sizes.pooler
        fields["pooler_act"] = src["pooler_act"]
    return fields


def _mae_switches(
    src: Mapping[str, Any], sizes: _Sizes, where: str, notes: list[str]
) -> dict[str, Any]:
    """None: the encoder is a plain ViT. What differs is the random masking, which the
    converted model does not do, so the notes say so."""
    notes.append(
        f"masking: transformers' ViTMAEModel drops a random mask_ratio="
        f"{src['mask_ratio']} of the patches in every forward pass; the converted "
        "encoder sees them all (ViTMAEModel with mask_ratio=0)"
    )
    return {}


def sincos_position_table(width: int, grid: int) -> np.ndarray:
    """transformers' `get_2d_sincos_pos_embed(width, grid, add_cls_token=True)` as the
    canonical (1, 1 + grid^2, D) float32 table: ViT-MAE's fixed positions. The first
    half of each row encodes the column index, the second the row index, as there."""
    if width % 4:
        raise CheckpointError(f"a 2-D sin-cos table needs a width divisible by 4; got {width}")
    columns, rows = np.meshgrid(
        np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)
    )

    def one_axis(dim: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=float) / (dim / 2.0))
        angles = np.outer(positions.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([one_axis(width // 2, columns), one_axis(width // 2, rows)], axis=1)
    table = np.concatenate([np.zeros([1, width]), table], axis=0)
    return table.astype(np.float32)[None]


def _mae_positions(
    tensors: dict[str, np.ndarray], fields: dict[str, Any], notes: list[str]
) -> None:
    """ViT-MAE's position table is fixed (not trained): where a checkpoint leaves it
    out, it is computed as transformers computes it."""
    if "embeddings.position_embeddings" in tensors:
        return
    height, width = hw_pair(fields["image_size"], "image_size")
    ph, pw = hw_pair(fields["patch_size"], "patch_size")
    if height // ph != width // pw:
        raise CheckpointError(
            f"no embeddings.position_embeddings, and transformers computes ViT-MAE's sin-cos "
            f"table for square patch grids only (this one is {height // ph}x{width // pw})"
        )
    dtype = tensors[PATCH_KERNEL].dtype
    tensors["embeddings.position_embeddings"] = sincos_position_table(
        fields["hidden_size"], height // ph
    ).astype(dtype)
    notes.append(
        "embeddings.position_embeddings: not stored; computed as transformers' ViTMAE "
        "initialises it (get_2d_sincos_pos_embed, fixed, class row zero)"
    )


# ------------------------------------------------------------------ the table
# transformers' config defaults, for the fields each family's config.json may omit.
_VIT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
    "image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": True,
}  # fmt: skip
_DINOV2_DEFAULTS: dict[str, Any] = {  # the MLP width is mlp_ratio's, not intermediate_size
    **{k: v for k, v in _VIT_DEFAULTS.items() if k != "intermediate_size"},
    "mlp_ratio": 4, "layer_norm_eps": 1e-6, "patch_size": 14, "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
}  # fmt: skip
_CLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512,
    "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3, "image_size": 224,
    "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0, "initializer_range": 0.02,
}  # fmt: skip
_SIGLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
}  # fmt: skip
# transformers' image processors for each family (used where preprocessor_config.json is
# missing): the fields ViTImageProcessor shares, and how they resize and crop.
_BIT_PROCESSOR = {
    "image_processor_type": "BitImageProcessor", "image_mean": list(IMAGENET_DEFAULT_MEAN),
    "image_std": list(IMAGENET_DEFAULT_STD), "resample": PIL_BICUBIC,
    "size": {"shortest_edge": 256}, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
}  # fmt: skip
_CLIP_PROCESSOR = {
    "image_processor_type": "CLIPImageProcessor", "image_mean": list(OPENAI_CLIP_MEAN),
    "image_std": list(OPENAI_CLIP_STD), "resample": PIL_BICUBIC,
    "size": {"shortest_edge": 224}, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
}  # fmt: skip
_SIGLIP_PROCESSOR = {
    "image_processor_type": "SiglipImageProcessor", "image_mean": list(IMAGENET_STANDARD_MEAN),
    "image_std": list(IMAGENET_STANDARD_STD), "resample": PIL_BICUBIC,
    "size": {"height": 224, "width": 224},
}  # fmt: skip
_DEIT_PROCESSOR = {
    "image_processor_type": "DeiTImageProcessor", "image_mean": list(IMAGENET_DEFAULT_MEAN),
    "image_std": list(IMAGENET_DEFAULT_STD), "resample": PIL_BICUBIC,
    "size": {"height": 256, "width": 256}, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
}  # fmt: skip
_VIT_PROCESSOR = {
    "image_processor_type": "ViTImageProcessor", "image_mean": list(IMAGENET_STANDARD_MEAN),
    "image_std": list(IMAGENET_STANDARD_STD), "resample": PIL_BILINEAR,
    "size": {"height": 224, "width": 224},
}  # fmt: skip
_CLIP = Family(
    title="CLIP", base_class="CLIPVisionModel", marker="embeddings.patch_embedding.weight",
    prefix="vision_model.", rules=CLIP_RULES, defaults=_CLIP_DEFAULTS,
    switches=_clip_switches, processor=_CLIP_PROCESSOR,
    heads=(Rule("visual_projection.weight", "classifier.weight", copy),),
    finish=_add_projection_bias, dropped=(_POSITION_IDS,),
    refused=((r"^classifier\.", "CLIPForImageClassification: its classifier reads the mean "
              "of the patch tokens before post_layernorm, which the canonical model does not "
              "compute. Convert the image encoder instead: CLIPVisionModel"
              ".from_pretrained(folder).save_pretrained(encoder), then convert that"),),
)  # fmt: skip
_SIGLIP = Family(
    title="SigLIP", base_class="SiglipVisionModel", marker="embeddings.patch_embedding.weight",
    prefix="vision_model.", rules=SIGLIP_RULES, defaults=_SIGLIP_DEFAULTS,
    switches=_siglip_switches, processor=_SIGLIP_PROCESSOR, dropped=(_POSITION_IDS,),
    refused=((r"^classifier\.", "SiglipForImageClassification: its classifier reads the "
              "mean of the tokens beside an unused MAP head, which one canonical pooling "
              "cannot express. Convert the image encoder instead: SiglipVisionModel"
              ".from_pretrained(folder).save_pretrained(encoder), then convert that"),),
)  # fmt: skip
FAMILIES: dict[str, Family] = {
    "dinov2": Family(
        title="DINOv2", base_class="Dinov2Model", prefix="dinov2.", rules=DINOV2_RULES,
        defaults=_DINOV2_DEFAULTS, switches=_dinov2_switches, processor=_BIT_PROCESSOR,
        dropped=(_MASK_TOKEN,), refused=(_dinov2_classifier("Dinov2"),),
    ),
    "dinov2_with_registers": Family(
        title="DINOv2 with registers", base_class="Dinov2WithRegistersModel",
        prefix="dinov2_with_registers.", rules=DINOV2_REGISTERS_RULES,
        defaults={**_DINOV2_DEFAULTS, "patch_size": 16, "num_register_tokens": 4},
        switches=_registers_switches, processor=_BIT_PROCESSOR, dropped=(_MASK_TOKEN,),
        refused=(_dinov2_classifier("Dinov2WithRegisters"),), finish=_fold_class_position,
    ),
    "clip_vision_model": _CLIP,
    "clip": replace(_CLIP, dropped=(_POSITION_IDS, *_TEXT_TOWER), sub_config="vision_config"),
    "siglip_vision_model": _SIGLIP,
    "siglip": replace(_SIGLIP, dropped=(_POSITION_IDS, *_TEXT_TOWER),
                      sub_config="vision_config"),
    "deit": Family(
        title="DeiT", base_class="DeiTModel", prefix="deit.", rules=DEIT_RULES,
        defaults={**_VIT_DEFAULTS, "pooler_act": "tanh"}, switches=_deit_switches,
        processor=_DEIT_PROCESSOR, dropped=(_MASK_TOKEN,),
        heads=(*_weight_bias("cls_classifier", "classifier"),
               *_weight_bias("distillation_classifier", "distillation_classifier")),
        refused=(
            (r"^classifier\.", "DeiTForImageClassification: one classifier on the class token "
             "while the distillation token stays in the sequence; a canonical distilled model "
             "has both heads and averages them. Convert the encoder instead: DeiTModel"
             ".from_pretrained(folder, add_pooling_layer=False).save_pretrained(encoder), then "
             "convert that folder"),
            (r"^decoder\.", "DeiTForMaskedImageModeling: a masked-image-modeling decoder, not "
             "an image classifier or encoder. Convert the encoder instead: DeiTModel"
             ".from_pretrained(folder).save_pretrained(encoder), then convert that folder"),
        ),
    ),
    "vit_mae": Family(
        title="ViT-MAE", base_class="ViTMAEModel", prefix="vit.", rules=MAE_RULES,
        defaults={**_VIT_DEFAULTS, "mask_ratio": 0.75}, switches=_mae_switches,
        processor=_VIT_PROCESSOR,
        dropped=((r"^decoder\.", "the MAE decoder (pixel reconstruction in pretraining)"),),
        finish=_mae_positions,
    ),
}  # fmt: skip
# Switches whose value the weights (or the key mapping) decide: a hint may not change them.
FAMILY_FIXED = frozenset({
    "num_register_tokens", "use_distillation_token", "no_embed_class", "use_pre_norm",
    "patch_embedding_bias", "use_swiglu_ffn", "use_class_token",
})  # fmt: skip
# The family processors' fields that mean the same in ViTImageProcessor (the rest of them,
# resize and crop, it does differently; `_family_processor` says how).
_PROCESSOR_FIELDS = (
    "do_resize", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
    "image_std", "do_convert_rgb",
)  # fmt: skip


# ------------------------------------------------------------ family reading
def family_for(model_type: str, config_file: Path) -> Family:
    """The family of a config.json's model_type (not "vit"); a text tower or a model_type
    outside the family is refused, naming what would convert."""
    if model_type in TEXT_TOWERS:
        name = TEXT_TOWERS[model_type]
        raise ConfigError(
            f"{config_file}: model_type={model_type!r} is {name}'s text tower; there is no "
            f"image encoder in it to convert (convert the {name} vision model or the full "
            f"{name.lower()} folder instead)"
        )
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{config_file}: model_type={model_type!r} is not a model this converter reads; it "
            f"reads model_type {', '.join(['vit', *FAMILIES])}"
        )
    return FAMILIES[model_type]


def head_of(keys: Iterable[str]) -> str:
    """The head a family source's key names hold: "teacher" (DeiT's two heads),
    "projection" (CLIP's visual_projection) or "base" (none); `--verify` picks the
    transformers class by it."""
    names = set(keys)
    if "cls_classifier.weight" in names:
        return "teacher"
    if "visual_projection.weight" in names:
        return "projection"
    return "base"


def read_family(
    family: Family,
    model_type: str,
    tensors: Mapping[str, np.ndarray],
    fmt: str,
    weights: Path,
    config_file: Path,
) -> SourceWeights:
    """A family model's tensors (read from `weights` by `hf`) -> canonical tensors, the
    ViTConfig fields with the family's switches, and ViTImageProcessor fields."""
    src = _source_config(family, read_json(config_file))
    folder = weights.parent
    notes: list[str] = []
    canonical = _map_family(tensors, family, model_type, config_file, weights, notes)
    sizes = _sizes(canonical, str(folder))
    fields = _family_fields(family, src, sizes, str(config_file), notes)
    if family.finish is not None:
        family.finish(canonical, fields, notes)
    prefix = BASE_PREFIX if any(k.startswith(HEADS) for k in canonical) else ""
    out = {
        (k if k.startswith(HEADS) else prefix + k): np.ascontiguousarray(v)
        for k, v in canonical.items()
    }
    return SourceWeights(
        tensors=out,
        config=fields,
        source_format=f"hf-{model_type}-{fmt}",
        assumed=notes,
        processor=_family_processor(folder, family, fields, notes),
        fixed=FAMILY_FIXED & set(fields),
    )


def _source_config(family: Family, data: Mapping[str, Any]) -> dict[str, Any]:
    """The family's config fields: config.json (its vision_config for a dual encoder) over
    transformers' defaults."""
    if family.sub_config is None:
        return {**family.defaults, **data}
    sub = data.get(family.sub_config) or {}
    if not isinstance(sub, dict):
        raise ConfigError(f"{family.sub_config} must be a JSON object; got {type(sub).__name__}")
    src = {**family.defaults, **sub}
    if "projection_dim" in data:  # CLIPModel's projection width is the top-level one
        src["projection_dim"] = data["projection_dim"]
    return src


def _map_family(
    tensors: Mapping[str, np.ndarray],
    family: Family,
    model_type: str,
    config_file: Path,
    weights: Path,
    notes: list[str],
) -> dict[str, np.ndarray]:
    """Every source key through its rule (encoder: unprefixed), or dropped, or refused."""
    where = str(weights.parent)
    if family.prefix + family.marker in tensors:
        prefix = family.prefix
    elif family.marker in tensors:
        prefix = ""
    else:
        raise ConfigError(
            f"{config_file}: model_type={model_type!r} ({family.title}), but {weights.name} "
            f"holds no {family.title} patch projection ({family.prefix + family.marker} or "
            f"{family.marker}; keys: {preview_keys(tensors)}); the config does not describe "
            "these weights"
        )
    for pattern, why in family.refused:
        hits = [k for k in tensors if re.search(pattern, k)]
        if hits:
            raise CheckpointError(
                f"{where}: a transformers {family.title} model with {preview_keys(hits, 2)}: "
                f"{why}. Refused rather than converted into a different function"
            )
    width = int(tensors[prefix + family.marker].shape[0])
    arch = Architecture(width=width, use_class_token=True, table_has_class_slot=True)
    encoder, heads = _compiled(family.rules), _compiled(family.heads)
    out: dict[str, np.ndarray] = {}
    dropped: dict[str, list[str]] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        reason = next((why for pattern, why in family.dropped if re.search(pattern, key)), None)
        if reason is not None:
            dropped.setdefault(reason, []).append(key)
            continue
        found = _match(encoder, key[len(prefix) :]) if key.startswith(prefix) else None
        found = found or _match(heads, key)
        if found is None:
            unknown.append(key)
            continue
        rule, parts = found
        try:
            pairs = rule.apply(value, arch, **parts)
        except CheckpointError as exc:
            raise CheckpointError(f"{where}: {key} {exc}") from None
        for name, array in pairs.items():
            if name in out:
                raise CheckpointError(
                    f"{where}: {key} maps to {name}, which another key already filled; the "
                    "checkpoint mixes two layouts"
                )
            out[name] = array
    if unknown:
        raise CheckpointError(
            f"{where}: keys a transformers {family.title} model ({model_type}) does not have "
            f"({len(unknown)}): {preview_keys(unknown)}; refused rather than dropped"
        )
    for why, keys in dropped.items():
        notes.append(f"dropped {len(keys)} tensor(s), {why}: {preview_keys(keys, 2)}")
    return out


def _compiled(rules: tuple[Rule, ...]) -> tuple[tuple[re.Pattern[str], Rule], ...]:
    """Each rule's source pattern as a regex whose groups fill the target's braces."""

    def pattern(source: str) -> re.Pattern[str]:
        text = re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)")
        return re.compile("^" + text.replace(r"\{qkv\}", r"(?P<qkv>query|key|value)") + "$")

    return tuple((pattern(rule.source), rule) for rule in rules)


def _match(
    rules: tuple[tuple[re.Pattern[str], Rule], ...], key: str
) -> tuple[Rule, dict[str, str]] | None:
    for regex, rule in rules:
        if m := regex.match(key):
            return rule, m.groupdict()
    return None


def _family_fields(
    family: Family, src: Mapping[str, Any], sizes: _Sizes, where: str, notes: list[str]
) -> dict[str, Any]:
    """ViTConfig fields: sizes from the weights (checked against config.json), numerics
    from config.json, and the family's switches."""
    ph, pw = sizes.patch
    stated = {
        "hidden_size": sizes.width,
        "num_hidden_layers": sizes.layers,
        "num_channels": sizes.channels,
        "intermediate_size": sizes.intermediate,
    }
    for name, value in stated.items():
        if name in src and src[name] != value:
            raise CheckpointError(
                f"{where}: {name}={src[name]!r}, but the weights have {value}; the config does "
                "not describe these weights"
            )
    if hw_pair(src["patch_size"], "patch_size") != sizes.patch:
        raise CheckpointError(
            f"{where}: patch_size={src['patch_size']!r}, but the patch kernel is {ph}x{pw}"
        )
    fields: dict[str, Any] = {
        **stated,
        "num_attention_heads": src["num_attention_heads"],
        "hidden_act": src["hidden_act"],
        "layer_norm_eps": src["layer_norm_eps"],
        "image_size": src["image_size"],
        "patch_size": ph if ph == pw else [ph, pw],
        "encoder_stride": ph,
        "qkv_bias": sizes.qkv_bias,
        "initializer_range": src.get("initializer_range", 0.02),
        "hidden_dropout_prob": src.get("hidden_dropout_prob", 0.0),
        # CLIP and SigLIP call it attention_dropout
        "attention_probs_dropout_prob": src.get(
            "attention_probs_dropout_prob", src.get("attention_dropout", 0.0)
        ),
        "num_labels": sizes.labels,
    }
    labels = src.get("id2label")
    if sizes.labels and family.heads and isinstance(labels, dict) and len(labels) == sizes.labels:
        fields["id2label"] = labels
        if isinstance(src.get("label2id"), dict):
            fields["label2id"] = src["label2id"]
    fields.update(family.switches(src, sizes, where, notes))
    return fields


def _family_processor(
    folder: Path, family: Family, fields: Mapping[str, Any], notes: list[str]
) -> dict[str, Any]:
    """ViTImageProcessor fields from the family's preprocessor_config.json (or its
    transformers defaults), and in words what ViTImageProcessor does differently."""
    file = folder / PROCESSOR_NAME
    data = read_json(file) if file.is_file() else {}
    merged = {**family.processor, **data}
    height, width = hw_pair(fields["image_size"], "image_size")
    kind = str(merged.get("image_processor_type") or family.processor["image_processor_type"])
    if not data:
        notes.append(
            f"preprocessing: no {PROCESSOR_NAME}; wrote {kind}'s defaults (mean "
            f"{merged['image_mean']}, std {merged['image_std']}, resample {merged['resample']})"
        )
    size, crop = merged.get("size"), merged.get("crop_size")
    if merged.get("do_center_crop") or (isinstance(size, dict) and "shortest_edge" in size):
        notes.append(
            f"preprocessing: {kind} resizes to {size} then centre-crops to {crop} when "
            f"do_center_crop; ViTImageProcessor resizes straight to {height}x{width}, so "
            "images of another aspect ratio are squashed, not cropped (crop them first to "
            "match the source exactly)"
        )
    out = {k: merged[k] for k in _PROCESSOR_FIELDS if k in merged}
    return {**out, "size": {"height": height, "width": width}}


# Keys that give away a family checkpoint handed without its config.json.
_LONE_FAMILIES = (
    (r"\.layer_scale[12]\.lambda1$|\.mlp\.weights_in\.", "DINOv2"),
    (r"(^|\.)embeddings\.register_tokens$", "DINOv2 with registers"),
    (r"(^|\.)embeddings\.distillation_token$", "DeiT"),
    (r"^vision_model\.", "CLIP or SigLIP"),
    (r"^decoder\.decoder_", "ViT-MAE (for pretraining)"),
)


def refuse_lone_family(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """Refuse a family checkpoint without its config.json: read as a plain ViT from its
    shapes it would lose the family's switches, which only the config states."""
    for pattern, what in _LONE_FAMILIES:
        hits = [k for k in tensors if re.search(pattern, k)]
        if hits:
            raise CheckpointError(
                f"{path}: a transformers {what} checkpoint ({preview_keys(hits, 2)}) without "
                f"its {CONFIG_NAME}; its architecture is in that config: pass the folder "
                "that holds both (or put config.json beside the file)"
            )
