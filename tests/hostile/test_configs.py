"""Broken configs: each is a `ConfigError` at load, naming config.json and the field.

`CASES` is the config part of the bad-input corpus. The weights beside each config are
the valid tiny model, so every error here is the config's, raised by `vit_core.load`
before any tensor is read or any framework imported (never at the first forward pass).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vit_core import ConfigError, ViTConfig, load


def _fields(**changes: Any) -> Callable[[Any], Any]:
    return lambda kit: kit.config_dict(**changes)


def _text(text: str | bytes) -> Callable[[Any], Any]:
    return lambda kit: text


def _labels(n: int) -> dict[str, str]:
    return {str(i): f"c{i}" for i in range(n)}


# name -> (config.json content: dict, or raw text/bytes, message fragment)
CASES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "unknown_hidden_act": (
        _fields(hidden_act="swiglu"),
        r"hidden_act='swiglu' is not supported; choose one of gelu",
    ),
    "hidden_act_not_a_string": (_fields(hidden_act=["gelu"]), r"hidden_act must be a string"),
    "zero_width": (_fields(hidden_size=0), r"hidden_size must be a positive int; got 0"),
    "negative_heads": (_fields(num_attention_heads=-2), r"num_attention_heads must be a positive"),
    "negative_layers": (_fields(num_hidden_layers=-1), r"num_hidden_layers must be a positive"),
    "width_as_string": (
        _fields(intermediate_size="3072"),
        r"intermediate_size must be a positive int; got '3072'",
    ),
    "width_as_bool": (_fields(num_channels=True), r"num_channels must be a positive int"),
    "heads_do_not_divide_width": (
        _fields(num_attention_heads=3),
        r"hidden_size=16 is not divisible by num_attention_heads=3",
    ),
    "image_not_a_multiple_of_patch": (
        _fields(image_size=20),
        r"image_size=\(20, 20\) is not a multiple of patch_size=\(8, 8\)",
    ),
    "zero_patch": (
        _fields(patch_size=0),
        r"patch_size must be a positive int or \[height, width\]",
    ),
    "image_size_of_one_value": (_fields(image_size=[224]), r"image_size must be a positive int or"),
    "num_labels_disagrees_with_id2label": (
        _fields(num_labels=5, id2label=_labels(3), label2id=...),
        r"num_labels=5 but id2label has 3 entries",
    ),
    "label2id_disagrees_with_id2label": (
        _fields(id2label=_labels(3), label2id={"c0": 1, "c1": 0, "c2": 2}),
        r"label2id\['c0'\] = 1, but id2label\[1\] = 'c1'; make the two label maps agree",
    ),
    "id2label_with_a_hole": (
        _fields(id2label={"0": "a", "1": "b", "5": "c"}, label2id=...),
        r"id2label keys must be 0\.\.2; got \[0, 1, 5\]",
    ),
    "id2label_as_a_list": (
        _fields(id2label=["a", "b", "c"], label2id=...),
        r'id2label must be an object of "index": "name" strings',
    ),
    "id2label_with_word_keys": (
        _fields(id2label={"cat": "0"}, label2id=...),
        r"id2label must be an object",
    ),
    "negative_num_labels": (_fields(num_labels=-1, id2label=..., label2id=...), r"an int >= 0"),
    "absurd_num_labels": (
        _fields(num_labels=10**9, id2label=..., label2id=...),
        r"num_labels must be at most 1,000,000; got 1000000000",
    ),
    "bool_as_string": (_fields(qkv_bias="false"), r"qkv_bias must be true or false; got 'false'"),
    "eps_is_nan": (_text('{"layer_norm_eps": NaN}'), r"layer_norm_eps must be a finite number"),
    "eps_is_zero": (_fields(layer_norm_eps=0), r"layer_norm_eps must be > 0"),
    "dropout_above_one": (_fields(hidden_dropout_prob=1.5), r"must be in \[0, 1\); got 1\.5"),
    "no_class_token_with_cls_pooling": (
        _fields(use_class_token=False),
        r"use_class_token=False needs pooling_type='mean'",
    ),
    "another_model_type": (_fields(model_type="bert"), r"model_type='bert'; this package reads"),
    "architectures_not_a_list": (_fields(architectures="ViTModel"), r"architectures must be a"),
    "not_json": (_text("{hidden_size: 768"), r"not valid JSON"),
    "json_list": (_text("[1, 2, 3]"), r"expected a JSON object, found list"),
    "duplicate_key": (
        _text('{"hidden_size": 16, "hidden_size": 768}'),
        r"the key 'hidden_size' appears twice",
    ),
    "not_utf8": (_text(b'{"hidden_act": "\xff"}'), r"not valid JSON \(not UTF-8 text"),
    "nested_too_deep": (_text("[" * 100_000 + "]" * 100_000), r"nested too deeply"),
    "empty_file": (_text(""), r"not valid JSON"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_config(kit: Any, name: str) -> None:
    content, fragment = CASES[name]
    folder = kit.folder(config=content(kit))
    with pytest.raises(ConfigError, match=fragment) as info:
        load(folder)
    assert str(folder / "config.json") in str(info.value)


def test_config_json_that_is_a_folder(kit: Any) -> None:
    folder = kit.folder()
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(ConfigError, match="no config.json beside it"):
        load(folder)


def test_config_file_too_large(kit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vit_core import _io

    monkeypatch.setattr(_io, "MAX_JSON_BYTES", 100)
    folder = kit.folder()
    with pytest.raises(ConfigError, match=r"bytes is too large for a config file \(limit 100\)"):
        load(folder)


def test_errors_come_before_any_framework(kit: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad config never reaches the backend: no backend (framework) is even imported."""
    from vit_core import loading

    def never(*args: Any) -> None:
        raise AssertionError("a backend was asked for with a bad config")

    monkeypatch.setattr(loading, "get_backend", never)
    for name in ("unknown_hidden_act", "heads_do_not_divide_width", "bool_as_string"):
        content, fragment = CASES[name]
        with pytest.raises(ConfigError, match=fragment):
            load(kit.folder(name=name, config=content(kit)))


def test_the_same_checks_guard_direct_construction() -> None:
    """`ViTConfig(...)` itself validates, so a config built in code fails at once too."""
    with pytest.raises(ConfigError, match="not divisible"):
        ViTConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ConfigError, match="not a multiple"):
        ViTConfig(image_size=30, patch_size=16)
    with pytest.raises(ConfigError, match="not supported"):
        ViTConfig(hidden_act="mish")


def test_a_valid_config_with_unknown_keys_still_loads(kit: Any) -> None:
    """The checks refuse wrong values, not additions: unknown keys are kept."""
    model_folder = kit.folder(config=kit.config_dict(my_note="hello", torch_dtype="float32"))
    config = ViTConfig.from_pretrained(model_folder)
    assert config.extra["my_note"] == "hello"
    assert json.loads((Path(model_folder) / "config.json").read_text())["my_note"] == "hello"
