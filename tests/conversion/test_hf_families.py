"""transformers' ViT-family models -> canonical folder: transformers itself is the oracle.

For each family (DINOv2, DINOv2 with registers, CLIP, SigLIP, DeiT, ViT-MAE) the real
transformers model is built tiny and seeded, every tensor perturbed (matrices by
1/sqrt(fan_in), layer-scale lambdas near 0.3, never their 1e-5 init), saved with
`save_pretrained`, converted, and run in both backends against transformers' outputs on
the same pixels, float32 <= 1e-5. `--verify` runs the same transformers class. Heads the
canonical model cannot express are refused by name, and a converted config whose
switches contradict its weights fails at load naming the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conversion import convert
from vit_core import CheckpointError, ConfigError, load
from vit_core.backend import BACKENDS, get_backend
from vit_core.loading import folder_outputs

Outputs = dict[str, Any]
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}


def perturb(model: Any, seed: int) -> Any:
    """Every parameter perturbed as the suite's oracle does it (vectors by N(0, 0.1^2),
    matrices by 1/sqrt(fan_in), the patch kernel a tenth of that; scalars such as CLIP's
    logit_scale too), then each layer-scale lambda set near 0.3 so that the residual
    branches count."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            value = p.detach().numpy()
            if name.endswith("lambda1"):
                new = 0.3 + 0.05 * rng.standard_normal(value.shape)
            else:
                fan_in = int(np.prod(value.shape[1:])) if value.ndim in (2, 4) else 0
                std = 1.0 / np.sqrt(fan_in) if fan_in else 0.1
                std = std / 10 if value.ndim == 4 else std
                new = value + std * rng.standard_normal(value.shape)
            p.copy_(torch.from_numpy(np.asarray(new, dtype=np.float32)))
    return model.eval()


def twin_outputs(folder: Path, backend: str, pixels: np.ndarray) -> Outputs:
    """The folder's outputs (logits and the encoder's), and a distilled model's two heads."""
    got = folder_outputs(folder, backend, pixels)
    if "logits" in got:
        twin = get_backend(backend)
        first = twin.run(load(folder, backend, dtype="float32"), pixels)
        got.update({k: first[k] for k in ("cls_logits", "distillation_logits") if k in first})
    return got


# ------------------------------------------------------------------ the models
def dinov2(swiglu: bool) -> tuple[Any, Callable[[Any, torch.Tensor], Outputs]]:
    import transformers

    config = transformers.Dinov2Config(
        **TINY, image_size=28, patch_size=14, mlp_ratio=3, use_swiglu_ffn=swiglu,
        layerscale_value=0.3, layer_norm_eps=1e-6,
    )  # fmt: skip
    return transformers.Dinov2Model(config), _encoder


def dinov2_registers() -> tuple[Any, Callable[[Any, torch.Tensor], Outputs]]:
    import transformers

    config = transformers.Dinov2WithRegistersConfig(
        **TINY, image_size=32, patch_size=16, num_register_tokens=3, layerscale_value=0.3
    )
    return transformers.Dinov2WithRegistersModel(config), _encoder


def _encoder(model: Any, x: torch.Tensor) -> Outputs:
    out = model(x)
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}


def _clip_vision_config() -> dict[str, Any]:
    return {**TINY, "num_attention_heads": 4, "intermediate_size": 80, "image_size": 28,
            "patch_size": 14, "projection_dim": 24}  # fmt: skip


def _clip_tower(vision: Any, x: torch.Tensor) -> Outputs:
    out = vision(x)
    return {
        "last_hidden_state": vision.post_layernorm(out.last_hidden_state),
        "pooler_output": out.pooler_output,
    }


def clip_vision(projection: bool) -> tuple[Any, Callable[[Any, torch.Tensor], Outputs]]:
    import transformers

    config = transformers.CLIPVisionConfig(**_clip_vision_config())
    if not projection:
        return transformers.CLIPVisionModel(config), lambda m, x: _clip_tower(m.vision_model, x)

    def run(model: Any, x: torch.Tensor) -> Outputs:
        return {**_clip_tower(model.vision_model, x), "logits": model(x).image_embeds}

    return transformers.CLIPVisionModelWithProjection(config), run


