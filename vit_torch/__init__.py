"""ViT in PyTorch, loading the canonical folder of `vit_core` (twin of `vit_flax`)."""

from vit_torch.modeling import ViTForImageClassification, ViTForMaskedImageModeling, ViTModel

__all__ = ["ViTForImageClassification", "ViTForMaskedImageModeling", "ViTModel"]
