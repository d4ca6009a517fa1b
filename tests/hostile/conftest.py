"""Shared pieces of the hostile-input tests: a tiny valid model, and raw file builders.

Everything here is offered through one fixture, `kit` (see `Kit`), because test modules
are imported side by side (`--import-mode=importlib`) and cannot import each other.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save
from vit_test_support import tiny_config

from vit_core.layout import WEIGHTS_NAME, ModelKind, expected_shapes

CONFIG = tiny_config(image_size=16, patch_size=8)
CLASSIFIER = ModelKind(classifier=True, pooler=False)


class Kit:
    """A tiny classification ViT (canonical tensors + config) and ways to write it."""

    CONFIG = CONFIG
    KIND = CLASSIFIER

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    @staticmethod
    def tensors(seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        shapes = expected_shapes(CONFIG, CLASSIFIER)
        return {k: rng.standard_normal(s).astype(np.float32) for k, s in sorted(shapes.items())}

    @staticmethod
    def config_dict(**changes: Any) -> dict[str, Any]:
        data = CONFIG.to_dict()
        data.update(changes)
        return {k: v for k, v in data.items() if v is not ...}

    @staticmethod
    def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
        return save(tensors, metadata={"format": "pt"})

    @staticmethod
    def raw_safetensors(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
        """A file from a header object (or raw header bytes) and data, length computed
        unless given."""
        raw = header if isinstance(header, bytes) else json.dumps(header).encode()
        return struct.pack("<Q", len(raw) if length is None else length) + raw + data

    @staticmethod
    def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
        """(header object, data bytes) of a safetensors file's bytes."""
        (length,) = struct.unpack("<Q", blob[:8])
        return json.loads(blob[8 : 8 + length]), blob[8 + length :]

    def folder(
        self,
        name: str = "model",
        tensors: dict[str, np.ndarray] | None = None,
        weights: bytes | None = None,
        config: dict[str, Any] | str | bytes | None = None,
    ) -> Path:
        """A model folder: the tiny model, or the given tensors / raw weight bytes / config
        (a dict is written as JSON, str/bytes as they are)."""
        folder = self.tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        if weights is None:
            weights = self.safetensors_bytes(self.tensors() if tensors is None else tensors)
        (folder / WEIGHTS_NAME).write_bytes(weights)
        config = self.config_dict() if config is None else config
        if isinstance(config, dict):
            config = json.dumps(config)
        if isinstance(config, str):
            config = config.encode()
        (folder / "config.json").write_bytes(config)
        return folder


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)
