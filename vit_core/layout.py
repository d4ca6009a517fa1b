"""The canonical weight layout, written down once.

On disk a model is a folder in Hugging Face transformers' ViT PyTorch layout:

    model.safetensors          the tensors below, float32 unless saved otherwise
    config.json                `ViTConfig.to_dict()`
    preprocessor_config.json   `ViTImageProcessor.to_dict()` (optional)

Keys of `ViTModel` (classification models prefix every key with `vit.` and add the
top-level `classifier.*`; masked-image-modeling models prefix them too, with the mask
token, and add the top-level `decoder.0.*`). Symbols: D hidden_size, C num_channels,
(Ph, Pw) patch size, T num_positions (patches + prefix tokens, see docs/families.md),
R num_register_tokens, I intermediate_size, G the first MLP layer's width (2I for the
gated MLP, else I), Dp pooler_output_size, K num_labels, E encoder_stride^2 * C, {i} the
layer index 0..num_hidden_layers-1. Linear weights are
(out_features, in_features) and the patch projection is a Conv2d kernel (O, I, H, W),
exactly as in transformers; the Flax twin transposes on load, never on disk.

The twins hold the same weights under a shorter *internal* vocabulary (`norm1`,
`attention.qkv`, `attention.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`, the words of timm
and big_vision) with query, key and value fused into one (3D, D) projection, so that
attention costs one matmul. `to_internal` and `to_canonical` are the only bridge.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from vit_core.config import ViTConfig
from vit_core.errors import LayoutError

WEIGHTS_NAME = "model.safetensors"
# An exported graph (`model.onnx`) carries its folder's text in its metadata, keyed by file
# name (config.json, preprocessor_config.json), and its `ModelKind` as JSON under this key:
# written by `vit_torch.export`, read by `vit_onnx.backend`.
ONNX_NAME = "model.onnx"
KIND_METADATA_KEY = "model_kind"
# The one input of an exported file (ONNX, StableHLO): transformers' argument name.
EXPORT_INPUT_NAME = "pixel_values"
BASE_PREFIX = "vit."
MASK_TOKEN = "embeddings.mask_token"
DECODER = "decoder."  # the masked-image-modeling decoder's keys (top level, as the heads')
LAYER = "encoder.layer.{i}."  # canonical
BLOCK = "encoder.layers.{i}."  # internal


def _always(config: ViTConfig, kind: ModelKind) -> bool:
    return True


@dataclass(frozen=True)
class Entry:
    """One canonical tensor: its key, symbolic shape, the internal name, what it is, and
    whether a model of (config, kind) has it."""

    key: str
    shape: tuple[str, ...]
    internal: str
    meaning: str
    when: Callable[[ViTConfig, ModelKind], bool] = _always
    condition: str = ""  # `when` in words, for the docs


@dataclass(frozen=True)
class ModelKind:
    """Which of the layout's optional parts a model has.

    `mask_token`: the embeddings' learned mask token (transformers' `use_mask_token`);
    `decoder`: the SimMIM pixel decoder of `ViTForMaskedImageModeling`, which always has
    the mask token and neither a pooler nor a classifier (as transformers builds it).
    """

    classifier: bool
    pooler: bool
    mask_token: bool = False
    decoder: bool = False

    def __post_init__(self) -> None:
        if self.decoder and (self.classifier or self.pooler or not self.mask_token):
            raise ValueError(f"{self}: a decoder comes with a mask token, no pooler, no classifier")
        if self.mask_token and self.classifier:
            raise ValueError(f"{self}: a classifier has no mask token (as in transformers)")

    @property
    def prefix(self) -> str:
        """`vit.` before the encoder's keys of a model with a head (classifier or decoder)."""
        return BASE_PREFIX if self.classifier or self.decoder else ""

    @property
    def model_type(self) -> str:
        """`vit_core.load`'s name for this kind of model (`model_type=`)."""
        if self.decoder:
            return MASKED_IMAGE_MODELING
        return "classification" if self.classifier else "base"

    @property
    def architecture(self) -> str:
        """The transformers class of this kind (`config.json`'s `architectures`)."""
        return ARCHITECTURES[self.model_type]