def clip_full() -> tuple[Any, Callable[[Any, torch.Tensor], Outputs]]:
    import transformers

    config = transformers.CLIPConfig(
        vision_config=_clip_vision_config(),
        text_config={**TINY, "intermediate_size": 64, "vocab_size": 99},
        projection_dim=24,
    )

    def run(model: Any, x: torch.Tensor) -> Outputs:
        return {**_clip_tower(model.vision_model, x), "logits": model.get_image_features(x)}

    return transformers.CLIPModel(config), run


def _siglip_vision_config(**fields: Any) -> dict[str, Any]:
    return {**TINY, "intermediate_size": 72, "image_size": 32, "patch_size": 8, **fields}


def siglip_vision(use_head: bool) -> tuple[Any, Callable[[Any, torch.Tensor], Outputs]]:
    import transformers

    config = transformers.SiglipVisionConfig(**_siglip_vision_config(vision_use_head=use_head))

    def run(model: Any, x: torch.Tensor) -> Outputs:
        out = model(x)
        if use_head:
            return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
        assert out.pooler_output is None
        hidden = out.last_hidden_state  # no head: the canonical pooling is the token mean
        return {"last_hidden_state": hidden, "pooler_output": hidden.mean(dim=1)}

    return transformers.SiglipVisionModel(config), run


def siglip_full() -> tuple[Any, Callable[[Any, torch.Tensor], Outputs]]:
    import transformers

    config = transformers.SiglipConfig(
        vision_config=_siglip_vision_config(),
        text_config={**TINY, "intermediate_size": 64, "vocab_size": 99},
    )
    return transformers.SiglipModel(config), lambda m, x: _encoder(m.vision_model, x)


def _deit_config() -> Any:
    import transformers

    return transformers.DeiTConfig(
        **{**TINY, "num_attention_heads": 4}, intermediate_size=64, image_size=32, patch_size=16,
        num_labels=5, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )  # fmt: skip


def deit_teacher() -> tuple[Any, Callable[[Any, torch.Tensor], Outputs]]:
    import transformers

    def run(model: Any, x: torch.Tensor) -> Outputs:
        out = model(x)
        return {
            "logits": out.logits,
            "cls_logits": out.cls_logits,
            "distillation_logits": out.distillation_logits,
            "last_hidden_state": model.deit(x).last_hidden_state,
        }

    return transformers.DeiTForImageClassificationWithTeacher(_deit_config()), run


def deit_model() -> tuple[Any, Callable[[Any, torch.Tensor], Outputs]]:
    import transformers

    return transformers.DeiTModel(_deit_config()), _encoder


def _mae_config() -> Any:
    import transformers

    return transformers.ViTMAEConfig(
        **TINY, intermediate_size=64, image_size=32, patch_size=8, mask_ratio=0.0,
        decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )  # fmt: skip


def _mae_run(encoder: Callable[[Any], Any]) -> Callable[[Any, torch.Tensor], Outputs]:
    def run(model: Any, x: torch.Tensor) -> Outputs:
        patches = model.config.image_size // model.config.patch_size
        noise = torch.arange(patches**2, dtype=torch.float32).expand(len(x), -1)  # in order
        return {"last_hidden_state": encoder(model)(x, noise=noise).last_hidden_state}

    return run


def mae_model() -> tuple[Any, Callable[[Any, torch.Tensor], Outputs]]:
    import transformers

    return transformers.ViTMAEModel(_mae_config()), _mae_run(lambda m: m)


def mae_pretraining() -> tuple[Any, Callable[[Any, torch.Tensor], Outputs]]:
    import transformers

    return transformers.ViTMAEForPreTraining(_mae_config()), _mae_run(lambda m: m.vit)


