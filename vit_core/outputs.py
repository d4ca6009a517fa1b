"""Output records shared by both twins, with transformers' field names.

Plain dataclasses so that vit_core needs no framework; the Flax twin registers them
as pytrees so they can leave a `jax.jit`. Like transformers' `ModelOutput`, a record
can be read by attribute, by name, or by position over its non-None fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelOutput:
    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None
        )

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __iter__(self) -> Iterator[str]:
        """Field names that hold a value, as iterating transformers' `ModelOutput` gives."""
        return iter(self.keys())

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class BaseModelOutputWithPooling(ModelOutput):
    """`last_hidden_state` (B, T, D): every token (prefix tokens first) after the final
    LayerNorm; `pooler_output` (B, Dp): the Dense+tanh pooler's output where the model has
    one; without one, None for a transformers ViT config (as transformers returns) and the
    image embedding for the other families (the pooled token, after `fc_norm`, or the MAP
    head; docs/families.md); `hidden_states`: the embeddings (after `pre_layrnorm`) then each
    layer's output, before the final LayerNorm (L + 1 tensors); `attentions`: per layer
    (B, heads, T, T)."""

    last_hidden_state: Any = None
    pooler_output: Any = None
    hidden_states: tuple[Any, ...] | None = None
    attentions: tuple[Any, ...] | None = None


@dataclass
class ImageClassifierOutput(ModelOutput):
    """`loss` only when labels were given; `logits` (B, num_labels). A distilled model
    (DeiT) also returns `cls_logits` and `distillation_logits`, its two heads; `logits` is
    their mean, as transformers' `DeiTForImageClassificationWithTeacher` returns."""

    loss: Any = None
    logits: Any = None
    hidden_states: tuple[Any, ...] | None = None
    attentions: tuple[Any, ...] | None = None
    cls_logits: Any = None
    distillation_logits: Any = None


@dataclass
class MaskedImageModelingOutput(ModelOutput):
    """transformers' record of `ViTForMaskedImageModeling`: `loss` (the L1 reconstruction
    loss over the masked patches) only when `bool_masked_pos` was given; `reconstruction`
    (B, C, H', W'), the decoder's pixels for every patch, masked or not (H' = H and W' = W
    when `encoder_stride` is the patch size); `hidden_states` and `attentions` as the
    encoder's (`BaseModelOutputWithPooling`)."""

    loss: Any = None
    reconstruction: Any = None
    hidden_states: tuple[Any, ...] | None = None
    attentions: tuple[Any, ...] | None = None
