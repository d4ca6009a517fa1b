"""Fuzzing: mutated checkpoint bytes raise the package's own errors, and nothing else.

hypothesis derives files from valid tiny checkpoints by truncating them, overwriting
bytes (in the safetensors header, or anywhere), and rewriting header entries with
random names, shapes, dtypes and offsets. Each file goes to a loader:

- `vit_core.load` on a model folder (the framework build is stubbed out: what is under
  test is reading and checking, which all happens before it);
- the conversion readers, through detection, on timm `.pth` and `.safetensors` files
  and a JAX `.npz`.

A loader may accept a mutated file (a flipped mantissa bit is still a float) or refuse
it with a `ViTError`; any other exception fails the test. Examples are bounded and
derandomised so the suite stays fast and repeatable; `FUZZ_EXAMPLES` scales them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import struct
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save
from vit_test_support import tiny_config

from vit_core import ViTError, load
from vit_core import loading as vit_loading
from vit_core.layout import WEIGHTS_NAME, ModelKind, expected_shapes
from vit_core.safetensors_header import DTYPE_BITS

SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
CONFIG = tiny_config(hidden_size=8, num_hidden_layers=1, intermediate_size=16, num_labels=2)


def _settings(examples: int) -> Any:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the raw example is printed
    )


# ------------------------------------------------------------------ valid sources
def _canonical() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = expected_shapes(CONFIG, ModelKind(classifier=True, pooler=False))
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in sorted(shapes.items())}


def _timm() -> dict[str, np.ndarray]:
    d, i, p = 8, 16, 4
    rng = np.random.default_rng(1)
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 5, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
        "head.weight": (2, d),
        "head.bias": (2,),
    }
    for name, shape in {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d),
        "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d),
        "attn.proj.bias": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        "mlp.fc1.weight": (i, d),
        "mlp.fc1.bias": (i,),
        "mlp.fc2.weight": (d, i),
        "mlp.fc2.bias": (d,),
    }.items():
        shapes[f"blocks.0.{name}"] = shape
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _jax() -> dict[str, np.ndarray]:
    sd, d, h = _timm(), 8, 2
    top = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    b, p = "Transformer/encoderblock_0/", "blocks.0."
    top.update(
        {
            b + "LayerNorm_0/scale": sd[p + "norm1.weight"],
            b + "LayerNorm_0/bias": sd[p + "norm1.bias"],
            b + "LayerNorm_2/scale": sd[p + "norm2.weight"],
            b + "LayerNorm_2/bias": sd[p + "norm2.bias"],
            b + "MultiHeadDotProductAttention_1/out/kernel": sd[p + "attn.proj.weight"]
            .reshape(d, h, d // h)
            .transpose(1, 2, 0),
            b + "MultiHeadDotProductAttention_1/out/bias": sd[p + "attn.proj.bias"],
        }
    )
    weights, biases = np.split(sd[p + "attn.qkv.weight"], 3), np.split(sd[p + "attn.qkv.bias"], 3)
    for name, w, bias in zip(("query", "key", "value"), weights, biases, strict=True):
        top[f"{b}MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(d, h, d // h)
        top[f"{b}MultiHeadDotProductAttention_1/{name}/bias"] = bias.reshape(h, d // h)
    for r in range(2):
        top[f"{b}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{p}mlp.fc{r + 1}.weight"].T
        top[f"{b}MlpBlock_3/Dense_{r}/bias"] = sd[f"{p}mlp.fc{r + 1}.bias"]
    return {k: np.ascontiguousarray(v) for k, v in top.items()}


def _pth_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


SAFETENSORS = save(_canonical(), metadata={"format": "pt"})
CONFIG_JSON = CONFIG.to_json_string().encode()


# ------------------------------------------------------------------ mutations
def _header_end(blob: bytes) -> int:
    (length,) = struct.unpack("<Q", blob[:8])
    return min(len(blob), 8 + length)


@st.composite
def _structured(draw: st.DrawFn, blob: bytes) -> bytes:
    """The header parsed, one entry rewritten at random, the file put back together."""
    end = _header_end(blob)
    header = json.loads(blob[8:end])
    names = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(names))
    ints = st.integers(min_value=-3, max_value=2**40) | st.integers(0, 64)
    choice = draw(st.sampled_from(["name", "shape", "dtype", "offsets", "drop", "entry", "meta"]))
    if choice == "name":
        header[draw(st.text(max_size=40))] = header.pop(key)
    elif choice == "shape":
        header[key]["shape"] = draw(st.lists(ints, max_size=5))
    elif choice == "dtype":
        header[key]["dtype"] = draw(st.sampled_from(sorted(DTYPE_BITS)) | st.text(max_size=6))
    elif choice == "offsets":
        header[key]["data_offsets"] = draw(st.lists(ints, min_size=0, max_size=3))
    elif choice == "drop":
        del header[key]
    elif choice == "entry":
        header[key] = draw(st.none() | st.integers() | st.text(max_size=5) | st.lists(ints))
    else:
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers(), max_size=3)
        )
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + blob[end:]


def _mutations(blob: bytes, header: bool) -> st.SearchStrategy[bytes]:
    """Truncations, overwritten bytes (in the header when there is one), restructured
    safetensors headers."""
    size = len(blob)
    limit = _header_end(blob) if header else min(size, 512)

    def overwrite(edits: list[tuple[int, int]]) -> bytes:
        data = bytearray(blob)
        for position, value in edits:
            data[position % size] = value
        return bytes(data)

    byte = st.integers(0, 255)
    strategies = [
        st.integers(0, size - 1).map(lambda n: blob[:n]),
        st.lists(st.tuples(st.integers(0, limit - 1), byte), min_size=1, max_size=6).map(overwrite),
        st.lists(st.tuples(st.integers(0, size - 1), byte), min_size=1, max_size=6).map(overwrite),
    ]
    if header:
        strategies.append(_structured(blob))
    return st.one_of(*strategies)


def _only_package_errors(call: Callable[[], Any]) -> None:
    with contextlib.suppress(ViTError):  # the package's own, clear refusal
        call()


# ------------------------------------------------------------------ vit_core.load
# A backend that builds nothing: the fuzzing is of the reading and checking, not of torch.
NO_MODEL = types.SimpleNamespace(
    check_options=lambda *a, **k: None,
    resolve_device=lambda *a, **k: None,
    build=lambda *a, **k: None,
)


@_settings(600)
@given(data=_mutations(SAFETENSORS, header=True))
def test_load_on_mutated_safetensors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / WEIGHTS_NAME).write_bytes(data)
        (folder / "config.json").write_bytes(CONFIG_JSON)
        with mock.patch.object(vit_loading, "get_backend", lambda name: NO_MODEL):
            _only_package_errors(lambda: load(folder))


@_settings(100)
@given(data=_mutations(CONFIG_JSON, header=False))
def test_load_on_mutated_config(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / WEIGHTS_NAME).write_bytes(SAFETENSORS)
        (folder / "config.json").write_bytes(data)
        with mock.patch.object(vit_loading, "get_backend", lambda name: NO_MODEL):
            _only_package_errors(lambda: load(folder))


# ------------------------------------------------------------------ conversion readers
def _convert_reader(name: str, data: bytes) -> None:
    from conversion.detect import detect

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)

        def read() -> None:
            _, reader = detect(path)
            reader.read(path, {"num_attention_heads": 2})

        _only_package_errors(read)


@functools.cache
def _pth_blob() -> bytes:
    return _pth_bytes(_timm())


def test_the_unmutated_sources_convert() -> None:
    """The starting points are valid, so what the fuzzers find is due to their mutations."""
    from conversion.detect import detect

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (
            ("vit.pth", _pth_bytes(_timm())),
            ("vit.safetensors", save(_timm())),
            ("vit.npz", _npz_bytes(_jax())),
        ):
            path = Path(tmp) / name
            path.write_bytes(data)
            kind, reader = detect(path)
            weights = reader.read(path, {"num_attention_heads": 2})
            assert weights.config["hidden_size"] == 8, kind


@_settings(120)
@given(data=st.data())
def test_conversion_on_mutated_pth(data: st.DataObject) -> None:
    _convert_reader("vit.pth", data.draw(_mutations(_pth_blob(), header=False)))


TIMM_SAFETENSORS = save(_timm())


@_settings(120)
@given(data=_mutations(TIMM_SAFETENSORS, header=True))
def test_conversion_on_mutated_safetensors(data: bytes) -> None:
    _convert_reader("vit.safetensors", data)


NPZ = _npz_bytes(_jax())


@_settings(120)
@given(data=_mutations(NPZ, header=False))
def test_conversion_on_mutated_npz(data: bytes) -> None:
    _convert_reader("vit.npz", data)


# ------------------------------------------------------------------ image files
def _image_bytes(fmt: str, mode: str) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(2).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    extra: dict[str, Any] = {}
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = 6  # an orientation to apply
        extra["exif"] = exif
    image.save(buffer, fmt, **extra)
    return buffer.getvalue()


IMAGES = {
    f"{fmt}-{mode}": (fmt.lower(), _image_bytes(fmt, mode))
    for fmt, mode in (
        ("PNG", "RGB"),
        ("PNG", "I;16"),
        ("PNG", "P"),
        ("JPEG", "RGB"),
        ("JPEG", "CMYK"),
        ("GIF", "P"),
        ("TIFF", "I;16"),
        ("BMP", "RGB"),
        ("PPM", "RGB"),
    )
}


@pytest.mark.parametrize("kind", IMAGES)
def test_image_files_mutated(kind: str) -> None:
    """Damaged image files: `open_image` + the processor raise `ImageError` or work."""
    import warnings

    from vit_core.processing import ViTImageProcessor, open_image

    suffix, blob = IMAGES[kind]
    processor = ViTImageProcessor(size=16)

    @_settings(40)
    @given(data=_mutations(blob, header=False))
    def check(data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about some damage it works around
            path = Path(tmp) / f"image.{suffix}"
            path.write_bytes(data)
            _only_package_errors(lambda: processor(open_image(path)))

    check()
