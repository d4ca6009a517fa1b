"""The twins compute the same function from the same file: property-based, float32, <= 1e-5.

Each example draws a small architecture, writes random canonical weights straight to a
safetensors folder (neither twin writes it), loads the folder in both backends and
compares every output: logits or last_hidden_state, pooler_output, each hidden state
and each attention map.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from vit_test_support import architectures, record_max_diff, write_folder

from vit_core import ViTConfig, load
from vit_core.layout import WEIGHTS_NAME, ModelKind

ATOL = 1e-5


def _outputs(out: object) -> dict[str, np.ndarray]:
    """Every tensor of an output record, flattened to named numpy arrays."""
    flat = {}
    for name in out:  # type: ignore[attr-defined]
        value = getattr(out, name)
        for i, item in enumerate(value if isinstance(value, tuple) else (value,)):
            array = item.detach().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
            flat[f"{name}[{i}]"] = array
    return flat


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architecture=architectures(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_twins_agree_on_every_output(
    architecture: tuple[ViTConfig, ModelKind], batch: int, seed: int
) -> None:
    config, kind = architecture
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_folder(folder, config, kind, seed)
        model_type = "classification" if kind.classifier else "base"
        torch_model = load(folder, backend="torch", model_type=model_type)
        flax_model = load(folder, backend="flax", model_type=model_type)
    pixels = np.random.default_rng(seed).standard_normal(
        (batch, config.num_channels, *config.image_hw), dtype=np.float32
    )
    flags = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        expected = _outputs(torch_model(torch.from_numpy(pixels), **flags))
        fused_path = _outputs(torch_model(torch.from_numpy(pixels)))  # SDPA, no attentions
    actual = _outputs(flax_model(pixels, **flags))
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert value.shape == actual[name].shape, name
        diff = float(np.abs(value - actual[name]).max())
        record_max_diff("twins: torch vs flax, every output (hypothesis)", diff)
        assert diff <= ATOL, f"{name}: max abs diff {diff:.3g} > {ATOL} for {config}"
    for name, value in fused_path.items():
        diff = float(np.abs(value - actual[name]).max())
        record_max_diff("twins: torch (SDPA) vs flax (hypothesis)", diff)
        assert diff <= ATOL, f"{name} (SDPA path): max abs diff {diff:.3g}"


@pytest.mark.parametrize("source", ["torch", "flax"])
def test_folder_round_trips_between_backends(tmp_path: Path, source: str) -> None:
    """Saved from one backend, loaded in the other, saved again: identical bytes of weights."""
    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=(8, 12),
        patch_size=4,
        num_labels=3,
    )
    kind = ModelKind(classifier=True, pooler=False)
    (tmp_path / "a").mkdir()
    write_folder(tmp_path / "a", config, kind, seed=1)
    other = "flax" if source == "torch" else "torch"
    load(tmp_path / "a", backend=source).save_pretrained(tmp_path / "b")
    load(tmp_path / "b", backend=other).save_pretrained(tmp_path / "c")
    first, last = load_file(tmp_path / "a" / WEIGHTS_NAME), load_file(tmp_path / "c" / WEIGHTS_NAME)
    assert first.keys() == last.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], last[key], err_msg=key)
    assert ViTConfig.from_pretrained(tmp_path / "c").to_dict() == {
        **config.to_dict(),
        "architectures": ["ViTForImageClassification"],
    }