FAMILIES: dict[str, tuple[Callable[[], tuple[Any, Any]], dict[str, Any]]] = {
    # name: (builder, config fields the converted folder must have)
    "dinov2": (lambda: dinov2(False), {"layerscale_value": 0.3, "hidden_act": "gelu"}),
    "dinov2-swiglu": (lambda: dinov2(True), {"use_swiglu_ffn": True, "hidden_act": "silu",
                                             "intermediate_size": 64}),
    "dinov2-registers": (dinov2_registers, {"num_register_tokens": 3, "no_embed_class": True}),
    "clip-vision": (lambda: clip_vision(False), {"use_pre_norm": True,
                                                 "patch_embedding_bias": False,
                                                 "hidden_act": "quick_gelu",
                                                 "layer_norm_eps": 1e-5}),
    "clip-vision-projection": (lambda: clip_vision(True), {"num_labels": 24}),
    "clip-full": (clip_full, {"num_labels": 24, "use_pre_norm": True}),
    "siglip-vision": (lambda: siglip_vision(True), {"use_class_token": False,
                                                    "pooling_type": "map",
                                                    "hidden_act": "gelu_pytorch_tanh"}),
    "siglip-vision-no-head": (lambda: siglip_vision(False), {"pooling_type": "mean"}),
    "siglip-full": (siglip_full, {"pooling_type": "map"}),
    "deit-teacher": (deit_teacher, {"use_distillation_token": True, "num_labels": 5}),
    "deit-model-pooler": (deit_model, {"use_distillation_token": True}),
    "mae-model": (mae_model, {}),
    "mae-pretraining": (mae_pretraining, {}),
}  # fmt: skip


def make_source(tmp_path: Path, name: str, seed: int = 0) -> tuple[Any, Any, Path]:
    builder, _ = FAMILIES[name]
    torch.manual_seed(seed)
    model, run = builder()
    perturb(model, seed)
    source = tmp_path / f"src-{name}"
    model.save_pretrained(source)
    return model, run, source


@pytest.mark.parametrize("name", FAMILIES, ids=list(FAMILIES))
def test_family_matches_transformers(
    oracle: Any, tmp_path: Path, name: str, torch_one_thread: None
) -> None:
    model, run, source = make_source(tmp_path, name, seed=len(name))
    out = tmp_path / "out"
    result = convert(source, out, verify=True, progress=False)
    assert result.source_kind == "hf"
    config = json.loads((out / "config.json").read_text())
    config["num_labels"] = len(config["id2label"])
    for field, value in FAMILIES[name][1].items():
        assert config[field] == value, (field, config[field])
    pixels = oracle.pixels(model.config.vision_config if hasattr(model.config, "vision_config")
                           else model.config)  # fmt: skip
    with torch.inference_mode():
        expected = {k: v.numpy() for k, v in run(model, torch.from_numpy(pixels)).items()}
    for backend in BACKENDS:
        got = twin_outputs(out, backend, pixels)
        for field, want in expected.items():
            assert field in got, f"{name}: {backend} has no {field} (has {sorted(got)})"
            oracle.assert_close(got[field], want, f"hf family {name}: {backend} {field}")
    # --verify ran transformers' own class, named every output it compared, found them equal
    report = result.verification
    assert report is not None and report.ok, report.format()
    compared = {(c.left, c.right, c.output) for c in report.comparisons}
    unchecked = {"cls_logits", "distillation_logits"}  # folder_outputs leaves them out
    if name == "siglip-vision-no-head":
        unchecked.add("pooler_output")  # transformers has none to compare with
    for backend in BACKENDS:
        for field in set(expected) - unchecked:
            assert ("transformers", backend, field) in compared, (field, report.format())


# ------------------------------------------------------------ what it says
def test_what_each_conversion_states(oracle: Any, tmp_path: Path) -> None:
    """Dropped parts and the registers' position fold are in `assumed`; the registers'
    class token carries its position row, and their table has the patches' rows only."""
    model, _, source = make_source(tmp_path, "dinov2-registers")
    result = convert(source, tmp_path / "reg", progress=False)
    assert any("mask token" in note for note in result.assumed)
    assert any("no_embed_class=True" in note for note in result.assumed)
    tensors = load_file(str(tmp_path / "reg" / "model.safetensors"))
    table = model.embeddings.position_embeddings.detach()
    torch.testing.assert_close(tensors["embeddings.position_embeddings"], table[:, 1:])
    torch.testing.assert_close(
        tensors["embeddings.cls_token"], model.embeddings.cls_token.detach() + table[:, :1]
    )
    assert "embeddings.mask_token" not in tensors
    _, _, source = make_source(tmp_path, "clip-full")
    result = convert(source, tmp_path / "clip", progress=False)
    assert any("text tower" in note for note in result.assumed)
    assert any("visual_projection became the classifier" in note for note in result.assumed)
    _, _, source = make_source(tmp_path, "mae-pretraining")
    result = convert(source, tmp_path / "mae", progress=False)
    assert not result.kind.classifier
    assert any("MAE decoder" in note for note in result.assumed)
    assert any("mask_ratio" in note for note in result.assumed)


