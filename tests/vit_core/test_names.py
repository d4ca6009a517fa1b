"""Model names in every ecosystem's spelling resolve to the right architecture and numerics."""

from __future__ import annotations

import pytest

from vit_core import ConfigError, ViTConfig, list_models
from vit_core.names import name_fields


@pytest.mark.parametrize(
    ("name", "width", "depth", "patch", "image", "labels", "eps", "act"),
    [
        ("vit-base-patch16-224", 768, 12, 16, 224, 2, 1e-12, "gelu"),
        ("vit-huge-patch14-224-in21k", 1280, 32, 14, 224, 0, 1e-12, "gelu"),
        ("vit_base_patch16_224", 768, 12, 16, 224, 1000, 1e-6, "gelu"),
        ("vit_large_patch32_384.augreg_in21k", 1024, 24, 32, 384, 21843, 1e-6, "gelu"),
        ("vit_small_patch16_224.augreg2_in21k_ft_in1k", 384, 12, 16, 224, 1000, 1e-6, "gelu"),
        ("vit_base_patch16_224.orig_in21k", 768, 12, 16, 224, 0, 1e-6, "gelu"),
        ("ViT-B_16", 768, 12, 16, 224, 2, 1e-6, "gelu_pytorch_tanh"),
        ("imagenet21k/ViT-L_32", 1024, 24, 32, 224, 21843, 1e-6, "gelu_pytorch_tanh"),
        ("Ti/16", 192, 12, 16, 224, 2, 1e-6, "gelu_pytorch_tanh"),
        ("S/32", 384, 12, 32, 224, 2, 1e-6, "gelu_pytorch_tanh"),
    ],
)
def test_names_resolve(
    name: str, width: int, depth: int, patch: int, image: int, labels: int, eps: float, act: str
) -> None:
    config = ViTConfig.from_name(name)
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size) == (
        width,
        depth,
        patch,
    )
    assert config.image_hw == (image, image) and config.num_labels == labels
    assert (config.layer_norm_eps, config.hidden_act) == (eps, act)


def test_in21k_jax_checkpoints_classify_through_pre_logits() -> None:
    assert ViTConfig.from_name("imagenet21k/ViT-B_16").classifier_uses_pooler


def test_every_listed_name_resolves() -> None:
    names = list_models()
    assert len(names) == len(set(names)) > 200
    for name in names:
        ViTConfig.from_name(name)


def test_overrides_win() -> None:
    assert ViTConfig.from_name("B/16", num_labels=10, image_size=384).grid_hw == (24, 24)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("vit_base_patch16_224.dinov2", "unknown timm tag 'dinov2'"),
        ("vit_giant_patch14_224", "valid names"),
        ("deit_base_patch16_224", "valid names"),
        ("X/16", "valid names"),
    ],
)
def test_unknown_names(name: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        name_fields(name)
