"""timm checkpoints -> canonical folder: real timm models are the oracle.

Each model is a seeded, perturbed `timm.models.vision_transformer.VisionTransformer`; the
converted folder, loaded by `vit_core.load` in both backends, must give timm's logits and
final hidden state (`forward_features`, after the final norm). Bad sources must fail with
an error that names the problem, and leave no output (or temp folder) behind.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conversion import convert
from conversion.sources import timm as timm_reader
from vit_core import CheckpointError, ConfigError
from vit_core.backend import BACKENDS
from vit_core.layout import WEIGHTS_NAME
from vit_core.loading import folder_outputs

WIDTH, HEADS = 48, 3


def timm_vit(oracle: Any, seed: int = 0, **kwargs: Any) -> Any:
    """A seeded timm ViT with every tensor perturbed (depth 2, width 48 unless given)."""
    from timm.models.vision_transformer import VisionTransformer

    settings = {"embed_dim": WIDTH, "depth": 2, "num_heads": HEADS, "num_classes": 7, **kwargs}
    torch.manual_seed(seed)
    return oracle.perturb_torch(VisionTransformer(**settings), seed)


def timm_outputs(model: Any, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(final hidden state after the norm, logits or None for a head-less model)."""
    with torch.inference_mode():
        features = model.forward_features(torch.from_numpy(pixels))
        logits = model.forward_head(features) if model.num_classes else None
    return features.numpy(), None if logits is None else logits.numpy()


