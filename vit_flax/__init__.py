"""ViT in Flax, loading the canonical folder of `vit_core` (twin of `vit_torch`)."""

from vit_flax.modeling import (
    FlaxViTForImageClassification,
    FlaxViTForMaskedImageModeling,
    FlaxViTModel,
)

__all__ = ["FlaxViTForImageClassification", "FlaxViTForMaskedImageModeling", "FlaxViTModel"]
