"""`vit_core.checkpoint.read_tensors`: checked tensors leave this process's memory until
something reads them again (what lets an int8 model keep no float copy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from vit_core.checkpoint import check_finite, read_tensors
from vit_core.errors import CheckpointError


def _resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_read_tensors_checks_every_value_and_keeps_none_resident(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stored = {"big": rng.standard_normal((4096, 4096), np.float32), "small": np.ones(3, np.float32)}
    save_file(stored, tmp_path / "t.safetensors")
    del rng
    before = _resident_mib()
    tensors = read_tensors(tmp_path / "t.safetensors")  # reads all 64 MiB to check them
    after = _resident_mib()
    assert after - before < 32, (before, after)  # the file is 64 MiB; the checks allocate
    np.testing.assert_array_equal(tensors["big"], stored["big"])  # read again from the file
    np.testing.assert_array_equal(tensors["small"], stored["small"])


def test_check_finite_hands_each_tensor_on_once_checked() -> None:
    tensors: dict[str, np.ndarray] = {
        "a": np.ones(4, np.float32),
        "b": np.zeros((2, 2), np.float16),
    }
    checked: list[np.ndarray] = []
    check_finite(tensors, "here", checked=checked.append)
    assert [id(t) for t in checked] == [id(t) for t in tensors.values()]
    with pytest.raises(CheckpointError, match="1 NaN of 4 values"):
        check_finite({"a": np.array([1, np.nan, 2, 3], np.float32)}, "here", checked=print)