MASKED_IMAGE_MODELING = "masked-image-modeling"
ARCHITECTURES = {
    "base": "ViTModel",
    "classification": "ViTForImageClassification",
    MASKED_IMAGE_MODELING: "ViTForMaskedImageModeling",
}
# The masked-image-modeling kind (transformers' `ViTForMaskedImageModeling`).
MIM_KIND = ModelKind(classifier=False, pooler=False, mask_token=True, decoder=True)


def _entries(
    rows: tuple[tuple[str, tuple[str, ...], str, str], ...],
    when: Callable[[ViTConfig, ModelKind], bool],
    condition: str,
) -> tuple[Entry, ...]:
    return tuple(Entry(*row, when=when, condition=condition) for row in rows)


def _has_map_head(c: ViTConfig, k: ModelKind) -> bool:
    return c.pooling_type == "map"


# fmt: off
TABLE: tuple[Entry, ...] = (
    Entry("embeddings.cls_token", ("1", "1", "D"), "embeddings.cls_token", "class token",
          lambda c, k: c.use_class_token, "use_class_token"),
    Entry("embeddings.distillation_token", ("1", "1", "D"), "embeddings.distillation_token",
          "distillation token (DeiT), after the class token",
          lambda c, k: c.use_distillation_token, "use_distillation_token"),
    Entry("embeddings.register_tokens", ("1", "R", "D"), "embeddings.register_tokens",
          "register tokens, after the class and distillation tokens",
          lambda c, k: c.num_register_tokens > 0, "num_register_tokens > 0"),
    Entry(MASK_TOKEN, ("1", "1", "D"), MASK_TOKEN,
          "mask token (SimMIM): stands in for the masked patches' embeddings, before the "
          "prefix tokens and positions are added", lambda c, k: k.mask_token,
          "masked image modeling (or use_mask_token)"),
    Entry("embeddings.position_embeddings", ("1", "T", "D"), "embeddings.position_embeddings",
          "learned positions: the prefix tokens' (unless no_embed_class), then the patches "
          "row-major"),
    Entry("embeddings.patch_embeddings.projection.weight", ("D", "C", "Ph", "Pw"),
          "embeddings.patch_embeddings.weight", "patch projection, a stride-P Conv2d kernel"),
    Entry("embeddings.patch_embeddings.projection.bias", ("D",),
          "embeddings.patch_embeddings.bias", "patch projection bias",
          lambda c, k: c.patch_embedding_bias, "patch_embedding_bias"),
    *_entries((
        ("pre_layrnorm.weight", ("D",), "norm_pre.weight", "LayerNorm before the blocks (CLIP)"),
        ("pre_layrnorm.bias", ("D",), "norm_pre.bias", "its shift"),
    ), lambda c, k: c.use_pre_norm, "use_pre_norm"),
    Entry(LAYER + "layernorm_before.weight", ("D",), BLOCK + "norm1.weight",
          "pre-attention LayerNorm scale"),
    Entry(LAYER + "layernorm_before.bias", ("D",), BLOCK + "norm1.bias",
          "pre-attention LayerNorm shift"),
    Entry(LAYER + "attention.attention.query.weight", ("D", "D"), BLOCK + "attention.qkv.weight",
          "query projection (rows 0:D of the fused qkv)"),
    Entry(LAYER + "attention.attention.query.bias", ("D",), BLOCK + "attention.qkv.bias",
          "query bias", lambda c, k: c.qkv_bias, "qkv_bias"),
    Entry(LAYER + "attention.attention.key.weight", ("D", "D"), BLOCK + "attention.qkv.weight",
          "key projection (rows D:2D of the fused qkv)"),
    Entry(LAYER + "attention.attention.key.bias", ("D",), BLOCK + "attention.qkv.bias",
          "key bias", lambda c, k: c.qkv_bias, "qkv_bias"),
    Entry(LAYER + "attention.attention.value.weight", ("D", "D"), BLOCK + "attention.qkv.weight",
          "value projection (rows 2D:3D of the fused qkv)"),
    Entry(LAYER + "attention.attention.value.bias", ("D",), BLOCK + "attention.qkv.bias",
          "value bias", lambda c, k: c.qkv_bias, "qkv_bias"),
    Entry(LAYER + "attention.output.dense.weight", ("D", "D"), BLOCK + "attention.proj.weight",
          "attention output projection, heads concatenated in order"),
    Entry(LAYER + "attention.output.dense.bias", ("D",), BLOCK + "attention.proj.bias",
          "attention output bias"),
    Entry(LAYER + "layer_scale1.lambda1", ("D",), BLOCK + "ls1.gamma",
          "LayerScale of the attention branch", lambda c, k: c.layerscale_value is not None,
          "layerscale_value set"),
    Entry(LAYER + "layernorm_after.weight", ("D",), BLOCK + "norm2.weight",
          "pre-MLP LayerNorm scale"),
    Entry(LAYER + "layernorm_after.bias", ("D",), BLOCK + "norm2.bias",
          "pre-MLP LayerNorm shift"),
    Entry(LAYER + "intermediate.dense.weight", ("G", "D"), BLOCK + "mlp.fc1.weight",
          "MLP expansion (G = 2I gated halves with use_swiglu_ffn, else I)"),
    Entry(LAYER + "intermediate.dense.bias", ("G",), BLOCK + "mlp.fc1.bias", "MLP expansion bias"),
    Entry(LAYER + "output.dense.weight", ("D", "I"), BLOCK + "mlp.fc2.weight",
          "MLP contraction"),
    Entry(LAYER + "output.dense.bias", ("D",), BLOCK + "mlp.fc2.bias", "MLP contraction bias"),
    Entry(LAYER + "layer_scale2.lambda1", ("D",), BLOCK + "ls2.gamma",
          "LayerScale of the MLP branch", lambda c, k: c.layerscale_value is not None,
          "layerscale_value set"),
    *_entries((
        ("layernorm.weight", ("D",), "layernorm.weight", "final LayerNorm scale, on every token"),
        ("layernorm.bias", ("D",), "layernorm.bias", "final LayerNorm shift"),
    ), lambda c, k: c.has_token_norm, "use_final_norm and not use_fc_norm"),
    *_entries((
        ("head.probe", ("1", "1", "D"), "head.probe", "MAP head: the learned query"),
        ("head.attention.in_proj_weight", ("3D", "D"), "head.attention.qkv.weight",
         "MAP head attention: query (on the probe), key, value rows"),
        ("head.attention.in_proj_bias", ("3D",), "head.attention.qkv.bias", "their biases"),
        ("head.attention.out_proj.weight", ("D", "D"), "head.attention.proj.weight",
         "MAP head attention output"),
        ("head.attention.out_proj.bias", ("D",), "head.attention.proj.bias", "its bias"),
        ("head.layernorm.weight", ("D",), "head.norm.weight", "MAP head LayerNorm scale"),
        ("head.layernorm.bias", ("D",), "head.norm.bias", "MAP head LayerNorm shift"),
        ("head.mlp.fc1.weight", ("I", "D"), "head.mlp.fc1.weight", "MAP head MLP expansion"),
        ("head.mlp.fc1.bias", ("I",), "head.mlp.fc1.bias", "its bias"),
        ("head.mlp.fc2.weight", ("D", "I"), "head.mlp.fc2.weight", "MAP head MLP contraction"),
        ("head.mlp.fc2.bias", ("D",), "head.mlp.fc2.bias", "its bias"),
    ), _has_map_head, "pooling_type == 'map'"),
    *_entries((
        ("fc_norm.weight", ("D",), "fc_norm.weight", "final LayerNorm scale, after pooling"),
        ("fc_norm.bias", ("D",), "fc_norm.bias", "its shift"),
    ), lambda c, k: c.use_final_norm and c.use_fc_norm, "use_fc_norm"),
    *_entries((
        ("pooler.dense.weight", ("Dp", "D"), "pooler.dense.weight",
         "pooler Dense (tanh follows); the JAX pre_logits layer"),
        ("pooler.dense.bias", ("Dp",), "pooler.dense.bias", "pooler bias"),
    ), lambda c, k: k.pooler, "a pooler"),
    *_entries((
        ("classifier.weight", ("K", "D"), "classifier.weight",
         "classification head (top level, no vit. prefix)"),
        ("classifier.bias", ("K",), "classifier.bias", "classification head bias"),
    ), lambda c, k: k.classifier and c.num_labels > 0, "a classifier, K > 0"),
    *_entries((
        ("distillation_classifier.weight", ("K", "D"), "distillation_classifier.weight",
         "DeiT's second head, on the distillation token (top level)"),
        ("distillation_classifier.bias", ("K",), "distillation_classifier.bias", "its bias"),
    ), lambda c, k: k.classifier and c.num_labels > 0 and c.use_distillation_token,
       "a classifier with use_distillation_token"),
    *_entries((
        (DECODER + "0.weight", ("E", "D", "1", "1"), "decoder.projection.weight",
         "masked image modeling decoder (top level): a 1x1 Conv2d to E = encoder_stride^2 * C "
         "values per patch, then PixelShuffle(encoder_stride)"),
        (DECODER + "0.bias", ("E",), "decoder.projection.bias", "its bias"),
    ), lambda c, k: k.decoder, "masked image modeling"),
)
# fmt: on
HEADS = ("classifier.", "distillation_classifier.")  # the classifiers' top-level keys
TOP_LEVEL = (*HEADS, DECODER)  # keys that never take the `vit.` prefix
QKV = ("query", "key", "value")
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def model_kind(keys: set[str] | Mapping[str, object], config: ViTConfig) -> ModelKind:
    """Tell a classification, masked-image-modeling or base-model checkpoint by its keys.

    A decoder key or a `vit.`-prefixed mask token makes it masked image modeling (what
    it lacks of that layout the layout check then names); an unprefixed mask token is
    a base model's (transformers' `ViTModel(use_mask_token=True)`)."""
    if any(k.startswith(DECODER) for k in keys) or BASE_PREFIX + MASK_TOKEN in keys:
        return MIM_KIND
    classifier = any(k.startswith((BASE_PREFIX, *HEADS)) for k in keys)
    pooler = f"{BASE_PREFIX if classifier else ''}pooler.dense.weight" in keys
    return ModelKind(
        classifier=classifier,
        pooler=pooler or (classifier and config.classifier_uses_pooler),
        mask_token=not classifier and MASK_TOKEN in keys,
    )