def test_mae_without_a_stored_table_gets_transformers_sincos(oracle: Any, tmp_path: Path) -> None:
    """A ViT-MAE file without its (fixed) position table: the table transformers'
    initialisation computes, exactly."""
    import transformers

    torch.manual_seed(0)
    model = transformers.ViTMAEModel(_mae_config())  # post_init wrote the sin-cos table
    table = model.embeddings.position_embeddings.detach().clone()
    perturb(model, 0)
    with torch.no_grad():
        model.embeddings.position_embeddings.copy_(table)
    source = tmp_path / "mae"
    model.save_pretrained(source)
    state = load_file(str(source / "model.safetensors"))
    del state["embeddings.position_embeddings"]
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    result = convert(source, tmp_path / "out", progress=False)
    assert any("get_2d_sincos_pos_embed" in note for note in result.assumed)
    converted = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(converted["embeddings.position_embeddings"], table, atol=0, rtol=0)


# ---------------------------------------------------------------- refusals
def _save(model: Any, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def test_heads_the_canonical_model_cannot_express_are_refused(tmp_path: Path) -> None:
    import transformers

    cases = {
        "Dinov2ForImageClassification": transformers.Dinov2ForImageClassification(
            transformers.Dinov2Config(**TINY, image_size=28, patch_size=14, num_labels=3)
        ),
        "DeiTForImageClassification": transformers.DeiTForImageClassification(_deit_config()),
        "DeiTForMaskedImageModeling": transformers.DeiTForMaskedImageModeling(_deit_config()),
        "CLIPForImageClassification": transformers.CLIPForImageClassification(
            transformers.CLIPConfig(vision_config=_clip_vision_config(), num_labels=3)
        ),
    }
    for name, model in cases.items():
        source = _save(model, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name}: .*Convert the"):
            convert(source, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()


def test_text_towers_and_unknown_model_types_are_refused(tmp_path: Path) -> None:
    import transformers

    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(**TINY, intermediate_size=64, vocab_size=99)
    )
    source = _save(text, tmp_path / "text")
    with pytest.raises(ConfigError, match="model_type='clip_text_model' is CLIP's text tower"):
        convert(source, tmp_path / "out", progress=False)
    beit = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**beit, "model_type": "beit"}))
    with pytest.raises(ConfigError, match="model_type='beit' is not a model this converter"):
        convert(source, tmp_path / "out", progress=False)


def test_config_that_contradicts_the_source_weights_is_refused(oracle: Any, tmp_path: Path) -> None:
    """config.json's switches are checked against the tensors before anything is written;
    a weights file handed alone (no config.json) is refused, naming its family."""
    _, _, source = make_source(tmp_path, "dinov2-swiglu")
    data = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**data, "use_swiglu_ffn": False}))
    with pytest.raises(CheckpointError, match=r"use_swiglu_ffn=False, but .*mlp\.weights_in"):
        convert(source, tmp_path / "out", progress=False)
    (source / "config.json").write_text(json.dumps({**data, "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="hidden_size=64, but the weights have 32"):
        convert(source, tmp_path / "out", progress=False)
    _, _, source = make_source(tmp_path, "dinov2-registers")
    with pytest.raises(ConfigError, match="no_embed_class"):  # the weights decide it
        convert(source, tmp_path / "out", overrides={"no_embed_class": False}, progress=False)
    (source / "config.json").unlink()
    with pytest.raises(CheckpointError, match="DINOv2 checkpoint .* without its config.json"):
        convert(source / "model.safetensors", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_converted_switches_that_contradict_the_weights_fail_at_load(
    oracle: Any, tmp_path: Path
) -> None:
    """A converted folder whose config.json is edited afterwards: load names the key."""
    _, _, source = make_source(tmp_path, "dinov2")
    out = tmp_path / "out"
    convert(source, out, progress=False)
    config = json.loads((out / "config.json").read_text())
    edits = {
        "num_register_tokens": (2, "embeddings.register_tokens"),
        "layerscale_value": (None, "layer_scale1.lambda1"),
        "use_pre_norm": (True, "pre_layrnorm.weight"),
    }
    for field, (value, key) in edits.items():
        (out / "config.json").write_text(json.dumps({**config, field: value}))
        for backend in BACKENDS:
            with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
                load(out, backend)
