"""timm's ViT families -> canonical folder: the real timm models, by name, are the oracle.

Each case builds a registered timm model (`timm.create_model(name, pretrained=False)` with
small sizes), perturbs every tensor with seeded noise (LayerScale set well away from its
init), saves the state dict, converts it with `--verify` (both twins and timm itself on a
probe batch) and then compares both backends with timm directly: logits, every token
after the final norm (`forward_features` = `last_hidden_state`) and the image embedding
(`forward_head(pre_logits=True)` = `pooler_output`), all float32 <= 1e-5. The families
the canonical layout cannot express must be refused with a message that names them.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from timm_models import HEADS, family_model, save

import vit_core
from conversion import convert
from vit_core import CheckpointError, ConfigError
from vit_core.backend import BACKENDS, get_backend
from vit_core.layout import WEIGHTS_NAME

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

# case: (timm model name, create_model overrides, hints (--set), config fields expected;
# `float` means "some number")
FAMILIES: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "dinov2-reg4": (
        "vit_small_patch14_reg4_dinov2", {"img_size": 56, "num_classes": 0}, {},
        {"num_register_tokens": 4, "no_embed_class": True, "layerscale_value": float,
         "use_class_token": True, "pooling_type": "cls"},
    ),
    "dinov2-head": (
        "vit_small_patch14_dinov2", {"img_size": 42, "num_classes": 5}, {},
        {"num_register_tokens": 0, "no_embed_class": False, "layerscale_value": float},
    ),
    "deit-distilled": (
        "deit_tiny_distilled_patch16_224", {"img_size": 32, "num_classes": 5}, {},
        {"use_distillation_token": True, "pooling_type": "cls", "no_embed_class": False},
    ),
    "deit-distilled-headless": (
        "deit_small_distilled_patch16_224", {"img_size": 32, "num_classes": 0}, {},
        {"use_distillation_token": True, "num_labels": 0},
    ),
    "deit3": (
        "deit3_small_patch16_224", {"img_size": 32, "num_classes": 5}, {},
        {"no_embed_class": True, "layerscale_value": float, "use_class_token": True},
    ),
    "clip-quickgelu": (
        "vit_base_patch16_clip_quickgelu_224", {"img_size": 32, "num_classes": 0},
        {"layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"},
        {"use_pre_norm": True, "patch_embedding_bias": False, "layer_norm_eps": 1e-5,
         "hidden_act": "quick_gelu"},
    ),
    "clip-head": (
        "vit_base_patch16_clip_224", {"img_size": 48, "num_classes": 5},
        {"layer_norm_eps": 1e-5},
        {"use_pre_norm": True, "patch_embedding_bias": False, "hidden_act": "gelu"},
    ),
    "siglip-map": (
        "vit_base_patch16_siglip_224", {"img_size": 32, "num_classes": 5}, {},
        {"pooling_type": "map", "use_class_token": False},
    ),
    "map-with-registers": (  # the pool reads the patch tokens only, registers excluded
        "vit_so150m_patch16_reg4_map_256", {"img_size": 32, "num_classes": 5}, {},
        {"pooling_type": "map", "use_class_token": False, "num_register_tokens": 4},
    ),
    "siglip-map-headless": (
        "vit_base_patch16_siglip_256", {"img_size": 48, "num_classes": 0}, {},
        {"pooling_type": "map", "use_class_token": False, "num_labels": 0},
    ),
    "gap-norm": (  # norm on every token, then the mean (fc_norm=False), no qkv bias
        "vit_medium_patch16_gap_256", {"img_size": 32, "num_classes": 5}, {},
        {"pooling_type": "mean", "use_fc_norm": False, "qkv_bias": False,
         "layerscale_value": float},
    ),
    "gap-fc_norm": (  # the mean, then fc_norm
        "vit_small_patch16_224",
        {"img_size": 32, "num_classes": 5, "class_token": False, "global_pool": "avg"}, {},
        {"pooling_type": "mean", "use_fc_norm": True, "use_class_token": False},
    ),
    "cls-avg-fc_norm": (  # a class token that the average pool leaves out (MAE fine-tunes)
        "vit_base_patch16_224", {"img_size": 32, "num_classes": 5, "global_pool": "avg"}, {},
        {"pooling_type": "mean", "use_fc_norm": True, "use_class_token": True},
    ),
    "reg-gap": (
        "vit_medium_patch16_reg4_gap_256", {"img_size": 32, "num_classes": 5}, {},
        {"num_register_tokens": 4, "use_class_token": False, "pooling_type": "mean",
         "use_fc_norm": True, "no_embed_class": True},
    ),
    "no-final-norm": (  # RADIO: class + 7 registers, no_embed_class, no final norm
        "vit_base_patch16_radio_v3", {"img_size": 32, "num_classes": 0}, {},
        {"use_final_norm": False, "num_register_tokens": 7, "no_embed_class": True},
    ),
    "no-final-norm-head": (
        "vit_intern300m_patch14_448", {"img_size": 28, "num_classes": 5}, {},
        {"use_final_norm": False, "use_fc_norm": False, "layerscale_value": float},
    ),
    "swiglu-giant": (  # SwiGLUPacked: fc1 (2I, D); mlp_ratio 4 keeps fc1's width even
        "vit_giant_patch14_dinov2", {"img_size": 28, "num_classes": 5, "mlp_ratio": 4}, {},
        {"use_swiglu_ffn": True, "hidden_act": "silu", "intermediate_size": 128},
    ),
    "swiglu-giant-reg4": (
        "vit_giant_patch14_reg4_dinov2", {"img_size": 28, "num_classes": 0, "mlp_ratio": 4},
        {}, {"use_swiglu_ffn": True, "num_register_tokens": 4, "no_embed_class": True},
    ),
}  # fmt: skip


def timm_outputs(model: Any, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """What the converted folder must give: last_hidden_state, pooler_output (not for DeiT
    distilled: timm's pre_logits is the mean of two tokens), logits (and each DeiT head)."""
    distilled = hasattr(model, "dist_token")
    with torch.inference_mode():
        features = model.forward_features(torch.from_numpy(pixels))
        out = {"last_hidden_state": features}
        if not distilled:
            out["pooler_output"] = model.forward_head(features, pre_logits=True)
        if model.num_classes:
            out["logits"] = model.forward_head(features)
            if distilled:
                out["cls_logits"] = model.head(features[:, 0])
                out["distillation_logits"] = model.head_dist(features[:, 1])
    return {k: v.numpy() for k, v in out.items()}


def twin_outputs(folder: Path, backend: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Both models of a folder on `pixels`: the encoder's outputs and every classifier
    output (logits, and a distilled model's two heads)."""
    twin = get_backend(backend)
    out = twin.run(vit_core.load(folder, backend, dtype="float32"), pixels)
    if "logits" not in out:  # a base model
        return out
    base = twin.run(vit_core.load(folder, backend, dtype="float32", model_type="base"), pixels)
    return {**{k: v for k, v in out.items() if k.endswith("logits")}, **base}


def assert_matches(oracle: Any, model: Any, folder: Path, case: str) -> None:
    config = vit_core.ViTConfig.from_pretrained(folder)
    pixels = oracle.pixels(config, seed=len(case))
    want = timm_outputs(model, pixels)
    for backend in BACKENDS:
        got = twin_outputs(folder, backend, pixels)
        for field, value in want.items():
            oracle.assert_close(got[field], value, f"timm {case}: {backend} {field}")
        if not model.num_classes:
            assert "logits" not in got


def tensors_of(folder: Path) -> dict[str, np.ndarray]:
    with safe_open(folder / WEIGHTS_NAME, framework="np") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


def check_fields(config: vit_core.ViTConfig, expected: dict[str, Any]) -> None:
    for field, value in expected.items():
        got = getattr(config, field)
        if value is float:
            assert isinstance(got, float), f"{field}: {got!r}"
        else:
            assert got == value, f"{field}: {got!r} != {value!r}"


# ------------------------------------------------------------------- families
@pytest.mark.parametrize("case", FAMILIES, ids=list(FAMILIES))
def test_family_matches_timm(oracle: Any, tmp_path: Path, case: str) -> None:
    name, overrides, hints, expected = FAMILIES[case]
    model = family_model(oracle, name, seed=len(case), **overrides)
    suffix = ".safetensors" if len(case) % 2 else ".pth"
    source = save(model, tmp_path / f"{case}{suffix}")
    result = convert(
        source,
        tmp_path / "out",
        overrides={"num_attention_heads": HEADS, **hints},
        verify=True,
        progress=False,
    )
    check_fields(result.config, expected)
    assert result.kind.classifier == bool(model.num_classes)
    report = result.verification
    assert report.ok, report.format()
    against_timm = {c.output for c in report.comparisons if c.left == "timm"}
    assert "last_hidden_state" in against_timm, report.format()  # timm ran, not skipped
    assert ("logits" in against_timm) == bool(model.num_classes)
    assert_matches(oracle, model, tmp_path / "out", case)


# A timm hub folder as save_for_hf writes it: the architecture name gives the numerics
# and LayerScale init, model_args the heads and image size, global_pool the pooling.
HUB = {
    "dinov2-reg4": {"layer_norm_eps": 1e-6, "hidden_act": "gelu", "layerscale_value": 1e-5},
    "clip-quickgelu": {"layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"},
    "deit3": {"layerscale_value": 1e-6},
    "siglip-map": {"pooling_type": "map"},
    "cls-avg-fc_norm": {"pooling_type": "mean"},
    "swiglu-giant": {"hidden_act": "silu"},
}


@pytest.mark.parametrize("case", HUB, ids=list(HUB))
def test_timm_hub_folder(oracle: Any, tmp_path: Path, case: str) -> None:
    from timm.models._hub import save_config_for_hf

    name, overrides, _, expected = FAMILIES[case]
    model = family_model(oracle, name, seed=7 + len(case), **overrides)
    folder = tmp_path / "hub"
    folder.mkdir()
    save(model, folder / "model.safetensors")
    save_config_for_hf(model, str(folder / "config.json"))
    assert json.loads((folder / "config.json").read_text())["architecture"] == name
    result = convert(folder, tmp_path / "out", progress=False)  # no hints: the folder says
    check_fields(result.config, {**expected, **HUB[case]})
    assert not any(n.startswith(("layer_norm_eps", "num_attention_heads")) for n in result.assumed)
    assert_matches(oracle, model, tmp_path / "out", f"hub {case}")


def test_state_dict_numerics_are_stated(oracle: Any, tmp_path: Path) -> None:
    """A CLIP state dict without hints: timm's defaults, and a note naming CLIP's values."""
    name, overrides, _, _ = FAMILIES["clip-quickgelu"]
    source = save(family_model(oracle, name, seed=1, **overrides), tmp_path / "clip.pth")
    result = convert(source, tmp_path / "a", overrides={"num_attention_heads": 4}, progress=False)
    assert (result.config.layer_norm_eps, result.config.hidden_act) == (1e-6, "gelu")
    assert any("CLIP" in n and "quick_gelu" in n for n in result.assumed), result.assumed
    hints = {"num_attention_heads": 4, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
    result = convert(source, tmp_path / "b", overrides=hints, progress=False)
    assert not any("layer_norm_eps" in n for n in result.assumed)


def test_keys_fix_the_switches(oracle: Any, tmp_path: Path) -> None:
    """A hint that contradicts what the keys say is an error, never a broken model."""
    name, overrides, _, _ = FAMILIES["dinov2-reg4"]
    source = save(family_model(oracle, name, seed=2, **overrides), tmp_path / "d.pth")
    for field, value, said in (
        ("no_embed_class", False, "True"),
        ("num_register_tokens", 0, "4"),
        ("use_pre_norm", True, "False"),
        ("layerscale_value", None, "1e-05"),
    ):
        with pytest.raises(ConfigError, match=f"{field}={value!r}, but the weights say {said}"):
            convert(source, tmp_path / "out", overrides={"num_attention_heads": 4, field: value})
    name, overrides, _, _ = FAMILIES["siglip-map"]
    source = save(family_model(oracle, name, seed=3, **overrides), tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match=r"attention pool .* said to be 'mean'"):
        convert(
            source, tmp_path / "out", overrides={"num_attention_heads": 4, "pooling_type": "mean"}
        )
    assert not (tmp_path / "out").exists()


def test_deit3_original_layer_scale_names(oracle: Any, tmp_path: Path) -> None:
    """facebookresearch/deit's DeiT-3 files name layer scale `gamma_1`/`gamma_2`."""
    name, overrides, _, _ = FAMILIES["deit3"]
    model = family_model(oracle, name, seed=4, **overrides)
    state = model.state_dict()
    renamed = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in state.items()}
    assert any(k.endswith("gamma_1") for k in renamed)
    torch.save(state, tmp_path / "timm.pth")
    torch.save(renamed, tmp_path / "orig.pth")
    hints = {"num_attention_heads": HEADS}
    convert(tmp_path / "timm.pth", tmp_path / "a", overrides=hints, progress=False)
    result = convert(tmp_path / "orig.pth", tmp_path / "b", overrides=hints, verify=True)
    assert result.verification.ok, result.verification.format()
    a, b = tensors_of(tmp_path / "a"), tensors_of(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_map_head_keys(oracle: Any, tmp_path: Path) -> None:
    """attn_pool -> head.*: the in-projection is q's rows, then kv's (k, then v)."""
    name, overrides, _, _ = FAMILIES["siglip-map"]
    model = family_model(oracle, name, seed=5, **overrides)
    source = save(model, tmp_path / "s.safetensors")
    convert(source, tmp_path / "out", overrides={"num_attention_heads": HEADS}, progress=False)
    got = tensors_of(tmp_path / "out")
    pool = {k: v.detach().numpy() for k, v in model.attn_pool.state_dict().items()}
    np.testing.assert_array_equal(got["vit.head.probe"], pool["latent"])
    fused = got["vit.head.attention.in_proj_weight"]
    np.testing.assert_array_equal(fused, np.concatenate([pool["q.weight"], pool["kv.weight"]]))
    np.testing.assert_array_equal(fused[64:128], pool["kv.weight"][:64])  # rows D:2D: the key
    np.testing.assert_array_equal(got["vit.head.attention.out_proj.weight"], pool["proj.weight"])
    np.testing.assert_array_equal(got["vit.head.layernorm.bias"], pool["norm.bias"])
    np.testing.assert_array_equal(got["vit.head.mlp.fc2.weight"], pool["mlp.fc2.weight"])
    assert "classifier.weight" in got and not any(k.startswith("vit.attn_pool") for k in got)


def test_attention_pool_without_query_projection(oracle: Any, tmp_path: Path) -> None:
    """AttentionPoolLatent(q_proj=False): the latent is the query; an identity is exact."""
    from timm.layers import AttentionPoolLatent, LayerNorm

    name, overrides, _, _ = FAMILIES["siglip-map"]
    model = family_model(oracle, name, seed=6, **overrides)
    torch.manual_seed(6)
    norm = functools.partial(LayerNorm, eps=1e-6)
    model.attn_pool = AttentionPoolLatent(64, num_heads=HEADS, norm_layer=norm, q_proj=False)
    oracle.perturb_torch(model.attn_pool, 6)
    assert "attn_pool.q.weight" not in model.state_dict()
    source = save(model, tmp_path / "noq.pth")
    result = convert(
        source, tmp_path / "out", overrides={"num_attention_heads": HEADS}, verify=True
    )
    assert result.verification.ok, result.verification.format()
    assert_matches(oracle, model, tmp_path / "out", "map-no-q-proj")


def test_resampled_positions_of_a_register_model(oracle: Any, tmp_path: Path) -> None:
    """--image-size on a no_embed_class table: only patch rows, timm's own resampling."""
    from timm.layers import resample_abs_pos_embed

    name, overrides, _, _ = FAMILIES["dinov2-reg4"]
    model = family_model(oracle, name, seed=8, **overrides)
    source = save(model, tmp_path / "d.pth")
    result = convert(
        source,
        tmp_path / "out",
        overrides={"num_attention_heads": HEADS},
        image_size="84",
        progress=False,
    )
    assert result.config.image_hw == (84, 84)
    expected = resample_abs_pos_embed(model.pos_embed.detach(), (6, 6), (4, 4), num_prefix_tokens=0)
    got = tensors_of(tmp_path / "out")["embeddings.position_embeddings"]
    oracle.assert_close(got, expected, "timm resample_abs_pos_embed, registers", atol=1e-5)


# ------------------------------------------------------------------- refusals
def _pool_variant(oracle: Any, **pool: Any) -> Any:
    from timm.layers import AttentionPoolLatent

    model = family_model(oracle, "vit_base_patch16_siglip_224", seed=9, img_size=32)
    model.attn_pool = AttentionPoolLatent(64, num_heads=HEADS, **pool)
    return model.state_dict()


def _refused_state(kind: str, oracle: Any) -> dict[str, torch.Tensor]:
    small = {"img_size": 32}
    builders = {
        "qk-norm": lambda: family_model(oracle, "vit_small_patch16_224", 1, qk_norm=True, **small),
        "res-post-block": lambda: family_model(oracle, "vit_base_patch16_rpn_224", 1, **small),
        "parallel": lambda: family_model(oracle, "vit_small_patch16_18x2_224", 1, **small),
        "parallel-scaling": lambda: family_model(oracle, "vit_base_patch16_xp_224", 1, **small),
        "beit3-scale-norms": lambda: family_model(oracle, "beit3_base_patch16_224", 1, **small),
        "aimv2": lambda: family_model(oracle, "aimv2_large_patch14_224", 1, img_size=28),
        "patch-embed-norm": lambda: family_model(
            oracle, "vit_small_patch16_224", 1, embed_norm_layer="layernorm", **small
        ),
        "hybrid": lambda: family_model(oracle, "vit_small_r26_s32_224", 1, img_size=64),
        "distilled-with-registers": lambda: family_model(
            oracle, "deit_tiny_distilled_patch16_224", 1, reg_tokens=2, **small
        ),
    }
    if kind in builders:
        return builders[kind]().state_dict()
    if kind == "map-latent-len":
        return _pool_variant(oracle, latent_len=2)
    if kind == "map-qk-norm":
        return _pool_variant(oracle, qk_norm=True)
    if kind == "map-pos-embed":
        return _pool_variant(oracle, pos_embed="abs", feat_size=4)
    state = family_model(oracle, "vit_small_patch16_224", 1, **small).state_dict()
    if kind == "rope":
        state["blocks.0.attn.rope.freqs"] = torch.zeros(8)
    elif kind == "norm-and-fc_norm":
        state["fc_norm.weight"], state["fc_norm.bias"] = torch.ones(64), torch.zeros(64)
    elif kind == "mlp-widths":
        state["blocks.0.mlp.fc1.weight"] = torch.zeros(200, 64)
    return state


REFUSED = {
    "qk-norm": r"query/key normalisation",
    "res-post-block": r"ResPostBlock \(the LayerNorm after each residual branch",
    "parallel": r"parallel blocks \(ParallelThingsBlock",
    "parallel-scaling": r"parallel blocks \(ParallelScalingBlock",
    "beit3-scale-norms": r"scale_attn_norm / scale_mlp_norm",
    "aimv2": r"AIMv2-style.*RmsNorm|RmsNorm.*AIMv2",
    "patch-embed-norm": r"LayerNorm inside the patch embedding",
    "hybrid": r"hybrid ResNet-ViT",
    "distilled-with-registers": r"distillation token and register tokens",
    "map-latent-len": r"latent_len=2",
    "map-qk-norm": r"query/key normalisation",
    "map-pos-embed": r"its own position embedding",
    "rope": r"rotary position embeddings",
    "norm-and-fc_norm": r"both a final norm .* and one after pooling",
    "mlp-widths": r"fc1.weight has 200 rows but fc2 reads 256 features",
}


@pytest.mark.parametrize("kind", REFUSED, ids=list(REFUSED))
def test_families_that_cannot_be_expressed_are_refused(
    oracle: Any, tmp_path: Path, kind: str
) -> None:
    source = tmp_path / f"{kind}.pth"
    torch.save(_refused_state(kind, oracle), source)
    with pytest.raises(CheckpointError, match=REFUSED[kind]) as info:
        convert(source, tmp_path / "out", overrides={"num_attention_heads": HEADS}, progress=False)
    assert str(source) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]  # nothing left behind


@pytest.mark.parametrize(
    ("architecture", "config", "match"),
    [
        ("vit_base_patch16_rpn_224", {}, r"ResPostBlock"),  # keys as a plain ViT's
        ("vit_small_patch16_224", {"global_pool": "max"}, r"global_pool='max'"),
        ("vit_small_patch16_224", {"model_args": {"pool_include_prefix": True}}, "prefix"),
    ],
)
def test_refused_by_the_timm_config(
    oracle: Any, tmp_path: Path, architecture: str, config: dict[str, Any], match: str
) -> None:
    """What the keys cannot show, a timm folder's config.json can: refused by name."""
    model = family_model(oracle, architecture, seed=10, img_size=32)
    folder = tmp_path / "hub"
    folder.mkdir()
    save(model, folder / "model.safetensors")  # sorted keys: the block order says nothing
    (folder / "config.json").write_text(json.dumps({"architecture": architecture, **config}))
    with pytest.raises(CheckpointError, match=match):
        convert(folder, tmp_path / "out", overrides={"num_attention_heads": HEADS})
    assert not (tmp_path / "out").exists()