def _dims(config: ViTConfig) -> dict[str, int]:
    ph, pw = config.patch_hw
    return {
        "1": 1,
        "D": config.hidden_size,
        "C": config.num_channels,
        "Ph": ph,
        "Pw": pw,
        "T": config.num_positions,
        "R": config.num_register_tokens,
        "3D": 3 * config.hidden_size,
        "I": config.intermediate_size,
        "G": config.mlp_in_width,
        "Dp": config.pooler_output_size,
        "K": config.num_labels,
        "E": config.encoder_stride**2 * config.num_channels,
    }


def expected_shapes(config: ViTConfig, kind: ModelKind) -> dict[str, tuple[int, ...]]:
    """Every canonical key this model has, with its shape."""
    dims = _dims(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in TABLE:
        if not entry.when(config, kind):
            continue
        shape = tuple(dims[s] for s in entry.shape)
        prefix = "" if entry.key.startswith(TOP_LEVEL) else kind.prefix
        layers = range(config.num_hidden_layers) if "{i}" in entry.key else [None]
        for i in layers:
            shapes[prefix + entry.key.format(i=i)] = shape
    return shapes


def check_layout(
    tensors: Mapping[str, Any], config: ViTConfig, kind: ModelKind, source: str
) -> None:
    """Raise `LayoutError` naming every missing, unexpected or mis-shaped key.

    Only `.shape` of each value is read, so header-only descriptions work too.
    """
    expected = expected_shapes(config, kind)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{k}: expected {expected[k]}, found {tuple(tensors[k].shape)}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors ({len(misshaped)}): {'; '.join(misshaped)}")
    if problems:
        raise LayoutError(
            f"{source}: weights do not match the config "
            f"(hidden_size={config.hidden_size}, layers={config.num_hidden_layers}, "
            f"image_size={config.image_size}, patch_size={config.patch_size}, "
            f"num_labels={config.num_labels}): " + " | ".join(problems)
        )


def _internal_name(key: str) -> str:
    """Internal name of a canonical key (prefix stripped); q/k/v map to the fused qkv."""
    for entry in TABLE:
        if "{i}" not in entry.key:
            if key == entry.key:
                return entry.internal
            continue
        head, tail = entry.key.split("{i}")
        if key.startswith(head) and key.endswith(tail):
            index = key[len(head) : len(key) - len(tail)]
            if index.isdigit():
                return entry.internal.format(i=index)
    raise LayoutError(f"{key}: not a key of the canonical ViT layout")


def _split_prefix(key: str, kind: ModelKind) -> tuple[str, str]:
    """(prefix, rest): the `vit.` prefix applies to everything but the heads."""
    if kind.prefix and key.startswith(kind.prefix):
        return kind.prefix, key[len(kind.prefix) :]
    return "", key


def to_internal(
    tensors: Mapping[str, np.ndarray],
    kind: ModelKind,
    consumed: Callable[[np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Canonical tensors -> the twins' internal names, query/key/value fused (q, k, v rows).

    The result's keys are exactly the torch twin's `state_dict()` keys. `consumed` is
    called with each query, key and value tensor once it is copied into its fused one.
    """
    internal: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        prefix, name = _split_prefix(key, kind)
        target = prefix + _internal_name(name)
        if ".attention.attention." not in name:
            internal[target] = value
        elif name.split(".")[-2] == "query":  # key and value are fetched with it
            parts = [tensors[key.replace(".query.", f".{part}.")] for part in QKV]
            internal[target] = np.concatenate([np.asarray(p) for p in parts], axis=0)
            if consumed is not None:
                for part in parts:
                    consumed(part)
    return internal


def to_canonical(internal: Mapping[str, np.ndarray], kind: ModelKind) -> dict[str, np.ndarray]:
    """The inverse of `to_internal`: split the fused qkv, restore canonical names."""
    by_internal: dict[str, list[str]] = {}
    for entry in TABLE:
        by_internal.setdefault(entry.internal, []).append(entry.key)
    out: dict[str, np.ndarray] = {}
    for full_name, value in internal.items():
        prefix, name = _split_prefix(full_name, kind)
        match = _LAYER_INDEX.search(name)
        index = match[1] if match else None
        template = _LAYER_INDEX.sub("layers.{i}.", name, count=1)
        if template not in by_internal:
            raise LayoutError(f"{full_name}: not an internal ViT weight name")
        keys = [k.format(i=index) for k in by_internal[template]]
        parts = np.split(np.asarray(value), len(keys), axis=0) if len(keys) > 1 else [value]
        for key, part in zip(keys, parts, strict=True):
            out[prefix + key] = part
    return out


def layout_markdown() -> str:
    """The table above as Markdown, for the docs."""
    rows = ["| key | shape | meaning | present when |", "|---|---|---|---|"]
    rows += [
        f"| `{e.key}` | ({', '.join(e.shape)}) | {e.meaning} | {e.condition or 'always'} |"
        for e in TABLE
    ]
    return "\n".join(rows)
