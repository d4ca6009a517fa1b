"""What the source readers share: telling a container by its first bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from conversion.sources import sniff
from vit_core.safetensors_header import MAX_HEADER_BYTES


@pytest.mark.parametrize(
    ("header_bytes", "expected"),
    [(MAX_HEADER_BYTES, "safetensors"), (MAX_HEADER_BYTES + 1, "unknown")],
)
def test_sniff_uses_the_loaders_header_limit(
    tmp_path: Path, header_bytes: int, expected: str
) -> None:
    """One limit on a safetensors header (the library's 100,000,000 bytes) for both the
    converter's sniffing and the loader's check: a file one is past it is not claimed."""
    path = tmp_path / "weights"
    path.write_bytes(struct.pack("<Q", header_bytes) + b'{"a": 1}')
    assert sniff(path) == expected