def assert_matches_timm(oracle: Any, model: Any, folder: Path, name: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    height, width = (
        config["image_size"]
        if isinstance(config["image_size"], list)
        else [config["image_size"]] * 2
    )
    pixels = oracle.pixels(argparse.Namespace(image_size=(height, width), num_channels=3))
    features, logits = timm_outputs(model, pixels)
    for backend in BACKENDS:
        got = folder_outputs(folder, backend, pixels)
        oracle.assert_close(got["last_hidden_state"], features, f"timm {name}: {backend} hidden")
        if logits is not None:
            oracle.assert_close(got["logits"], logits, f"timm {name}: {backend} logits")
        else:
            assert "logits" not in got


def tensors_of(folder: Path) -> dict[str, np.ndarray]:
    with safe_open(folder / WEIGHTS_NAME, framework="np") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


def leftovers(folder: Path) -> list[str]:
    """Anything a failed conversion could have left: temp or old folders, OUT itself."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name == "out")


# ------------------------------------------------------------------- numerics
SHAPES = {
    "p16-224-head": {"img_size": 224, "patch_size": 16},
    "p32-384-head": {"img_size": 384, "patch_size": 32},
    "p16-224-nohead": {"img_size": 224, "patch_size": 16, "num_classes": 0},
    "p32-224-nohead-noqkvbias": {
        "img_size": 224, "patch_size": 32, "num_classes": 0, "qkv_bias": False,
    },
    "p16-32x64-head": {"img_size": (32, 64), "patch_size": 16},
}  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_timm_logits_and_hidden_state_match_in_both_backends(
    oracle: Any, tmp_path: Path, shape: str, torch_one_thread: None
) -> None:
    kwargs = SHAPES[shape]
    model = timm_vit(oracle, seed=len(shape), **kwargs)
    source = tmp_path / "vit.safetensors" if "384" in shape else tmp_path / "vit.pth"
    if source.suffix == ".safetensors":
        save_file(model.state_dict(), source)
    else:
        torch.save(model.state_dict(), source)
    overrides: dict[str, Any] = {"num_attention_heads": HEADS}
    if isinstance(kwargs["img_size"], tuple):  # a non-square grid: the weights cannot say
        overrides["image_size"] = list(kwargs["img_size"])
    result = convert(source, tmp_path / "out", overrides=overrides, progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu"
    assert config["qkv_bias"] == kwargs.get("qkv_bias", True)
    headless = kwargs.get("num_classes") == 0
    assert result.kind.classifier is not headless
    assert not result.kind.pooler  # a timm file has no pooler: none is invented
    if headless:
        assert not any(k.startswith(("vit.", "pooler.")) for k in tensors_of(tmp_path / "out"))
    assert_matches_timm(oracle, model, tmp_path / "out", shape)


def test_head_count_from_the_standard_table_is_stated(
    oracle: Any, tmp_path: Path, torch_one_thread: None
) -> None:
    model = timm_vit(oracle, embed_dim=192, num_heads=3, img_size=64, patch_size=32)
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    result = convert(tmp_path / "tiny.pth", tmp_path / "out", progress=False)
    assert result.config.num_attention_heads == 3
    assert any("num_attention_heads=3" in a and "width 192" in a for a in result.assumed)
    assert_matches_timm(oracle, model, tmp_path / "out", "tiny-table-heads")


def test_unknown_width_without_a_head_count_is_an_error(oracle: Any, tmp_path: Path) -> None:
    torch.save(timm_vit(oracle, img_size=32, patch_size=16).state_dict(), tmp_path / "v.pth")
    with pytest.raises(ConfigError, match="num_attention_heads"):
        convert(tmp_path / "v.pth", tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == []


def test_model_name_gives_heads_and_a_contradiction_is_named(oracle: Any, tmp_path: Path) -> None:
    model = timm_vit(oracle, embed_dim=192, num_heads=3, img_size=32, patch_size=16)
    torch.save(model.state_dict(), tmp_path / "v.pth")
    with pytest.raises(ConfigError, match="hidden_size=768, but the weights say 192"):
        convert(tmp_path / "v.pth", tmp_path / "out", model_name="vit-base-patch16-224")
    result = convert(
        tmp_path / "v.pth", tmp_path / "out", overrides={"num_attention_heads": 6}, progress=False
    )
    assert result.config.num_attention_heads == 6 and result.assumed[0].startswith("preproc")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"num_attention_heads": 12, "layer_norm_eps": 1e-5}))
    result = convert(
        tmp_path / "v.pth", tmp_path / "out", config_file=config_file, gelu="tanh", force=True
    )
    assert (result.config.num_attention_heads, result.config.layer_norm_eps) == (12, 1e-5)
    assert result.config.hidden_act == "gelu_pytorch_tanh"


EXACT_VARIANTS = {
    "no-embed-class": ({"no_embed_class": True}, "cls"),
    "avg-pool-no-class-token": (
        {"class_token": False, "global_pool": "avg", "fc_norm": False},
        "mean",
    ),
}


@pytest.mark.parametrize("variant", EXACT_VARIANTS)
def test_exact_timm_variants(
    oracle: Any, tmp_path: Path, variant: str, torch_one_thread: None
) -> None:
    """Variants of the plain model: a position table without a class slot
    (no_embed_class), and average pooling after the final norm (said by the hint)."""
    kwargs, pooling = EXACT_VARIANTS[variant]
    model = timm_vit(oracle, img_size=32, patch_size=16, **kwargs)
    torch.save(model.state_dict(), tmp_path / "v.pth")
    overrides = {"num_attention_heads": HEADS, "pooling_type": pooling}
    result = convert(tmp_path / "v.pth", tmp_path / "out", overrides=overrides, progress=False)
    assert result.config.pooling_type == pooling
    assert result.config.no_embed_class == kwargs.get("no_embed_class", False)
    assert_matches_timm(oracle, model, tmp_path / "out", variant)


# ----------------------------------------------------------------- containers
def _wrapped(state: dict[str, torch.Tensor], how: str) -> Any:
    if how == "model":
        return {"model": state, "epoch": 3}
    if how == "state_dict":  # as timm's train.py saves, with its argparse args beside
        return {"state_dict": state, "arch": "vit_tiny", "args": argparse.Namespace(lr=0.1)}
    if how == "module":
        return {f"module.{k}": v for k, v in state.items()}
    return state


@pytest.mark.parametrize("how", ["plain", "model", "state_dict", "module", "legacy", "st"])
def test_every_container_gives_the_same_tensors(oracle: Any, tmp_path: Path, how: str) -> None:
    model = timm_vit(oracle, img_size=32, patch_size=16)
    reference = tmp_path / "reference.safetensors"
    save_file(model.state_dict(), reference)
    if how == "st":
        source = reference
    else:
        source = tmp_path / f"v-{how}.pth"
        legacy = {"_use_new_zipfile_serialization": False} if how == "legacy" else {}
        torch.save(_wrapped(model.state_dict(), how), source, **legacy)
    hints = {"num_attention_heads": HEADS}
    convert(reference, tmp_path / "a", overrides=hints, progress=False)
    convert(source, tmp_path / "b", overrides=hints, progress=False)
    a, b = tensors_of(tmp_path / "a"), tensors_of(tmp_path / "b")
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    qkv = model.state_dict()["blocks.1.attn.qkv.weight"].numpy()
    split_key = a["vit.encoder.layer.1.attention.attention.key.weight"]
    np.testing.assert_array_equal(split_key, qkv[WIDTH : 2 * WIDTH])  # rows D:2D are the key


def test_metadata_and_preprocessor(oracle: Any, tmp_path: Path) -> None:
    import hashlib

    source = tmp_path / "v.pth"
    torch.save(timm_vit(oracle, img_size=64, patch_size=32).state_dict(), source)
    convert(source, tmp_path / "out", overrides={"num_attention_heads": HEADS}, progress=False)
    with safe_open(tmp_path / "out" / WEIGHTS_NAME, framework="np") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt" and metadata["source_format"] == "timm"
    assert metadata["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert metadata["converter_version"]
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == processor["image_std"] == [0.5, 0.5, 0.5]
    assert processor["size"] == {"height": 64, "width": 64}


def test_timm_hub_folder_with_pretrained_cfg(oracle: Any, tmp_path: Path) -> None:
    """A folder as timm's save_for_hf writes it: heads, labels, preprocessing from config."""
    model = timm_vit(oracle, img_size=32, patch_size=16, num_classes=2)
    folder = tmp_path / "timm-hub"
    folder.mkdir()
    save_file(model.state_dict(), folder / "model.safetensors")
    config = {
        "architecture": "vit_tiny_custom",
        "num_classes": 2,
        "global_pool": "token",
        "model_args": {"num_heads": HEADS, "img_size": 32},
        "label_names": ["cat", "dog"],
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    result = convert(folder, tmp_path / "out", progress=False)
    assert result.source_kind == "timm" and result.config.num_attention_heads == HEADS
    assert result.config.id2label == {0: "cat", 1: "dog"}
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["resample"] == 2


def test_resampled_positions_use_timms_antialiased_bicubic(oracle: Any, tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed

    model = timm_vit(oracle, img_size=64, patch_size=16)
    torch.save(model.state_dict(), tmp_path / "v.pth")
    result = convert(
        tmp_path / "v.pth",
        tmp_path / "out",
        overrides={"num_attention_heads": HEADS},
        image_size="96x128",
        progress=False,
    )
    assert result.config.image_hw == (96, 128) and "bicubic_antialias" in result.resampled
    expected = resample_abs_pos_embed(model.pos_embed.detach(), (6, 8), (4, 4), num_prefix_tokens=1)
    got = tensors_of(tmp_path / "out")["vit.embeddings.position_embeddings"]
    oracle.assert_close(got, expected, "timm resample_abs_pos_embed vs --image-size", atol=1e-5)
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 96, "width": 128}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_cast(oracle: Any, tmp_path: Path, dtype: str) -> None:
    torch.save(timm_vit(oracle, img_size=32, patch_size=16).state_dict(), tmp_path / "v.pth")
    convert(
        tmp_path / "v.pth",
        tmp_path / "out",
        overrides={"num_attention_heads": HEADS},
        dtype=dtype,
        progress=False,
    )
    with safe_open(tmp_path / "out" / WEIGHTS_NAME, framework="pt") as handle:
        dtypes = {str(handle.get_tensor(k).dtype) for k in handle.keys()}  # noqa: SIM118
    assert dtypes == {f"torch.{dtype}"}


# ---------------------------------------------------------------- bad sources
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _bad_source(kind: str, tmp_path: Path, oracle: Any) -> Path:
    """A file that must be refused, made as its kind says."""
    path = tmp_path / f"bad-{kind}.pth"
    if kind == "truncated":
        torch.save(timm_vit(oracle, img_size=32, patch_size=16).state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "truncated-safetensors":
        path = path.with_suffix(".safetensors")
        save_file(timm_vit(oracle, img_size=32, patch_size=16).state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    elif kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps({"hidden_size": 768}))
    elif kind == "resnet":
        from timm.models.resnet import resnet18

        torch.save(resnet18(num_classes=3).state_dict(), path)
    elif kind == "qkv-rows":
        state = timm_vit(oracle, img_size=32, patch_size=16).state_dict()
        state["blocks.1.attn.qkv.weight"] = torch.randn(2 * WIDTH, WIDTH)
        torch.save(state, path)
    elif kind == "pickle-runs-code":
        torch.save({"cls_token": torch.zeros(1), "x": _RunsCode(tmp_path / "MARKER")}, path)
    else:  # a timm model of a family the canonical layout cannot express
        settings = {
            "qk-norm": {"qk_norm": True},
            "scale-norms": {"scale_attn_norm": True, "scale_mlp_norm": True},
            "map-two-latents": {"global_pool": "map", "class_token": False},
        }[kind]
        model = timm_vit(oracle, img_size=32, patch_size=16, **settings)
        if kind == "map-two-latents":
            from timm.layers import AttentionPoolLatent

            model.attn_pool = AttentionPoolLatent(WIDTH, num_heads=HEADS, latent_len=2)
        torch.save(model.state_dict(), path)
    return path


BAD = {
    "truncated": "truncated or corrupt",
    "truncated-safetensors": "truncated or corrupt",
    "random-bytes": "first bytes match no weights format",
    "json": "a JSON file, not a checkpoint",
    "resnet": "looks like a ResNet",
    "qkv-rows": r"blocks.1.attn.qkv.weight has 96 rows .* 3 x width = 144: inconsistent",
    "pickle-runs-code": r"refused to unpickle: it asks to call or build posix.system",
    "qk-norm": r"query/key normalisation",
    "scale-norms": r"extra LayerNorms inside the blocks \(scale_attn_norm / scale_mlp_norm",
    "map-two-latents": r"latent_len=2\); the canonical MAP head has one probe",
}


@pytest.mark.parametrize("kind", BAD, ids=list(BAD))
def test_bad_sources_fail_clearly_and_leave_nothing(oracle: Any, tmp_path: Path, kind: str) -> None:
    source = _bad_source(kind, tmp_path, oracle)
    with pytest.raises(CheckpointError, match=BAD[kind]):
        convert(source, tmp_path / "out", overrides={"num_attention_heads": HEADS}, progress=False)
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "MARKER").exists()  # the pickle's code never ran


def test_inexpressible_timm_file_is_refused_even_when_forced(oracle: Any, tmp_path: Path) -> None:
    source = _bad_source("qk-norm", tmp_path, oracle)
    assert timm_reader.detect(source)  # it is a timm file ...
    with pytest.raises(CheckpointError, match="cannot express"):  # ... of another function
        convert(source, tmp_path / "out", source="timm", overrides={"num_attention_heads": 3})
    assert leftovers(tmp_path) == []
