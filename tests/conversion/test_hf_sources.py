"""Hugging Face checkpoints -> canonical folder: transformers itself is the oracle.

Every storage form transformers writes (safetensors, `pytorch_model.bin`, sharded
safetensors and bin with their index, Flax msgpack) is made by `save_pretrained` from a
seeded, perturbed model; the converted folder must give that model's logits and final
hidden state in both backends. Converting a converted folder changes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conversion import convert
from vit_core import CheckpointError, ConfigError
from vit_core.backend import BACKENDS
from vit_core.layout import WEIGHTS_NAME
from vit_core.loading import folder_outputs


def transformers_outputs(model: Any, head: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """logits (classifier) or last_hidden_state (+ pooler_output), and for a classifier
    also its encoder's last_hidden_state."""
    with torch.inference_mode():
        x = torch.from_numpy(pixels)
        if head == "classification":
            return {
                "logits": model(x).logits.numpy(),
                "last_hidden_state": model.vit(x).last_hidden_state.numpy(),
            }
        out = model(x)
        result = {"last_hidden_state": out.last_hidden_state.numpy()}
        if out.pooler_output is not None:
            result["pooler_output"] = out.pooler_output.numpy()
        return result


def assert_matches(oracle: Any, expected: dict[str, Any], folder: Path, pixels: Any, name: str):
    for backend in BACKENDS:
        got = folder_outputs(folder, backend, pixels)
        assert sorted(got) == sorted(expected), f"{name}: outputs {sorted(got)}"
        for field, want in expected.items():
            oracle.assert_close(got[field], want, f"hf {name}: {backend} {field}")


def tensors_of(folder: Path) -> dict[str, np.ndarray]:
    with safe_open(folder / WEIGHTS_NAME, framework="np") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


STORAGE = {
    # name: (head, oracle case, save_pretrained kwargs)
    "safetensors": ("classification", "sq32-p8-qkvbias-gelu-eps1e-12", {}),
    "bin-pooler": ("pooler", "32x48-p16-nobias-tanh-eps1e-6", {"safe_serialization": False}),
    "sharded-safetensors": ("classification", "sq32-p16-nobias-gelu-eps1e-6",
                            {"max_shard_size": "100KB"}),
    "sharded-bin-base": ("base", "32x48-p8-qkvbias-tanh-eps1e-12",
                         {"max_shard_size": "100KB", "safe_serialization": False}),
}  # fmt: skip


