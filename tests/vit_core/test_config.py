"""ViTConfig: transformers' field names and defaults, JSON round trips, presets, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from vit_core import ConfigError, ViTConfig, ViTError
from vit_core.config import EXTENSION_FIELDS, TRAINING_FIELDS


def test_defaults_equal_transformers() -> None:
    ours = json.loads(ViTConfig().to_json_string())
    theirs = json.loads(transformers.ViTConfig().to_json_string(use_diff=False))
    for key, value in ours.items():
        if key in EXTENSION_FIELDS or key in TRAINING_FIELDS:
            continue
        assert theirs[key] == value, key
    hf_only = set(theirs) - set(ours)
    # PretrainedConfig's generic bookkeeping (generation, tokenizers, ...) is not ViT's.
    assert {"hidden_size", "layer_norm_eps", "qkv_bias", "encoder_stride"}.isdisjoint(hf_only)


def test_reads_transformers_config_and_keeps_unknown_keys(tmp_path: Path) -> None:
    hf = transformers.ViTConfig(
        hidden_size=64,
        num_attention_heads=4,
        image_size=(32, 48),
        patch_size=8,
        id2label={0: "cat", 1: "dog", 2: "fish"},
        label2id={"cat": 0, "dog": 1, "fish": 2},
    )
    hf.save_pretrained(tmp_path)
    ours = ViTConfig.from_pretrained(tmp_path)
    assert ours.image_hw == (32, 48) and ours.grid_hw == (4, 6) and ours.num_positions == 25
    assert ours.num_labels == 3 and ours.id2label[1] == "dog" and ours.label2id["fish"] == 2
    assert ours.extra["transformers_version"] == transformers.__version__
    ours.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["transformers_version"] == transformers.__version__  # kept, not dropped
    back = transformers.ViTConfig.from_pretrained(tmp_path / "again")
    assert back.id2label == hf.id2label and list(back.image_size) == [32, 48]


def test_json_round_trip_is_exact() -> None:
    config = ViTConfig.from_name("vit-small-patch14-518", num_labels=4, pooling_type="cls")
    config.extra["custom"] = {"nested": [1, 2]}
    assert ViTConfig.from_dict(json.loads(config.to_json_string())) == config


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vit-base-patch16-224", (768, 12, 12, 3072, 16, (224, 224))),
        ("vit-large-patch32-384", (1024, 24, 16, 4096, 32, (384, 384))),
        ("vit_tiny_patch8_96", (192, 12, 3, 768, 8, (96, 96))),
        ("vit-huge-patch14-224", (1280, 32, 16, 5120, 14, (224, 224))),
    ],
)
def test_presets(name: str, expected: tuple[object, ...]) -> None:
    c = ViTConfig.from_name(name)
    assert (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size,
        c.patch_size,
        c.image_hw,
    ) == expected


def test_preset_matches_hub_config_of_that_name() -> None:
    """google/vit-base-patch16-224's config.json fields (the hub's, typed from its card)."""
    hub = transformers.ViTConfig(hidden_size=768, image_size=224, patch_size=16)
    ours = ViTConfig.from_name("vit-base-patch16-224")
    for key in ("hidden_size", "intermediate_size", "layer_norm_eps", "hidden_act", "qkv_bias"):
        assert getattr(ours, key) == getattr(hub, key), key


@pytest.mark.parametrize(
    "name", ["vit-base-patch16", "vit-gigantic-patch16-224", "vit-base-patch15-224", "resnet50"]
)
def test_bad_preset_name_lists_valid_ones(name: str) -> None:
    with pytest.raises(ConfigError, match="valid names: vit-\\{tiny\\|small\\|base"):
        ViTConfig.from_name(name)


def test_preset_resolution_must_divide() -> None:
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        ViTConfig.from_name("vit-base-patch16-225")


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"hidden_size": 100, "num_attention_heads": 12}, "not divisible by num_attention_heads"),
        ({"image_size": 225}, "not a multiple of patch_size"),
        ({"image_size": (224, 230)}, "not a multiple of patch_size"),
        ({"hidden_size": 0}, "hidden_size must be a positive int"),
        ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive int"),
        ({"hidden_act": "gelu_magic"}, "hidden_act='gelu_magic' is not supported"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
        ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob must be in"),
        ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\); got 1.0"),
        ({"drop_path_rate": -0.1}, "drop_path_rate must be in"),
        ({"image_size": "big"}, r"image_size must be a positive int or \[height, width\]"),
        ({"num_labels": 3, "id2label": {0: "a", 1: "b"}}, "num_labels=3 but id2label has 2"),
        ({"id2label": {0: "a", 2: "b"}}, "id2label keys must be 0..1"),
        ({"id2label": {0: "a", 1: "b"}, "label2id": {"a": 1, "b": 0}}, "label2id\\['a'\\] = 1"),
        ({"pooling_type": "max"}, "pooling_type='max'"),
        ({"use_class_token": False}, "use_class_token=False needs pooling_type='mean'"),
        ({"problem_type": "ranking"}, "problem_type='ranking'"),
    ],
)
def test_validation_names_the_field(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        ViTConfig(**fields)  # type: ignore[arg-type]


def test_drop_path_rate_round_trips_and_leaves_the_inference_function_alone(
    tmp_path: Path,
) -> None:
    """A training field: written and read back (here and by transformers, which keeps it as
    an attribute), and no departure from transformers' ViT (`transformers_compatible`)."""
    config = ViTConfig(num_hidden_layers=4, drop_path_rate=0.3)
    assert ViTConfig.from_dict(json.loads(config.to_json_string())) == config
    config.save_pretrained(tmp_path)
    assert ViTConfig.from_pretrained(tmp_path).drop_path_rate == 0.3
    assert transformers.ViTConfig.from_pretrained(tmp_path).drop_path_rate == 0.3
    assert config.transformers_compatible
    assert config.drop_path_rates == pytest.approx((0.0, 0.1, 0.2, 0.3))
    assert ViTConfig(num_hidden_layers=1, drop_path_rate=0.3).drop_path_rates == (0.0,)
    assert ViTConfig().drop_path_rates == (0.0,) * 12


