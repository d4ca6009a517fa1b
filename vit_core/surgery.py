"""Model surgery on canonical tensors, in numpy, so both twins get the same weights.

Asked for by name at load time, never silent: narrowing a classification or
masked-image-modeling checkpoint to its encoder (`encoder_of`), a new classifier for
another label set (`replace_head`), a new masked-image-modeling decoder (`new_decoder`),
and the position table resampled for another input size (`resize_for_image_size`).
The layout check with its next-step hints lives here too, since it decides which surgery
a mismatch calls for.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vit_core.checkpoint import CONVERT_HINT
from vit_core.config import ViTConfig
from vit_core.errors import CheckpointError, ConfigError, LayoutError
from vit_core.initialization import truncated_normal
from vit_core.layout import (
    BASE_PREFIX,
    DECODER,
    HEADS,
    MASK_TOKEN,
    MASKED_IMAGE_MODELING,
    MIM_KIND,
    TOP_LEVEL,
    ModelKind,
    check_layout,
    expected_shapes,
)
from vit_core.resample import (
    DEFAULT_INTERPOLATION,
    check_interpolation,
    resample_position_embeddings,
)

# The keys a masked-image-modeling model has beyond its encoder's.
MIM_HEAD_KEYS = (BASE_PREFIX + MASK_TOKEN, DECODER + "0.weight", DECODER + "0.bias")


def select_model_type(
    tensors: dict[str, np.ndarray],
    kind: ModelKind,
    model_type: str,
    source: Path,
    init_decoder: bool = False,
) -> tuple[dict[str, np.ndarray], ModelKind]:
    """Narrow a classification or masked-image-modeling checkpoint to its encoder when a
    base model is asked for; refuse a model whose head the checkpoint lacks (a new one is
    asked for by name: `num_labels=`, `init_decoder=`)."""
    if model_type == "classification" and not kind.classifier:
        if kind.decoder:
            raise CheckpointError(
                f"{source}: is a masked-image-modeling checkpoint (a `decoder.*` and a mask "
                "token, no classifier); load it with num_labels=N for a new classifier on "
                "its encoder, or with model_type='base' or 'masked-image-modeling'"
            )
        raise CheckpointError(
            f"{source}: has no classifier head (keys have no `vit.` prefix); "
            "load it with model_type='base', or convert a classification checkpoint"
        )
    if model_type == MASKED_IMAGE_MODELING and not kind.decoder and not init_decoder:
        missing = sorted(set(MIM_HEAD_KEYS) - set(tensors))
        raise CheckpointError(
            f"{source}: has no masked-image-modeling decoder (it is a {kind.architecture}; "
            f"missing: {', '.join(missing)}); load it with init_decoder=True to start one "
            "(a zero mask token and a decoder drawn from seed=, the encoder kept, any "
            "pooler or classifier dropped), or with model_type='base'"
        )
    if model_type == "base" and (kind.classifier or kind.decoder):
        return encoder_of(tensors, kind)
    return tensors, kind


def encoder_of(
    tensors: dict[str, np.ndarray], kind: ModelKind
) -> tuple[dict[str, np.ndarray], ModelKind]:
    """The encoder's tensors alone, as a base model holds them: the `vit.` prefix
    stripped, the classifiers, the masked-image-modeling decoder and the mask token
    dropped, a pooler kept."""
    prefix = kind.prefix
    encoder = {
        k[len(prefix) :]: v
        for k, v in tensors.items()
        if k.startswith(prefix) and not k.startswith(TOP_LEVEL) and k != prefix + MASK_TOKEN
    }
    return encoder, ModelKind(classifier=False, pooler=kind.pooler)


def new_decoder(
    tensors: dict[str, np.ndarray], config: ViTConfig, kind: ModelKind, seed: int, source: str
) -> tuple[dict[str, np.ndarray], ModelKind]:
    """Canonical tensors of a masked-image-modeling model made from any checkpoint's
    encoder (checked first): a zero mask token (transformers' start) and a fresh decoder,
    truncated normal(initializer_range) weights and a zero bias drawn from `seed`; a
    pooler, classifiers and an old decoder are dropped. SimMIM pre-training from a ViT,
    the example transformers documents, asked for by name here (`init_decoder=True`)."""
    encoder, encoder_kind = encoder_of(tensors, kind)
    check_layout_with_hint(encoder, config, encoder_kind, source)
    kept = {BASE_PREFIX + k: v for k, v in encoder.items() if not k.startswith("pooler.")}
    dtype = kept[BASE_PREFIX + "embeddings.position_embeddings"].dtype
    shapes = expected_shapes(config, MIM_KIND)
    mask_token, weight, bias = MIM_HEAD_KEYS
    rng = np.random.default_rng(seed)
    kept[mask_token] = np.zeros(shapes[mask_token], dtype)
    drawn = truncated_normal(rng, shapes[weight], config.initializer_range)
    kept[weight] = drawn.astype(dtype)
    kept[bias] = np.zeros(shapes[bias], dtype)
    return kept, MIM_KIND


def resize_for_image_size(
    tensors: dict[str, np.ndarray],
    config: ViTConfig,
    kind: ModelKind,
    image_size: int | tuple[int, int],
    interpolation: str = DEFAULT_INTERPOLATION,
) -> tuple[dict[str, np.ndarray], ViTConfig]:
    """Canonical tensors and config for another input size: the position grid resampled.

    The patch size is part of the trained weights and cannot change, so the new size
    must be a multiple of it (`ConfigError` otherwise, from the new config's validation).
    """
    check_interpolation(interpolation)
    if isinstance(image_size, list | tuple):
        image_size = tuple(int(v) for v in image_size)  # type: ignore[assignment]
    try:
        resized = dataclasses.replace(config, image_size=image_size)
    except ConfigError as exc:
        raise ConfigError(
            f"cannot load at image_size={image_size}: {exc} "
            f"(the patch size {config.patch_hw} is fixed by the trained weights)"
        ) from None
    if resized.grid_hw == config.grid_hw:
        return tensors, resized
    key = kind.prefix + "embeddings.position_embeddings"
    table = resample_position_embeddings(
        tensors[key], config.grid_hw, resized.grid_hw, config.num_position_prefix, interpolation
    )
    return {**tensors, key: table}, resized


def replace_head(
    tensors: dict[str, np.ndarray],
    config: ViTConfig,
    kind: ModelKind,
    num_labels: int,
    id2label: Mapping[int, str] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], ViTConfig, ModelKind]:
    """Canonical tensors, config and kind with a fresh classifier for `num_labels` classes.

    Every other weight is kept. The new head is truncated normal(initializer_range) with
    a zero bias, drawn from `seed`. A base-model checkpoint (no head) gains one: its keys
    take the `vit.` prefix, and an unused pooler is dropped; a masked-image-modeling one
    (the SimMIM pre-training) loses its decoder and mask token first.
    """
    labels: dict[str, Any] = {"num_labels": num_labels, "id2label": None, "label2id": None}
    if id2label is not None:
        labels.update(num_labels=None, id2label=dict(id2label))
        if len(id2label) != num_labels:
            raise ConfigError(
                f"num_labels={num_labels} but id2label has {len(id2label)} entries; "
                "give one of them, or make them agree"
            )
    new_config = dataclasses.replace(config, **labels)
    if kind.decoder or kind.mask_token:  # fine-tuning after masked image modeling
        tensors, kind = encoder_of(tensors, kind)
    kept = {k: v for k, v in tensors.items() if not k.startswith(HEADS)}
    if kind.classifier:
        new_kind = kind
    else:  # the classification twin has a pooler only when its classifier reads it
        new_kind = ModelKind(classifier=True, pooler=config.classifier_uses_pooler)
        kept = {
            BASE_PREFIX + k: v
            for k, v in kept.items()
            if new_kind.pooler or not k.startswith("pooler.")
        }
    if num_labels > 0:
        dtype = kept[BASE_PREFIX + "embeddings.position_embeddings"].dtype
        rng = np.random.default_rng(seed)
        heads = HEADS if config.use_distillation_token else HEADS[:1]
        for head in heads:  # DeiT: the distillation head is new too
            weight = truncated_normal(
                rng, (num_labels, config.hidden_size), config.initializer_range
            )
            kept[head + "weight"] = weight.astype(dtype)
            kept[head + "bias"] = np.zeros(num_labels, dtype)
    return kept, new_config, new_kind


def check_depth(tensors: Mapping[str, np.ndarray], config: ViTConfig, source: Path) -> None:
    """Fail fast on a config whose depth the file cannot hold (each layer is >= 10 tensors),
    before a hostile `num_hidden_layers` makes the layout check enumerate billions of keys."""
    if config.num_hidden_layers * 10 > len(tensors):
        raise LayoutError(
            f"{source}: config.json says num_hidden_layers={config.num_hidden_layers}, but the "
            f"file holds only {len(tensors)} tensors (each layer has at least 10); the config "
            "does not belong to these weights: use the config.json saved with them"
        )


# Key shapes of other layouts, to say what a mixed or unconverted file holds.
_FOREIGN_LAYOUTS = (
    (
        r"^(module\.)?(blocks\.\d+\.|patch_embed\.|pos_embed$|cls_token$|head\.(weight|bias)$|norm\.)",
        "timm",
    ),
    (r"(^|/)(Transformer|encoderblock_\d+|embedding|head)(/|$)", "original JAX / big_vision"),
    (r"^(module|model)\.(vit\.|embeddings\.|encoder\.)", "a wrapped (DDP or Lightning) state dict"),
    (r"\.(kernel|scale)$", "Flax"),
)


def _foreign_hint(keys: set[str]) -> str:
    """' N of the unexpected keys look like timm's layout (e.g. ...)' or ''."""
    for pattern, name in _FOREIGN_LAYOUTS:
        hits = sorted(k for k in keys if re.search(pattern, k))
        if hits:
            return (
                f" | {len(hits)} of the unexpected keys look like {name} keys (e.g. {hits[0]}): "
                f"this file is not in the canonical layout, or mixes layouts; {CONVERT_HINT}"
            )
    return ""


def check_layout_with_hint(
    tensors: Mapping[str, np.ndarray], config: ViTConfig, kind: ModelKind, source: str
) -> None:
    """`check_layout`, with the next step: `num_labels=` when only the classifier
    disagrees, conversion when keys of another layout are present, else the config."""
    try:
        check_layout(tensors, config, kind, source)
    except LayoutError as exc:
        message = str(exc)
        expected = expected_shapes(config, kind)
        unexpected = set(tensors) - set(expected)
        wrong = (set(expected) ^ set(tensors)) | {
            k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]
        }
        if all(k.startswith(HEADS) for k in wrong):
            raise LayoutError(
                f"{message} | to train a new head instead, load with num_labels=N "
                "(the classifier is then re-initialised, every other weight kept)"
            ) from None
        hint = _foreign_hint(unexpected) or (
            " | next step: check that config.json belongs to these weights "
            "(`python -m vit_core info FOLDER` shows both side by side)"
        )
        raise LayoutError(message + hint) from None


def checked_new_head(
    tensors: dict[str, np.ndarray],
    config: ViTConfig,
    kind: ModelKind,
    num_labels: int,
    id2label: Mapping[int, str] | None,
    seed: int,
    source: str,
) -> tuple[dict[str, np.ndarray], ViTConfig, ModelKind]:
    """`replace_head` after checking everything but the old head (which is discarded)."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 0:
        raise ConfigError(f"num_labels must be an int >= 0; got {num_labels!r}")
    # The old head may have any size (that is the point), but the rest must fit the config.
    encoder = {k: v for k, v in tensors.items() if not k.startswith(HEADS)}
    no_labels: dict[str, Any] = {"num_labels": 0, "id2label": None, "label2id": None}
    encoder_config = dataclasses.replace(config, **no_labels)
    check_layout(encoder, encoder_config, kind, source)
    return replace_head(tensors, config, kind, num_labels, id2label, seed)
