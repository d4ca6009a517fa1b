"""`conversion.sources.jax`: original-JAX and big_vision `.npz` files -> canonical folder.

The `.npz` files are written here FROM a seeded, perturbed timm `VisionTransformer` by
inverting timm's own `_load_weights` mapping, in the google-research/vision_transformer
layout (plain, `opt/target/`-prefixed, with `pre_logits`) and in big_vision's (`params/`
and `params/img/` prefixes, per-type numbering, scanned and per-layer blocks, no class
slot in the positions, gap without a class token, a MAPHead, sincos2d positions left
out). Each file is first loaded with timm's own `.npz` loader into a fresh timm model,
whose state dict must equal the source's exactly (timm cannot read a file without
positions: there big_vision's formula, written here with jax.numpy, fills timm's table);
only then does `read` turn it into a canonical folder, which both backends load and run,
to <= 1e-5 against timm (built with the same GELU form).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import vit_core
from conversion.convert import convert
from conversion.sources import jax as jax_source
from vit_core.errors import CheckpointError, ConfigError

timm_vit = pytest.importorskip("timm.models.vision_transformer")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

WIDTH, HEADS, MLP, PATCH, CLASSES = 48, 3, 96, 8, 5
TANH_GELU = functools.partial(torch.nn.GELU, approximate="tanh")


# ---------------------------------------------------------------- the npz builder
def make_timm(oracle: Any, seed: int, act: Any = TANH_GELU, **kwargs: Any) -> Any:
    """A seeded timm ViT (width 48, 3 heads, MLP 96, patch 8, 32 px) with every tensor
    perturbed; kwargs override (depth, img_size, class_token, no_embed_class, ...)."""
    settings = {
        "img_size": 32,
        "patch_size": PATCH,
        "num_classes": CLASSES,
        "embed_dim": WIDTH,
        "depth": 2,
        "num_heads": HEADS,
        "mlp_ratio": MLP / WIDTH,
        "fc_norm": False,
        "act_layer": act,
        **kwargs,
    }
    torch.manual_seed(seed)
    return oracle.perturb_torch(timm_vit.VisionTransformer(**settings), seed)


def npz_arrays(
    model: Any,
    *,
    big_vision: bool,
    scanned: bool = False,
    prefix: str = "",
    pre_logits: tuple[np.ndarray, np.ndarray] | None = None,
    positions: bool = True,
    map_prefix: str = "MAPHead_0/",
) -> dict[str, np.ndarray]:
    """timm's `_load_weights`, inverted: the model's weights under JAX `.npz` keys
    (`positions=False`: none, as a sincos2d file; `map_prefix`: where a MAPHead goes)."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    depth, hd = len(model.blocks), WIDTH // HEADS
    top: dict[str, np.ndarray] = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if "cls_token" in sd:
        top["cls"] = sd["cls_token"]
    pos_key = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
    if positions:
        top[pos_key] = sd["pos_embed"]
    if "attn_pool.latent" in sd:
        top.update(map_head_arrays(sd, map_prefix))
    if "head.weight" in sd:
        top["head/kernel"] = sd["head.weight"].T
        top["head/bias"] = sd["head.bias"]
    if pre_logits is not None:
        top["pre_logits/kernel"], top["pre_logits/bias"] = pre_logits
    mha, ln2, mlp = (0, 1, 0) if big_vision else (1, 2, 3)
    blocks = []
    for i in range(depth):
        p = f"blocks.{i}."
        b = {
            "LayerNorm_0/scale": sd[p + "norm1.weight"],
            "LayerNorm_0/bias": sd[p + "norm1.bias"],
            f"LayerNorm_{ln2}/scale": sd[p + "norm2.weight"],
            f"LayerNorm_{ln2}/bias": sd[p + "norm2.bias"],
            f"MultiHeadDotProductAttention_{mha}/out/kernel": sd[p + "attn.proj.weight"]
            .reshape(WIDTH, HEADS, hd)
            .transpose(1, 2, 0),
            f"MultiHeadDotProductAttention_{mha}/out/bias": sd[p + "attn.proj.bias"],
        }
        weights = np.split(sd[p + "attn.qkv.weight"], 3)
        biases = np.split(sd[p + "attn.qkv.bias"], 3)
        for name, w, bias in zip(("query", "key", "value"), weights, biases, strict=True):
            b[f"MultiHeadDotProductAttention_{mha}/{name}/kernel"] = w.T.reshape(WIDTH, HEADS, hd)
            b[f"MultiHeadDotProductAttention_{mha}/{name}/bias"] = bias.reshape(HEADS, hd)
        for r in range(2):
            b[f"MlpBlock_{mlp}/Dense_{r}/kernel"] = sd[f"{p}mlp.fc{r + 1}.weight"].T
            b[f"MlpBlock_{mlp}/Dense_{r}/bias"] = sd[f"{p}mlp.fc{r + 1}.bias"]
        blocks.append(b)
    if scanned:
        for key in blocks[0]:
            top[f"Transformer/encoderblock/{key}"] = np.stack([b[key] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            top.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    return {prefix + k: np.ascontiguousarray(v) for k, v in top.items()}


def map_head_arrays(sd: dict[str, np.ndarray], at: str) -> dict[str, np.ndarray]:
    """timm's AttentionPoolLatent as big_vision's MAPHead (timm's loader, inverted)."""
    hd = WIDTH // HEADS
    key, value = np.split(sd["attn_pool.kv.weight"], 2)
    key_bias, value_bias = np.split(sd["attn_pool.kv.bias"], 2)
    mha = at + "MultiHeadDotProductAttention_0/"
    out = {
        at + "probe": sd["attn_pool.latent"],
        mha + "out/kernel": sd["attn_pool.proj.weight"]
        .reshape(WIDTH, HEADS, hd)
        .transpose(1, 2, 0),
        mha + "out/bias": sd["attn_pool.proj.bias"],
        at + "LayerNorm_0/scale": sd["attn_pool.norm.weight"],
        at + "LayerNorm_0/bias": sd["attn_pool.norm.bias"],
    }
    projections = {
        "query": (sd["attn_pool.q.weight"], sd["attn_pool.q.bias"]),
        "key": (key, key_bias),
        "value": (value, value_bias),
    }
    for name, (w, bias) in projections.items():
        out[f"{mha}{name}/kernel"] = w.T.reshape(WIDTH, HEADS, hd)
        out[f"{mha}{name}/bias"] = bias.reshape(HEADS, hd)
    for r in range(2):
        out[f"{at}MlpBlock_0/Dense_{r}/kernel"] = sd[f"attn_pool.mlp.fc{r + 1}.weight"].T
        out[f"{at}MlpBlock_0/Dense_{r}/bias"] = sd[f"attn_pool.mlp.fc{r + 1}.bias"]
    return out


def big_vision_sincos(height: int, width: int, dim: int) -> np.ndarray:
    """big_vision's `posemb_sincos_2d` (models/vit.py), in jax.numpy and float32 as there:
    per patch (row y, column x) sin/cos of x and of y times 1 / 10000^(k / (dim/4 - 1))."""
    jnp = pytest.importorskip("jax.numpy")
    rows, columns = jnp.mgrid[:height, :width]
    k = jnp.arange(dim // 4) / (dim // 4 - 1)
    frequencies = 1.0 / (10_000.0**k)
    x = columns.reshape(-1)[:, None] * frequencies[None, :]
    y = rows.reshape(-1)[:, None] * frequencies[None, :]
    table = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
    return np.asarray(table, dtype=np.float32)[None]


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def check_with_timm(path: Path, model: Any, oracle: Any, **kwargs: Any) -> None:
    """timm's own `.npz` loader reads the file back into exactly the source's weights."""
    fresh = make_timm(oracle, seed=99, act=torch.nn.GELU, **kwargs)
    timm_vit._load_weights(fresh, str(path))
    want, got = model.state_dict(), fresh.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), f"timm read {path.name}: {key} differs"


def write_folder(weights: Any, folder: Path) -> Path:
    """The canonical folder, built here (the conversion pipeline is not under test)."""
    folder.mkdir(parents=True)
    safetensors_numpy.save_file(weights.tensors, str(folder / "model.safetensors"))
    vit_core.ViTConfig(**weights.config).save_pretrained(folder)
    return folder


def outputs(
    folder: Path, pixels: np.ndarray, classifier: bool, pooler: bool = False
) -> dict[str, dict[str, Any]]:
    """logits (if a classifier), last_hidden_state (and pooler_output) from both backends."""
    out: dict[str, dict[str, Any]] = {}
    for backend in ("torch", "flax"):
        x = torch.from_numpy(pixels) if backend == "torch" else pixels
        with torch.no_grad():
            base = vit_core.load(folder, backend=backend, model_type="base")
            result = base(x)
            out[backend] = {"last_hidden_state": result.last_hidden_state}
            if pooler and result.pooler_output is not None:  # None: a transformers ViT's
                out[backend]["pooler_output"] = result.pooler_output
            if classifier:
                out[backend]["logits"] = vit_core.load(folder, backend=backend)(x).logits
    return out


# ------------------------------------------------------------------ the layouts
# name: (timm kwargs, npz kwargs, hints, expected source_format)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]] = {
    "vit_jax": ({}, {"big_vision": False}, {}, "vit_jax"),
    "vit_jax-opt_target": ({}, {"big_vision": False, "prefix": "opt/target/"}, {}, "vit_jax"),
    "vit_jax-exact_gelu": (
        {"act": torch.nn.GELU, "depth": 3},
        {"big_vision": False},
        {"hidden_act": "gelu"},
        "vit_jax",
    ),
    "vit_jax-nonsquare": (
        {"img_size": (32, 48)},
        {"big_vision": False},
        {"image_size": [32, 48]},
        "vit_jax",
    ),
    "big_vision": (
        {"no_embed_class": True},
        {"big_vision": True, "prefix": "params/"},
        {},
        "big_vision",
    ),
    "big_vision-scanned": (
        {"no_embed_class": True, "depth": 3},
        {"big_vision": True, "prefix": "params/img/", "scanned": True},
        {},
        "big_vision",
    ),
    "big_vision-gap": (
        {"class_token": False, "global_pool": "avg"},
        {"big_vision": True, "prefix": "params/"},
        {},
        "big_vision",
    ),
    "big_vision-gap-scanned-headless": (
        {"class_token": False, "global_pool": "avg", "num_classes": 0},
        {"big_vision": True, "prefix": "params/", "scanned": True},
        {},
        "big_vision",
    ),
    "big_vision-map": (
        {"class_token": False, "global_pool": "map"},
        {"big_vision": True, "prefix": "params/"},
        {},
        "big_vision",
    ),
    "big_vision-map-scanned-headless": (  # a SigLIP image tower
        {"class_token": False, "global_pool": "map", "num_classes": 0, "depth": 3},
        {"big_vision": True, "prefix": "params/img/", "scanned": True},
        {},
        "big_vision",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_npz_matches_timm(oracle, tmp_path: Path, case: str) -> None:
    timm_kwargs, npz_kwargs, hints, source_format = CASES[case]
    model = make_timm(oracle, seed=len(case), **timm_kwargs)
    path = write_npz(tmp_path / f"{case}.npz", npz_arrays(model, **npz_kwargs))
    structure = {k: v for k, v in timm_kwargs.items() if k != "act"}
    check_with_timm(path, model, oracle, **structure)

    assert jax_source.detect(path)
    weights = jax_source.read(path, hints)
    assert weights.source_format == source_format
    config = weights.config
    assert config["num_attention_heads"] == HEADS
    assert config["num_hidden_layers"] == len(model.blocks)
    assert config["hidden_act"] == hints.get("hidden_act", "gelu_pytorch_tanh")
    assert config["layer_norm_eps"] == 1e-6
    assert config["use_class_token"] == timm_kwargs.get("class_token", True)
    pool = timm_kwargs.get("global_pool", "token")
    assert config["pooling_type"] == {"token": "cls", "avg": "mean", "map": "map"}[pool]
    assert any("GELU" in a or "gelu" in a for a in weights.assumed) == ("hidden_act" not in hints)
    assert weights.processor["image_mean"] == weights.processor["image_std"] == [0.5] * 3
    img = model.patch_embed.img_size
    assert weights.processor["size"] == {"height": img[0], "width": img[1]}

    folder = write_folder(weights, tmp_path / "converted")
    rng = np.random.default_rng(7)
    pixels = rng.standard_normal((2, 3, *img)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(pixels)
        features = model.forward_features(x)
        want = {
            "last_hidden_state": features,
            "pooler_output": model.forward_head(features, pre_logits=True),
        }
        if model.num_classes:
            want["logits"] = model(x)
    got = outputs(folder, pixels, classifier=bool(model.num_classes), pooler=True)
    if vit_core.ViTConfig(**config).transformers_compatible:  # no embedding as pooler_output
        del want["pooler_output"]
    for backend, fields in got.items():
        assert fields.keys() == want.keys()
        for field, value in fields.items():
            oracle.assert_close(value, want[field], f"jax npz {case} -> {backend}: {field}")


def test_pre_logits_become_the_pooler(oracle, tmp_path: Path) -> None:
    """ImageNet-21k files: logits = head(tanh(pre_logits(cls))), which timm cannot compute
    (it drops pre_logits), so the expected logits are built here from timm's features."""
    model = make_timm(oracle, seed=21)
    rng = np.random.default_rng(21)
    kernel = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(WIDTH)).astype(np.float32)
    arrays = npz_arrays(model, big_vision=False, pre_logits=(kernel, bias))
    path = write_npz(tmp_path / "in21k.npz", arrays)
    check_with_timm(path, model, oracle)

    weights = jax_source.read(path, {})
    assert weights.config["classifier_uses_pooler"] is True
    folder = write_folder(weights, tmp_path / "converted")
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(pixels))
        cls = model.forward_head(features, pre_logits=True)
        pooled = torch.tanh(cls @ torch.from_numpy(kernel) + torch.from_numpy(bias))
        want = {"last_hidden_state": features, "logits": model.head(pooled)}
    for backend, fields in outputs(folder, pixels, classifier=True).items():
        for field, value in fields.items():
            oracle.assert_close(value, want[field], f"jax npz pre_logits -> {backend}: {field}")


def test_bfloat16_stored_as_void_is_recovered(oracle, tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    model = make_timm(oracle, seed=3, no_embed_class=True)
    arrays = npz_arrays(model, big_vision=True, prefix="params/")
    as_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in arrays.items()}
    path = write_npz(tmp_path / "bf16.npz", as_bf16)
    with np.load(path) as raw:
        assert raw["params/embedding/kernel"].dtype == np.dtype("V2")
    weights = jax_source.read(path, {})
    kernel = weights.tensors["vit.embeddings.patch_embeddings.projection.weight"]
    assert kernel.dtype == np.float32
    want = as_bf16["params/embedding/kernel"].astype(np.float32).transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(kernel, want)


# ------------------------------------------------------------------------ errors
@pytest.fixture
def good_arrays(oracle) -> dict[str, np.ndarray]:
    return npz_arrays(make_timm(oracle, seed=5), big_vision=False)


def bad(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> CheckpointError:
    path = write_npz(tmp_path / "bad.npz", arrays)
    with pytest.raises(CheckpointError, match=match) as info:
        jax_source.read(path, {})
    assert str(path) in str(info.value)
    return info.value


def test_not_an_npz(tmp_path: Path) -> None:
    text = tmp_path / "weights.npz"
    text.write_text("not a checkpoint")
    assert not jax_source.detect(text)
    with pytest.raises(CheckpointError, match=r"weights\.npz: not an \.npz archive"):
        jax_source.read(text, {})
    pt = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, pt)  # a zip too, but of a pickle
    assert not jax_source.detect(pt)
    with pytest.raises(CheckpointError, match="not an .npz"):
        jax_source.read(pt, {})
    assert not jax_source.detect(tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match="no such file"):
        jax_source.read(tmp_path / "missing.npz", {})


def test_truncated_npz(tmp_path: Path, good_arrays: dict[str, np.ndarray]) -> None:
    path = write_npz(tmp_path / "cut.npz", good_arrays)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.npz: not a readable \.npz"):
        jax_source.read(path, {})


class _RunsCode:
    """Unpickling this creates the file named `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_unrun(tmp_path: Path, good_arrays) -> None:
    marker = tmp_path / "pwned"
    payload = np.array([_RunsCode(marker)], dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **{**good_arrays, "Transformer/encoderblock_0/LayerNorm_0/scale": payload})
    assert jax_source.detect(path)
    with pytest.raises(CheckpointError, match="pickled Python objects .*LayerNorm_0/scale"):
        jax_source.read(path, {})
    assert not marker.exists()


def test_unknown_layout(tmp_path: Path) -> None:
    arrays = {"model/dense/kernel": np.ones((2, 2), np.float32)}
    assert not jax_source.detect(write_npz(tmp_path / "other.npz", arrays))
    bad(tmp_path, arrays, r"unknown \.npz layout.*embedding/kernel.*model/dense/kernel")


def test_missing_key(tmp_path: Path, good_arrays) -> None:
    arrays = dict(good_arrays)
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    bad(tmp_path, arrays, "missing key 'Transformer/encoderblock_1/LayerNorm_2/scale'")
    arrays = {k: v for k, v in good_arrays.items() if "encoder_norm" not in k}
    bad(tmp_path, arrays, "missing key 'Transformer/encoder_norm")


def test_missing_block(tmp_path: Path, oracle) -> None:
    arrays = npz_arrays(make_timm(oracle, seed=6, depth=3), big_vision=False)
    arrays = {k: v for k, v in arrays.items() if "encoderblock_1/" not in k}
    bad(tmp_path, arrays, "encoderblock_1/ .blocks found: 0, 2")


def test_inconsistent_shapes(tmp_path: Path, good_arrays) -> None:
    key = "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"
    bad(tmp_path, {**good_arrays, key: np.ones((MLP, WIDTH + 1), np.float32)}, key + ".*shape")
    key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel"
    bad(tmp_path, {**good_arrays, key: np.ones((WIDTH, 4, 12), np.float32)}, key + ".*shape")
    key = "Transformer/posembed_input/pos_embedding"
    pos = np.ones((1, 1 + 15, WIDTH), np.float32)
    bad(tmp_path, {**good_arrays, key: pos}, key + ".*15 patch positions, not a square")
    bad(tmp_path, {**good_arrays, "cls": np.ones((1, 2, WIDTH), np.float32)}, "'cls' has shape")
    bad(tmp_path, {**good_arrays, "head/bias": np.ones(CLASSES + 1, np.float32)}, "head/bias")


def test_unknown_keys_are_refused(tmp_path: Path, good_arrays) -> None:
    extra = "Transformer/encoderblock_0/LayerScale_0/scale"
    bad(tmp_path, {**good_arrays, extra: np.ones(WIDTH, np.float32)}, "does not know.*LayerScale")


def test_hybrid_is_refused(tmp_path: Path, oracle) -> None:
    arrays = npz_arrays(
        make_timm(oracle, seed=8, class_token=False, global_pool="avg"), big_vision=True
    )
    arrays = {"params/" + k: v for k, v in arrays.items()}
    stem = {"params/conv_root/kernel": np.ones((7, 7, 3, 8), np.float32)}
    bad(tmp_path, {**arrays, **stem}, "conv_root/kernel.*hybrid ResNet")


def test_map_head_with_a_class_token_is_refused(tmp_path: Path, oracle) -> None:
    """big_vision pools by a class token ('tok') or a MAP head, never both."""
    arrays = npz_arrays(make_timm(oracle, seed=8), big_vision=True)
    mapped = make_timm(oracle, seed=8, class_token=False, global_pool="map")
    sd = {k: v.detach().numpy() for k, v in mapped.state_dict().items()}
    arrays.update(map_head_arrays(sd, "MAPHead_0/"))
    bad(tmp_path, arrays, r"both a class token \('cls'\) and a MAP head")


def test_map_head_keys_and_inlined_layout(oracle, tmp_path: Path) -> None:
    """MAPHead_0 -> head.*: in_proj is query, key, value rows; the ViT-G-era files with the
    head inlined at the top level (big_vision's fix_old_checkpoints) give the same."""
    model = make_timm(oracle, seed=14, class_token=False, global_pool="map")
    path = write_npz(tmp_path / "map.npz", npz_arrays(model, big_vision=True, prefix="params/"))
    inline = npz_arrays(model, big_vision=True, prefix="params/", map_prefix="")
    assert "params/probe" in inline
    weights = jax_source.read(path, {})
    assert weights.config["pooling_type"] == "map" and not weights.config["use_class_token"]
    assert not any("average" in note for note in weights.assumed)
    got = weights.tensors
    pool = model.attn_pool
    want_in = torch.cat([pool.q.weight, pool.kv.weight]).detach().numpy()
    np.testing.assert_array_equal(got["vit.head.attention.in_proj_weight"], want_in)
    want_bias = torch.cat([pool.q.bias, pool.kv.bias]).detach().numpy()
    np.testing.assert_array_equal(got["vit.head.attention.in_proj_bias"], want_bias)
    np.testing.assert_array_equal(got["vit.head.probe"], pool.latent.detach().numpy())
    np.testing.assert_array_equal(
        got["vit.head.attention.out_proj.weight"], pool.proj.weight.detach().numpy()
    )
    np.testing.assert_array_equal(got["vit.head.mlp.fc1.weight"], pool.mlp.fc1.weight.detach())
    inlined = jax_source.read(write_npz(tmp_path / "inline.npz", inline), {}).tensors
    assert inlined.keys() == got.keys()
    for key in got:
        np.testing.assert_array_equal(inlined[key], got[key], err_msg=key)


# name: (timm kwargs, hints): sincos2d files (no pos_embedding in the .npz)
SINCOS = {
    "gap": ({"class_token": False, "global_pool": "avg"}, {"image_size": 32}),
    "tok": ({"no_embed_class": True}, {"image_size": 32}),
    "map-nonsquare": (
        {"class_token": False, "global_pool": "map", "img_size": (32, 48)},
        {"image_size": [32, 48]},
    ),
}


@pytest.mark.parametrize("case", SINCOS)
def test_sincos2d_positions_are_written_out(oracle, tmp_path: Path, case: str) -> None:
    """big_vision computes sincos2d positions; the converted table is its formula at the
    grid, and the model matches timm holding that table."""
    timm_kwargs, hints = SINCOS[case]
    model = make_timm(oracle, seed=15 + len(case), **timm_kwargs)
    grid = model.patch_embed.grid_size
    table = big_vision_sincos(*grid, WIDTH)
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(table.copy()))
    arrays = npz_arrays(model, big_vision=True, prefix="params/", positions=False)
    path = write_npz(tmp_path / f"sincos-{case}.npz", arrays)
    assert jax_source.detect(path)
    weights = jax_source.read(path, hints)
    assert weights.source_format == "big_vision"
    assert any("sincos2d" in note for note in weights.assumed)
    key = "vit.embeddings.position_embeddings"
    positions = weights.tensors[key]
    if model.cls_token is not None:  # added before the class token: a zero row for it
        np.testing.assert_array_equal(positions[:, 0], 0.0)
        positions = positions[:, 1:]
    oracle.assert_close(positions, table, f"sincos2d {case}: table vs big_vision", atol=1e-6)

    result = convert(path, tmp_path / "out", overrides=hints, verify=True, progress=False)
    report = result.verification
    assert report.ok, report.format()
    assert {c.output for c in report.comparisons if c.left == "timm"} >= {"logits"}
    pixels = np.random.default_rng(3).standard_normal((2, 3, *model.patch_embed.img_size))
    pixels = pixels.astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(pixels)
        want = {"last_hidden_state": model.forward_features(x), "logits": model(x)}
    for backend, fields in outputs(tmp_path / "out", pixels, classifier=True).items():
        for field, value in fields.items():
            oracle.assert_close(value, want[field], f"jax npz sincos {case} -> {backend}: {field}")


def test_sincos2d_without_an_image_size(oracle, tmp_path: Path) -> None:
    """No image size given: big_vision's default 224, said in the result."""
    model = make_timm(oracle, seed=16, class_token=False, global_pool="avg")
    arrays = npz_arrays(model, big_vision=True, prefix="params/", positions=False)
    weights = jax_source.read(write_npz(tmp_path / "s.npz", arrays), {})
    assert weights.config["image_size"] == 224
    note = next(n for n in weights.assumed if "sincos2d" in n)
    assert "224x224" in note and "default" in note
    got = weights.tensors["vit.embeddings.position_embeddings"]
    oracle.assert_close(got, big_vision_sincos(28, 28, WIDTH), "sincos2d 224 default", atol=1e-6)
    with pytest.raises(CheckpointError, match="divisible by 4"):
        jax_source.sincos_position_table(4, 4, 6)
    with pytest.raises(CheckpointError, match="multiple of the patch size"):
        jax_source.read(write_npz(tmp_path / "b.npz", arrays), {"image_size": 36})


def test_map_head_through_the_pipeline_with_verify(oracle, tmp_path: Path) -> None:
    """--verify on a MAP-head file: timm's own .npz loader reads the MAPHead."""
    model = make_timm(oracle, seed=17, class_token=False, global_pool="map")
    path = write_npz(tmp_path / "siglip.npz", npz_arrays(model, big_vision=True, prefix="params/"))
    result = convert(path, tmp_path / "out", verify=True, progress=False)
    report = result.verification
    assert report.ok, report.format()
    against_timm = {c.output for c in report.comparisons if c.left == "timm"}
    assert against_timm >= {"logits", "last_hidden_state", "pooler_output"}, report.format()


def test_nonsquare_grid_needs_image_size(tmp_path: Path, oracle) -> None:
    arrays = npz_arrays(make_timm(oracle, seed=9, img_size=(32, 48)), big_vision=False)
    bad(tmp_path, arrays, "24 patch positions, not a square grid; give .*image_size")


def test_headless_and_zero_head(tmp_path: Path, good_arrays) -> None:
    arrays = {k: v for k, v in good_arrays.items() if not k.startswith("head/")}
    weights = jax_source.read(write_npz(tmp_path / "a.npz", arrays), {})
    assert weights.config["num_labels"] == 0
    assert not any(k.startswith(("vit.", "classifier.")) for k in weights.tensors)
    zero = {"head/kernel": np.zeros((WIDTH, 0), np.float32), "head/bias": np.zeros(0, np.float32)}
    weights = jax_source.read(write_npz(tmp_path / "b.npz", {**arrays, **zero}), {})
    assert weights.config["num_labels"] == 0
    assert not any(k.startswith(("vit.", "classifier.")) for k in weights.tensors)


def test_through_conversion_pipeline(oracle, tmp_path: Path) -> None:
    """End to end through `conversion.convert`."""
    model = make_timm(oracle, seed=11, no_embed_class=True)
    path = write_npz(tmp_path / "bv.npz", npz_arrays(model, big_vision=True, prefix="params/"))
    out = tmp_path / "out"
    result = convert(path, out, progress=False)
    assert result.source_format == "big_vision"
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "gelu_pytorch_tanh"
    assert config["layer_norm_eps"] == 1e-6
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == processor["image_std"] == [0.5] * 3
    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(pixels))
    for backend in ("torch", "flax"):
        x = torch.from_numpy(pixels) if backend == "torch" else pixels
        with torch.no_grad():
            got = vit_core.load(out, backend=backend)(x).logits
        oracle.assert_close(got, want, f"jax npz via conversion.convert -> {backend}: logits")


def test_head_count_fixed_by_the_kernels_cannot_be_overridden(oracle, tmp_path: Path) -> None:
    """The (D, heads, head_dim) kernels fix the head count; a hint that disagrees is an error."""
    model = make_timm(oracle, seed=12)
    path = write_npz(tmp_path / "vit.npz", npz_arrays(model, big_vision=False))
    with pytest.raises(ConfigError, match="num_attention_heads=4, but the weights say 3"):
        convert(path, tmp_path / "out", overrides={"num_attention_heads": 4}, progress=False)
    assert not (tmp_path / "out").exists()


def test_gelu_option_reaches_the_reader(oracle, tmp_path: Path) -> None:
    """--gelu exact: the config says exact GELU and nothing claims the tanh form was assumed."""
    path = write_npz(tmp_path / "vit.npz", npz_arrays(make_timm(oracle, seed=13), big_vision=False))
    result = convert(path, tmp_path / "out", gelu="exact", progress=False)
    assert result.config.hidden_act == "gelu"
    assert not any("gelu_pytorch_tanh" in note for note in result.assumed)