def test_imagenet_label_set_with_repeated_names_is_accepted() -> None:
    """ImageNet-1k names two classes 'crane'; label2id cannot be id2label's inverse there."""
    config = ViTConfig(
        id2label={0: "crane", 1: "crane", 2: "kite"}, label2id={"crane": 1, "kite": 2}
    )
    assert config.num_labels == 3


def test_bad_json_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{path}: not valid JSON"):
        ViTConfig.from_json_file(path)
    path.write_text(json.dumps({"model_type": "deit", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type='deit'"):
        ViTConfig.from_json_file(path)
    path.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 5}))
    with pytest.raises(ConfigError, match=f"{path}: .*not divisible"):
        ViTConfig.from_json_file(path)


def test_hub_id_is_refused_with_advice() -> None:
    with pytest.raises(ViTError, match="never downloads"):
        ViTConfig.from_pretrained("google/vit-base-patch16-224")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("qkv_bias", "false", "qkv_bias must be true or false; got 'false'"),
        ("layer_norm_eps", "1e-6", "layer_norm_eps must be a finite number"),
        ("encoder_stride", 16.0, "encoder_stride must be a positive int"),
        ("architectures", "ViTModel", "architectures must be a list of strings"),
    ],
)
def test_one_reader_for_from_pretrained_load_and_construction(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    """`"qkv_bias": "false"` (a string Python takes as true) is refused alike by
    `from_pretrained`, by `vit_core.load` and by `ViTConfig(...)`: the field types are
    checked from the dataclass annotations, in one place."""
    from vit_test_support import tiny_config

    import vit_core

    data = {**tiny_config().to_dict(), field: value}
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the config fails first
    for read in (ViTConfig.from_pretrained, vit_core.load):
        with pytest.raises(ConfigError, match=message) as info:
            read(tmp_path)
        assert str(tmp_path / "config.json") in str(info.value)
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{field: value})
