"""--model-name gives the architecture, the family's switches and (timm names) the numerics
a state dict does not hold; --config and --set override any of it, and only the value that
wins is held to the weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import vit_core
from conversion import convert
from conversion.convert import NAME_NUMERICS, hint_layers, merge_config, name_layer
from conversion.sources.base import SourceWeights
from vit_core import ConfigError
from vit_core.loading import folder_outputs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def timm_checkpoint(oracle: Any, path: Path, name: str, **overrides: Any) -> Any:
    """A timm model by name, cut down by `overrides`, every tensor perturbed, saved."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = oracle.perturb_torch(timm.create_model(name, pretrained=False, **overrides), 0)
    torch.save(model.state_dict(), path)
    return model


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------- the name's layer
def test_a_timm_name_gives_switches_and_numerics() -> None:
    layer = name_layer("vit_base_patch16_clip_quickgelu_224.openai")
    assert layer["layer_norm_eps"] == 1e-5 and layer["hidden_act"] == "quick_gelu"
    assert layer["use_pre_norm"] is True and layer["patch_embedding_bias"] is False
    assert "num_labels" not in layer  # labels belong to the checkpoint
    dinov2 = name_layer("vit_small_patch14_reg4_dinov2.lvd142m")
    assert (dinov2["num_register_tokens"], dinov2["no_embed_class"]) == (4, True)
    assert dinov2["layerscale_value"] == 1e-5 and dinov2["image_size"] == 518


@pytest.mark.parametrize("name", ["vit-base-patch16-224", "ViT-B_16", "B/16"])
def test_other_spellings_give_the_architecture_only(name: str) -> None:
    """A hub name's eps (transformers' 1e-12) or a JAX name's tanh GELU describe those
    ecosystems' files, not the checkpoint being converted."""
    layer = name_layer(name)
    assert not set(NAME_NUMERICS) & set(layer)
    assert layer["hidden_size"] == 768 and layer["num_hidden_layers"] == 12


def test_a_name_this_package_cannot_run_is_refused_before_any_file_is_read(
    tmp_path: Path,
) -> None:
    (tmp_path / "aimv2.pth").write_bytes(b"not read")
    with pytest.raises(ConfigError, match=r"aimv2_large_patch14_224: RMSNorm .* not supported"):
        convert(tmp_path / "aimv2.pth", tmp_path / "out", model_name="aimv2_large_patch14_224")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------ precedence, checks
def source(**config: Any) -> SourceWeights:
    return SourceWeights(tensors={}, config=config, source_format="test")


def test_set_replaces_a_names_depth_and_is_checked_in_its_place() -> None:
    weights = source(num_hidden_layers=2, hidden_size=384)
    name = "vit_small_patch14_dinov2.lvd142m"
    layers = hint_layers(name, None, {"num_hidden_layers": 2})
    fields = merge_config(weights, layers, None)
    assert (fields["num_hidden_layers"], fields["layerscale_value"]) == (2, 1e-5)
    with pytest.raises(ConfigError) as caught:
        merge_config(weights, hint_layers(name, None, None), None)
    assert str(caught.value) == (
        f"--model-name {name} gives num_hidden_layers=12, but the weights say 2; leave it out, "
        "override it with --set num_hidden_layers=2, or convert a matching checkpoint"
    )
    with pytest.raises(ConfigError, match="^--set gives num_hidden_layers=3, but the weights"):
        merge_config(weights, hint_layers(name, None, {"num_hidden_layers": 3}), None)


def test_a_config_file_overrides_the_name(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"num_hidden_layers": 2, "layer_norm_eps": 1e-5}')
    layers = hint_layers("vit_small_patch14_dinov2", config, None)
    fields = merge_config(source(num_hidden_layers=2), layers, None)
    assert (fields["num_hidden_layers"], fields["layer_norm_eps"]) == (2, 1e-5)


def test_a_switch_the_weights_fix_is_held_to_them() -> None:
    weights = SourceWeights(
        tensors={},
        config={"num_register_tokens": 0, "num_hidden_layers": 2},
        source_format="test",
        fixed=frozenset({"num_register_tokens"}),
    )
    layers = hint_layers("vit_small_patch14_reg4_dinov2", None, {"num_hidden_layers": 2})
    with pytest.raises(ConfigError, match="gives num_register_tokens=4, but the weights say 0"):
        merge_config(weights, layers, None)


# ------------------------------------------------------------ end to end, vs timm
def test_cli_name_with_a_depth_override_converts_a_cut_down_dinov2(
    oracle: Any, tmp_path: Path
) -> None:
    """The documented way to convert a cut-down model of a named family."""
    name = "vit_small_patch14_dinov2.lvd142m"
    model = timm_checkpoint(oracle, tmp_path / "dinov2.pth", name, depth=2)
    command = [sys.executable, "-m", "conversion", tmp_path / "dinov2.pth", "-o"]
    refused = subprocess.run(
        [*map(str, command), str(tmp_path / "no"), "--model-name", name, "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "override it with --set num_hidden_layers=2" in refused.stderr
    done = subprocess.run(
        [*map(str, command), str(tmp_path / "out"), "--model-name", name,
         "--set", "num_hidden_layers=2", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = vit_core.ViTConfig.from_pretrained(tmp_path / "out")
    assert (config.num_hidden_layers, config.layerscale_value) == (2, 1e-5)
    assert config.image_hw == (518, 518) and config.num_attention_heads == 6
    pixels = oracle.pixels(config)[:1]
    with torch.inference_mode():
        want = model.forward_features(torch.from_numpy(pixels)).numpy()
    got = folder_outputs(tmp_path / "out", "torch", pixels)["last_hidden_state"]
    oracle.assert_close(got, want, "timm dinov2 cut down by --set: torch last_hidden_state")


def test_a_timm_name_supplies_the_numerics_a_state_dict_lacks(oracle: Any, tmp_path: Path) -> None:
    """OpenAI CLIP: LayerNorm eps 1e-5 and QuickGELU, neither in the file."""
    name = "vit_base_patch16_clip_quickgelu_224.openai"
    model = timm_checkpoint(oracle, tmp_path / "clip.pth", name, depth=1, img_size=32)
    plain = convert(tmp_path / "clip.pth", tmp_path / "plain", progress=False)
    assert (plain.config.layer_norm_eps, plain.config.hidden_act) == (1e-6, "gelu")
    assert any("layer_norm_eps" in note for note in plain.assumed)
    named = convert(
        tmp_path / "clip.pth",
        tmp_path / "named",
        model_name=name,
        overrides={"num_hidden_layers": 1, "image_size": 32},
        progress=False,
    )
    config = named.config
    assert (config.layer_norm_eps, config.hidden_act, config.use_pre_norm) == (
        1e-5,
        "quick_gelu",
        True,
    )
    assert not any("layer_norm_eps" in note for note in named.assumed)
    pixels = oracle.pixels(config)
    with torch.inference_mode():
        want = model(torch.from_numpy(pixels)).numpy()
    got = folder_outputs(tmp_path / "named", "torch", pixels)["logits"]
    oracle.assert_close(got, want, "timm clip quickgelu named: torch logits")
    wrong = folder_outputs(tmp_path / "plain", "torch", pixels)["logits"]
    assert np.abs(wrong - want).max() > 1e-4  # the numerics matter: the name is needed
