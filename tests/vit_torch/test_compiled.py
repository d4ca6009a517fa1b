"""`load(..., compile=True)`: torch.compile with frozen weights gives the eager numbers.

Each compile of these small models takes seconds, so the tests share a few models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from vit_test_support import (
    SHIPPED,
    record_max_diff,
    tiny_config,
    training_digits,
    write_folder,
)

import vit_core
import vit_torch.compiled
from vit_core.layout import ModelKind
from vit_torch.backend import run
from vit_torch.compiled import CompiledViT

BOUND = 1e-5


@pytest.fixture(scope="module")
def compiled() -> CompiledViT:
    return vit_core.load(SHIPPED, compile=True)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return training_digits(6)[0]


def test_compiled_logits_match_eager_at_each_batch_size(
    compiled: CompiledViT, digits: np.ndarray
) -> None:
    eager = vit_core.load(SHIPPED)
    for batch in (6, 1):  # two shapes: two compiles, each cached
        pixels = digits[:batch]
        diff = np.abs(run(compiled, pixels)["logits"] - run(eager, pixels)["logits"]).max()
        record_max_diff(f"compiled torch vs eager, digits: logits, batch {batch}", diff)
        assert diff < BOUND
    assert compiled._shapes == {(6, 3, 8, 8), (1, 3, 8, 8)}


def test_calls_for_more_than_the_outputs_run_the_eager_model(
    compiled: CompiledViT, digits: np.ndarray
) -> None:
    eager = vit_core.load(SHIPPED)
    ours = run(compiled, digits, output_attentions=True, output_hidden_states=True)
    want = run(eager, digits, output_attentions=True, output_hidden_states=True)
    for name in ("attentions", "hidden_states"):
        assert len(ours[name]) == len(want[name])
        for a, b in zip(ours[name], want[name], strict=True):
            np.testing.assert_array_equal(a, b)
    labels = torch.zeros(len(digits), dtype=torch.long)
    assert compiled(torch.from_numpy(digits), labels=labels).loss is not None


def test_a_family_base_model_compiles_to_the_same_outputs(tmp_path: Path) -> None:
    config = tiny_config(
        pooling_type="map", num_register_tokens=2, layerscale_value=0.3, use_swiglu_ffn=True
    )
    kind = ModelKind(classifier=False, pooler=False)
    write_folder(tmp_path, config, kind, seed=3)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 8, 8), dtype=np.float32)
    ours = run(vit_core.load(tmp_path, compile=True), pixels)
    want = run(vit_core.load(tmp_path), pixels)
    assert ours.keys() == want.keys() == {"last_hidden_state", "pooler_output"}
    for name, value in want.items():
        diff = np.abs(ours[name] - value).max()
        record_max_diff(f"compiled torch vs eager, MAP + registers + SwiGLU: {name}", diff)
        assert diff < BOUND


def test_past_its_shape_bound_a_model_runs_eagerly_with_a_warning(
    compiled: CompiledViT, digits: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vit_torch.compiled, "MAX_COMPILED_SHAPES", len(compiled._shapes))
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        logits = run(compiled, digits[:3])["logits"]
    np.testing.assert_array_equal(logits, run(compiled.model, digits[:3])["logits"])


def test_a_compiled_model_saves_its_eager_weights(compiled: CompiledViT, tmp_path: Path) -> None:
    compiled.save_pretrained(tmp_path / "again")
    saved = vit_core.load(tmp_path / "again")
    for a, b in zip(saved.state_dict().values(), compiled.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compile": True, "quantize": "int8"}, "cannot be combined with it"),
        ({"compile": "yes"}, "takes True or False"),
        ({"compile": True, "backend": "flax"}, "flax backend is always compiled"),
    ],
)
def test_compile_refuses_what_it_cannot_do(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(vit_core.ViTError, match=message):
        vit_core.load(SHIPPED, **kwargs)


def test_compile_false_is_the_default_on_either_backend() -> None:
    assert vit_core.load(SHIPPED, backend="flax", compile=False) is not None


def test_compile_without_a_compiler_says_so_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._inductor import cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no g++ on PATH")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(vit_core.ViTError, match="found no C\\+\\+ compiler .no g\\+\\+ on PATH"):
        vit_core.load(SHIPPED, compile=True)