@pytest.mark.parametrize("storage", STORAGE, ids=list(STORAGE))
def test_transformers_pytorch_checkpoints(
    oracle: Any, tmp_path: Path, storage: str, torch_one_thread: None
) -> None:
    head, case, save_kwargs = STORAGE[storage]
    model, _ = oracle.make_hf(head, seed=len(storage), **oracle.CASES[case])
    source = tmp_path / storage
    model.save_pretrained(source, **save_kwargs)
    names = {p.name for p in source.iterdir()}
    if "sharded" in storage:
        assert any(n.endswith(".index.json") for n in names), names
    result = convert(source, tmp_path / "out", progress=False)
    assert result.source_kind == "hf"
    assert result.kind.pooler == (head == "pooler") and result.kind.classifier == (
        head == "classification"
    )
    pixels = oracle.pixels(model.config)
    assert_matches(
        oracle, transformers_outputs(model, head, pixels), tmp_path / "out", pixels, storage
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for field, value in oracle.CASES[case].items():
        assert config[field] == (list(value) if isinstance(value, tuple) else value), field


@pytest.mark.parametrize(
    ("head", "case"),
    [
        ("classification", "sq32-p8-qkvbias-gelu-eps1e-12"),
        ("pooler", "sq32-p16-nobias-gelu-eps1e-6"),
    ],
    ids=["classification", "pooler"],
)
def test_transformers_flax_msgpack(oracle: Any, tmp_path: Path, head: str, case: str) -> None:
    """(transformers' Flax ViT takes square images only.)"""
    import transformers

    settings = {
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "intermediate_size": 96,
        "num_labels": 5,
        **oracle.CASES[case],
    }
    config = transformers.ViTConfig(**settings)
    model = oracle.hf_class(head, flax=True)(config, seed=3, **oracle.hf_kwargs(head))
    model.params = oracle.perturb_flax(model.params, seed=3)
    source = tmp_path / "flax"
    model.save_pretrained(source)
    assert {p.name for p in source.iterdir()} == {"config.json", "flax_model.msgpack"}
    convert(source, tmp_path / "out", progress=False)
    pixels = oracle.pixels(config)
    if head == "classification":
        encoder = transformers.FlaxViTModel(config, add_pooling_layer=False, _do_init=False)
        expected = {
            "logits": model(pixels).logits,
            "last_hidden_state": encoder(pixels, params=model.params["vit"]).last_hidden_state,
        }
    else:
        out = model(pixels)
        expected = {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
    assert_matches(oracle, expected, tmp_path / "out", pixels, f"flax-msgpack-{head}")


def test_single_files_with_and_without_config(oracle: Any, tmp_path: Path) -> None:
    """`model.safetensors` handed alone: its config.json beside it is used; without one,
    the architecture comes from the shapes and the head count from the hints."""
    model, folder = oracle.make_hf("classification", **oracle.CASES["sq32-p16-nobias-gelu-eps1e-6"])
    convert(folder / "model.safetensors", tmp_path / "a", progress=False)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["layer_norm_eps"] == 1e-6
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(folder / "model.safetensors", lone / "weights.safetensors")
    result = convert(
        lone / "weights.safetensors",
        tmp_path / "b",
        overrides={"num_attention_heads": 3, "layer_norm_eps": 1e-6},
        progress=False,
    )
    assert any("numerics" in note for note in result.assumed)
    pixels = oracle.pixels(model.config)
    expected = transformers_outputs(model, "classification", pixels)
    assert_matches(oracle, expected, tmp_path / "b", pixels, "lone-safetensors")


@pytest.mark.parametrize("source_kind", ["hf", "timm"])
def test_round_trip_changes_nothing(oracle: Any, tmp_path: Path, source_kind: str) -> None:
    if source_kind == "hf":
        _, source = oracle.make_hf("pooler", **oracle.CASES["32x48-p8-qkvbias-tanh-eps1e-12"])
        overrides = None
    else:
        from timm.models.vision_transformer import VisionTransformer

        timm_model = VisionTransformer(
            img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3
        )
        source = tmp_path / "timm.pth"
        torch.save(oracle.perturb_torch(timm_model, 0).state_dict(), source)
        overrides = {"num_attention_heads": 3}
    first = convert(source, tmp_path / "once", overrides=overrides, progress=False)
    second = convert(tmp_path / "once", tmp_path / "twice", progress=False)
    assert second.source_kind == "hf" and second.assumed == []
    once, twice = tensors_of(tmp_path / "once"), tensors_of(tmp_path / "twice")
    assert sorted(once) == sorted(twice)
    for key in once:
        assert once[key].dtype == twice[key].dtype
        np.testing.assert_array_equal(once[key], twice[key], err_msg=key)
    for name in ("config.json", "preprocessor_config.json"):
        a = json.loads((tmp_path / "once" / name).read_text())
        b = json.loads((tmp_path / "twice" / name).read_text())
        assert a == b, name
    assert first.config == second.config


def test_resampled_like_transformers_interpolate_pos_encoding(oracle: Any, tmp_path: Path) -> None:
    """--image-size for an HF source defaults to bicubic without antialias, which is what
    transformers' own `interpolate_pos_encoding` computes at run time."""
    model, folder = oracle.make_hf(
        "classification", **oracle.CASES["sq32-p8-qkvbias-gelu-eps1e-12"]
    )
    result = convert(folder, tmp_path / "out", image_size="48x64", progress=False)
    assert result.resampled == "32x32 -> 48x64 (bicubic)"
    pixels = oracle.pixels(model.config, size=(48, 64))
    with torch.inference_mode():
        want = model(torch.from_numpy(pixels), interpolate_pos_encoding=True).logits
    for backend in BACKENDS:
        got = folder_outputs(tmp_path / "out", backend, pixels)["logits"]
        oracle.assert_close(got, want, f"hf resampled 48x64: {backend} logits")


def test_not_a_vit_config_or_missing_shard_is_refused(oracle: Any, tmp_path: Path) -> None:
    model, folder = oracle.make_hf("classification", **oracle.CASES["sq32-p16-nobias-gelu-eps1e-6"])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "deit"}))
    with pytest.raises(ConfigError, match="model_type='deit'"):
        convert(folder, tmp_path / "out", progress=False)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} is missing"):
        convert(sharded, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
