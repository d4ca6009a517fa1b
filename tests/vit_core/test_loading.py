"""`vit_core.load`: strict checks with errors that name the cause, dispatch, lazy frameworks."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from vit_test_support import tiny_config

from vit_core import CheckpointError, ConfigError, LayoutError, ViTConfig, load
from vit_core.checkpoint import map_tensors, release_pages
from vit_core.layout import WEIGHTS_NAME, ModelKind, expected_shapes
from vit_core.safetensors_header import read_header

CONFIG = tiny_config(image_size=16, patch_size=8)


def write(folder: Path, tensors: dict[str, np.ndarray], config: ViTConfig = CONFIG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_NAME, {"format": "pt"})
    config.save_pretrained(folder)
    return folder


CLASSIFIER = ModelKind(classifier=True, pooler=False)


def tensors(kind: ModelKind = CLASSIFIER) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = expected_shapes(CONFIG, kind)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_auto_picks_model_by_keys(tmp_path: Path, backend: str) -> None:
    classifier = load(write(tmp_path / "c", tensors()), backend=backend)
    base = load(write(tmp_path / "b", tensors(ModelKind(False, True))), backend=backend)
    assert type(classifier).__name__.endswith("ViTForImageClassification")
    assert type(base).__name__.endswith("ViTModel")
    encoder_only = load(tmp_path / "c", backend=backend, model_type="base")
    assert type(encoder_only).__name__.endswith("ViTModel")


def test_torch_model_is_ready_for_inference(tmp_path: Path) -> None:
    model = load(write(tmp_path, tensors()))
    assert not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_single_safetensors_file_with_config_beside_it(tmp_path: Path) -> None:
    write(tmp_path, tensors())
    assert load(tmp_path / WEIGHTS_NAME).config.num_labels == 3


def test_dtype_casts_weights(tmp_path: Path) -> None:
    import torch

    model = load(write(tmp_path, tensors()), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_extra_and_misshaped_keys_are_each_named(tmp_path: Path) -> None:
    broken = tensors()
    del broken["vit.encoder.layer.1.output.dense.bias"]
    broken["vit.encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
    broken["vit.embeddings.position_embeddings"] = np.zeros((1, 7, 16), np.float32)
    with pytest.raises(LayoutError) as error:
        load(write(tmp_path, broken))
    message = str(error.value)
    assert str(tmp_path / WEIGHTS_NAME) in message
    assert "missing keys (1): vit.encoder.layer.1.output.dense.bias" in message
    assert "unexpected keys (1): vit.encoder.layer.0.extra.weight" in message
    assert "vit.embeddings.position_embeddings: expected (1, 5, 16), found (1, 7, 16)" in message


def test_config_that_contradicts_the_weights(tmp_path: Path) -> None:
    contradicting = dataclasses.replace(CONFIG, num_hidden_layers=3)
    with pytest.raises(LayoutError, match="layers=3.*missing keys.*encoder.layer.2"):
        load(write(tmp_path, tensors(), contradicting))


def test_classification_asked_of_a_base_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="has no classifier head"):
        load(write(tmp_path, tensors(ModelKind(False, False))), model_type="classification")


def test_unknown_backend_and_model_type(tmp_path: Path) -> None:
    write(tmp_path, tensors())
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'; choose one of torch, flax"):
        load(tmp_path, backend="tensorflow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown model_type 'detector'"):
        load(tmp_path, model_type="detector")  # type: ignore[arg-type]


def test_folder_without_weights_points_to_conversion(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="python -m conversion"):
        load(tmp_path)


def test_missing_config(tmp_path: Path) -> None:
    save_file(tensors(), tmp_path / WEIGHTS_NAME)
    with pytest.raises(ConfigError, match="no config.json beside it"):
        load(tmp_path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    write(tmp_path, tensors())
    (tmp_path / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load(tmp_path)


def test_hub_id_is_never_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an empty cache, whatever this machine's holds (tests/vit_core/test_hub.py: full cases)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        CheckpointError, match="not in the local Hugging Face cache.*never downloads"
    ):
        load("google/vit-base-patch16-224")


def test_save_pretrained_writes_transformers_metadata(tmp_path: Path) -> None:
    load(write(tmp_path / "a", tensors()), backend="flax").save_pretrained(tmp_path / "b")
    assert load_file(tmp_path / "b" / WEIGHTS_NAME).keys() == tensors().keys()
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["architectures"] == ["ViTForImageClassification"]
    assert not list((tmp_path / "b").glob("*.tmp"))  # no temp files left behind


def test_import_needs_no_framework(tmp_path: Path) -> None:
    """With torch and jax made unimportable, the core still reads configs and weights."""
    write(tmp_path, tensors())
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "jax", "jaxlib", "flax"):
            raise ImportError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Block())
import vit_core
from vit_core import ViTConfig, load
assert ViTConfig.from_pretrained({str(tmp_path)!r}).num_labels == 3
try:
    load({str(tmp_path)!r}, backend="flax")
except ImportError as exc:
    assert "pip install 'vit-twin[flax]'" in str(exc), exc
else:
    raise AssertionError("load without jax should fail")
assert not any(m.split(".")[0] in ("torch", "jax") for m in sys.modules)
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr


def _resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_release_pages_gives_a_mapped_tensors_memory_back(tmp_path: Path) -> None:
    """What `load` does to query/key/value once fused: their pages leave the process's
    resident memory, the mapping still reads the file's values, and other tensors stay."""
    rng = np.random.default_rng(0)
    stored = {"big": rng.standard_normal((4096, 4096), np.float32), "small": np.ones(3, np.float32)}
    save_file(stored, tmp_path / "t.safetensors")
    tensors = map_tensors(read_header(tmp_path / "t.safetensors"))
    before = _resident_mib()
    assert float(tensors["big"].sum()) == pytest.approx(float(stored["big"].sum()), rel=1e-4)
    touched = _resident_mib()
    release_pages(tensors["big"])
    released = _resident_mib()
    assert touched - before > 56 and touched - released > 56, (before, touched, released)
    np.testing.assert_array_equal(tensors["big"], stored["big"])  # read again from the file
    release_pages(stored["small"])  # not mapped: left alone
    np.testing.assert_array_equal(tensors["small"], stored["small"])
