"""Model names in every ecosystem's spelling resolve to the right architecture and numerics.

timm's names come from vit_core/timm_names.json (scripts/generate_timm_names.py); where
timm is installed, a sample of rows is rebuilt from timm and compared with the file, and
every pretrained tag timm lists is checked to resolve or to be refused by name.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vit_core import ConfigError, ViTConfig, list_models
from vit_core.names import family, name_fields, name_source, refused_models, timm_version

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "vit_core" / "timm_names.json"


@pytest.mark.parametrize(
    ("name", "width", "depth", "patch", "image", "labels", "eps", "act"),
    [
        ("vit-base-patch16-224", 768, 12, 16, 224, 2, 1e-12, "gelu"),
        ("vit-huge-patch14-224-in21k", 1280, 32, 14, 224, 0, 1e-12, "gelu"),
        ("vit_base_patch16_224", 768, 12, 16, 224, 1000, 1e-6, "gelu"),
        ("vit_large_patch32_384.augreg_in21k", 1024, 24, 32, 384, 21843, 1e-6, "gelu"),
        ("vit_small_patch16_224.augreg2_in21k_ft_in1k", 384, 12, 16, 224, 1000, 1e-6, "gelu"),
        ("vit_base_patch16_224.orig_in21k", 768, 12, 16, 224, 0, 1e-6, "gelu"),
        ("vit_tiny_patch8_96", 192, 12, 8, 96, 1000, 1e-6, "gelu"),  # not timm's: by pattern
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


# What timm builds for these names (timm 1.0.31), field by field.
TIMM_CASES: dict[str, dict[str, Any]] = {
    "vit_base_patch16_clip_224.openai": {
        "layer_norm_eps": 1e-5, "hidden_act": "gelu", "use_pre_norm": True,
        "patch_embedding_bias": False, "num_labels": 512, "pooling_type": "cls",
    },
    "vit_base_patch16_clip_quickgelu_224.openai": {
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "use_pre_norm": True,
    },
    "vit_so400m_patch14_siglip_384.webli": {
        "hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16,
        "intermediate_size": 4304, "image_size": 378, "patch_size": 14, "pooling_type": "map",
        "use_class_token": False, "num_labels": 0, "hidden_act": "gelu",
    },
    "vit_base_patch16_siglip_gap_224.webli": {"pooling_type": "mean", "use_fc_norm": False},
    "vit_large_patch16_siglip_512.v2_webli": {"hidden_act": "gelu_pytorch_tanh"},
    "vit_small_patch14_dinov2.lvd142m": {
        "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
        "image_size": 518, "patch_size": 14, "layerscale_value": 1e-5, "num_labels": 0,
        "no_embed_class": False,
    },
    "vit_giant_patch14_dinov2.lvd142m": {
        "use_swiglu_ffn": True, "hidden_act": "silu", "intermediate_size": 4096,
        "hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24,
    },
    "vit_base_patch14_reg4_dinov2.lvd142m": {
        "num_register_tokens": 4, "no_embed_class": True, "layerscale_value": 1e-5,
    },
    "vit_betwixt_patch16_reg4_gap_256.sbb_in1k": {
        "num_register_tokens": 4, "use_class_token": False, "pooling_type": "mean",
        "use_fc_norm": True, "use_final_norm": True, "hidden_size": 640, "num_labels": 1000,
    },
    "deit_base_distilled_patch16_224.fb_in1k": {
        "use_distillation_token": True, "num_labels": 1000, "layerscale_value": None,
    },
    "deit_tiny_patch16_224.fb_in1k": {"hidden_size": 192, "num_attention_heads": 3},
    "deit3_base_patch16_224.fb_in22k_ft_in1k": {
        "layerscale_value": 1e-6, "no_embed_class": True, "num_labels": 1000,
    },
    "vit_base_patch16_224.mae": {"num_labels": 0, "layer_norm_eps": 1e-6},
    "vit_medium_patch16_gap_256.sw_in12k_ft_in1k": {
        "use_class_token": False, "pooling_type": "mean", "use_fc_norm": False,
        "qkv_bias": False, "layerscale_value": 1e-6,
    },
    "vit_huge_patch16_radio_v4.c_radio": {"use_final_norm": False, "num_register_tokens": 9},
    "vit_base_patch16_224_miil.in21k": {"qkv_bias": False, "num_labels": 11221},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TIMM_CASES))
def test_timm_names_give_each_family_its_switches(name: str) -> None:
    fields = name_fields(name)
    assert {k: fields[k] for k in TIMM_CASES[name]} == TIMM_CASES[name]
    assert fields["encoder_stride"] == fields["patch_size"]


def test_a_bare_timm_architecture_is_its_default_tag() -> None:
    assert name_fields("vit_small_patch14_dinov2") == name_fields(
        "vit_small_patch14_dinov2.lvd142m"
    )
    assert name_fields("deit3_small_patch16_384")["layerscale_value"] == 1e-6


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("aimv2_large_patch14_224", r"aimv2_large_patch14_224: RMSNorm \+ SwiGLU with separate"),
        ("aimv2_large_patch14_224.apple_pt", r"\(AIMv2\) is not supported"),
        ("beit3_base_patch16_224.in22k_ft_in1k", "LayerNorms inside attention and MLP"),
        ("vit_base_patch16_rpn_224.sw_in1k", "post-norm residual blocks"),
        ("vit_pwee_patch16_reg1_gap_256.sbb_in1k", "parallel attention and MLP"),
        ("vit_dwee_patch16_reg1_gap_256.sbb_in1k", "differential attention"),
        ("test_vit3.r160_in1k", "pooling that reads the prefix tokens too"),
    ],
)
def test_timm_names_this_package_cannot_run_are_refused_with_the_reason(
    name: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        name_fields(name)
    assert name in refused_models()
    assert name not in list_models()


def test_in21k_jax_checkpoints_classify_through_pre_logits() -> None:
    assert ViTConfig.from_name("imagenet21k/ViT-B_16").classifier_uses_pooler


def test_every_listed_name_resolves() -> None:
    names = list_models()
    assert len(names) == len(set(names)) > 700
    for name in names:
        ViTConfig.from_name(name)


def test_overrides_win() -> None:
    assert ViTConfig.from_name("B/16", num_labels=10, image_size=384).grid_hw == (24, 24)
    assert ViTConfig.from_name("vit_small_patch14_dinov2.lvd142m", num_hidden_layers=2)


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("vit-base-patch16-224", "hub"),
        ("vit_base_patch16_clip_224.openai", "timm"),
        ("vit_tiny_patch8_96", "timm"),
        ("ViT-B_16", "jax"),
        ("B/16", "big_vision"),
    ],
)
def test_name_source(name: str, source: str) -> None:
    assert name_source(name) == source


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("vit_base_patch16_clip_224.openai", "CLIP"),
        ("vit_so400m_patch14_siglip_384.webli", "SigLIP"),
        ("vit_base_patch14_reg4_dinov2.lvd142m", "DINOv2"),
        ("vit_base_patch14_reg1_tipsv2.webli", "registers"),
        ("deit_base_distilled_patch16_224.fb_in1k", "DeiT"),
        ("deit3_base_patch16_224.fb_in1k", "DeiT-3"),
        ("vit_base_patch16_224.mae", "MAE"),
        ("vit_medium_patch16_gap_256.sw_in12k_ft_in1k", "gap"),
        ("vit_base_patch16_224.augreg2_in21k_ft_in1k", "plain"),
        ("eva_large_patch14_196.in22k_ft_in1k", "other"),
    ],
)
def test_family_labels(name: str, label: str) -> None:
    assert family(name) == label


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("vit_base_patch16_224.dinov2", "unknown timm tag 'dinov2'.*timm's tags for"),
        ("vit_giant_patch14_225", "valid names"),
        ("deit_base_patch16_225", "valid names"),
        ("X/16", "valid names"),
    ],
)
def test_unknown_names(name: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        name_fields(name)


def test_timm_names_resolve_without_timm_or_a_framework() -> None:
    probe = (
        "import sys, vit_core.names as n; n.name_fields('vit_base_patch16_clip_224.openai'); "
        "print(sorted(m for m in ('timm', 'torch', 'jax') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "[]"


def test_the_table_is_sorted_and_one_entry_a_line() -> None:
    text = TABLE.read_text()
    table = json.loads(text)
    for section in ("architectures", "tags"):
        assert list(table[section]) == sorted(table[section])
    assert len(text.splitlines()) == len(table["architectures"]) + len(table["tags"]) + 8


# ------------------------------------------------------------------ against timm
def _generator() -> Any:
    script = ROOT / "scripts" / "generate_timm_names.py"
    spec = importlib.util.spec_from_file_location("generate_timm_names", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def timm() -> Any:
    timm = pytest.importorskip("timm")
    assert timm.__version__ == timm_version(), (
        f"vit_core/timm_names.json was read from timm {timm_version()}, timm "
        f"{timm.__version__} is installed: run scripts/generate_timm_names.py"
    )
    return timm


SAMPLE = (
    *TIMM_CASES,
    "aimv2_large_patch14_224.apple_pt",
    "vit_base_patch16_rpn_224.sw_in1k",
    "vit_so150m2_patch16_reg1_gap_256.sbb_e200_in12k",
    "vit_base_patch16_clip_224.laion2b_ft_in12k",
    "flexivit_base.1200ep_in1k",
    "vit_intern300m_patch14_448.ogvl_dist",
    "test_vit3.r160_in1k",
)


def test_the_table_equals_what_timm_builds(timm: Any) -> None:
    """A sample of rows rebuilt from timm now equals the file (every family above, and
    one tag that differs from its architecture)."""
    generator = _generator()
    table = json.loads(TABLE.read_text())
    fresh = generator.generate(SAMPLE)
    for arch, row in fresh["architectures"].items():
        assert table["architectures"][arch] == row, arch
    for tag, row in fresh["tags"].items():
        assert table["tags"][tag] == row, tag
    assert set(fresh["tags"]) == set(SAMPLE) - {n for n in SAMPLE if "." not in n}


def test_every_pretrained_timm_tag_resolves_or_is_refused_by_name(timm: Any) -> None:
    modules = ("vision_transformer", "deit")
    tags = sorted({t for m in modules for t in timm.list_models(module=m, pretrained=True)})
    assert len(tags) >= 333
    table = json.loads(TABLE.read_text())
    assert sorted(table["tags"]) == tags, "run scripts/generate_timm_names.py"
    refused = refused_models()
    for tag in tags:
        if tag in refused:
            with pytest.raises(ConfigError, match=f"^{tag}: .* is not supported"):
                name_fields(tag)
        else:
            config = ViTConfig.from_name(tag)
            assert config.num_labels == timm.models.get_pretrained_cfg(tag).num_classes, tag
