"""Broken and hostile checkpoints: each gives one package error naming file, key and cause.

`CASES` is the checkpoint part of the bad-input corpus: a file (or folder) made as the
name says, the error type `vit_core.load` must raise, and a fragment of its message.
None of them reaches a framework: the errors come before torch is imported. Below the
corpus: what is done with each accepted dtype, and the proof that a pickle carrying
code is refused without running it, on every road that could read one.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vit_core import CheckpointError, ConfigError, LayoutError, ViTError, load
from vit_core.layout import WEIGHTS_NAME

KEY = "vit.layernorm.weight"  # 16 float32 values in the tiny model


class _RunsCode:
    """Unpickling this runs `touch marker`: a file that appears only if the code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _mutated(kit: Any, change: Callable[[dict[str, Any], bytes], tuple[Any, bytes]]) -> Path:
    """The tiny model's folder with its safetensors header (and data) changed."""
    header, data = kit.split(kit.safetensors_bytes(kit.tensors()))
    header, data = change(header, data)
    return kit.folder(weights=kit.raw_safetensors(header, data))


def _entry(key: str, **changes: Any) -> Callable[[dict[str, Any], bytes], tuple[Any, bytes]]:
    def change(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
        header[key] = changes["entry"] if "entry" in changes else {**header[key], **changes}
        for field in [k for k, v in changes.items() if v is ...]:
            del header[key][field]
        return header, data

    return change


def _by_offset(header: dict[str, Any]) -> list[str]:
    return sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )


def _overlap(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    second = _by_offset(header)[1]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [begin - 4, end - 4]
    return header, data


def _gap(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    last = _by_offset(header)[-1]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4, end + 4]
    return header, data[:begin] + b"\0" * 4 + data[begin:]


def _duplicate(header: dict[str, Any], data: bytes) -> tuple[Any, bytes]:
    entries = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in header.items()]
    entries.append(f'"vit.layernorm.bias": {json.dumps(header["vit.layernorm.bias"])}')
    return ("{" + ", ".join(entries) + "}").encode(), data


def _relabel_u8(dtype: str) -> Callable[[Any], Path]:
    """A 1-byte tensor re-labelled in the header as another 1-byte dtype (float8 ...)."""

    def build(kit: Any) -> Path:
        tensors = kit.tensors()
        tensors[KEY] = np.zeros(16, np.uint8)
        header, data = kit.split(kit.safetensors_bytes(tensors))
        header[KEY]["dtype"] = dtype
        return kit.folder(weights=kit.raw_safetensors(header, data))

    return build


def _with(key: str, value: np.ndarray) -> Callable[[Any], Path]:
    def build(kit: Any) -> Path:
        return kit.folder(tensors={**kit.tensors(), key: value})

    return build


def _extra_keys(**extra: tuple[int, ...]) -> Callable[[Any], Path]:
    def build(kit: Any) -> Path:
        added = {k.replace("__", "/"): np.zeros(s, np.float32) for k, s in extra.items()}
        return kit.folder(tensors={**kit.tensors(), **added})

    return build


def _config(**changes: Any) -> Callable[[Any], Path]:
    return lambda kit: kit.folder(config=kit.config_dict(**changes))


def _nan() -> np.ndarray:
    value = np.ones(16, np.float32)
    value[[3, 7]] = np.nan
    return value


def _inf() -> np.ndarray:
    value = np.ones(16, np.float32)
    value[0] = -np.inf
    return value


def _other_file(name: str, content: bytes) -> Callable[[Any], Path]:
    def build(kit: Any) -> Path:
        path = kit.tmp_path / name
        path.write_bytes(content)
        return path

    return build


def _folder_with(*names: str) -> Callable[[Any], Path]:
    def build(kit: Any) -> Path:
        folder = kit.tmp_path / "other"
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"\x80\x04K\x01.")
        return folder

    return build


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(3))
    return buffer.getvalue()


def _no_config(kit: Any) -> Path:
    folder = kit.folder()
    (folder / "config.json").unlink()
    return folder


def _weights_is_a_folder(kit: Any) -> Path:
    folder = kit.tmp_path / "m"
    (folder / WEIGHTS_NAME).mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(kit.config_dict()))
    return folder


def _interrupted_swap(kit: Any) -> Path:
    kit.folder(name=".model.old-1a2b3c4d")
    return kit.tmp_path / "model"


def _ddp_prefixed(kit: Any) -> Path:
    return kit.folder(tensors={f"module.{k}": v for k, v in kit.tensors().items()})


def _blob(kit: Any) -> bytes:
    return kit.safetensors_bytes(kit.tensors())


BLOB_TOO_BIG = struct.pack("<Q", 2**63) + b'{"a": 1}'
# name -> (build(kit) -> path to load, error type, message fragment)
CASES: dict[str, tuple[Callable[[Any], Path], type[ViTError], str]] = {
    # ---- the container: length field, header bytes, data area
    "zero_length": (lambda k: k.folder(weights=b""), CheckpointError, r"it is empty \(0 bytes\)"),
    "five_bytes": (lambda k: k.folder(weights=b"12345"), CheckpointError, r"found 5"),
    "truncated_in_data": (
        lambda k: k.folder(weights=_blob(k)[:-100]),
        CheckpointError,
        "the file is truncated",
    ),
    "truncated_in_header": (
        lambda k: k.folder(weights=_blob(k)[:50]),
        CheckpointError,
        r"header but the file holds only 42 bytes .*truncated\?",
    ),
    "absurd_header_length": (
        lambda k: k.folder(weights=BLOB_TOO_BIG),
        CheckpointError,
        r"declares a 9223372036854775808-byte header but the limit is 100000000 bytes",
    ),
    "extra_bytes_at_end": (
        lambda k: k.folder(weights=_blob(k) + b"\0" * 16),
        CheckpointError,
        "extra bytes at the end",
    ),
    "header_not_json": (
        lambda k: k.folder(weights=k.raw_safetensors(b"{not json}")),
        CheckpointError,
        "the header is not valid JSON",
    ),
    "header_is_a_list": (
        lambda k: k.folder(weights=k.raw_safetensors(b"[1, 2]")),
        CheckpointError,
        "the header is not a JSON object",
    ),
    "header_not_utf8": (
        lambda k: k.folder(weights=k.raw_safetensors(b'{"\xff\xfe": 1}')),
        CheckpointError,
        "the header is not UTF-8",
    ),
    "duplicate_name": (
        lambda k: _mutated(k, _duplicate),
        CheckpointError,
        "names 'vit.layernorm.bias' twice",
    ),
    "overlapping_offsets": (lambda k: _mutated(k, _overlap), CheckpointError, "tensors overlap"),
    "gap_between_tensors": (
        lambda k: _mutated(k, _gap),
        CheckpointError,
        "a gap of 4 unused bytes before tensor",
    ),
    "shape_contradicts_offsets": (
        lambda k: _mutated(k, _entry(KEY, shape=[17])),
        CheckpointError,
        rf"tensor '{KEY}': shape \(17,\) of F32 needs 68 bytes but its offsets .* span 64",
    ),
    "unknown_dtype": (
        lambda k: _mutated(k, _entry(KEY, dtype="F99")),
        CheckpointError,
        "unknown dtype 'F99'",
    ),
    "negative_dimension": (
        lambda k: _mutated(k, _entry(KEY, shape=[-16])),
        CheckpointError,
        r"shape must be a list of ints >= 0; found \[-16\]",
    ),
    "reversed_offsets": (
        lambda k: _mutated(k, _entry(KEY, data_offsets=[64, 0])),
        CheckpointError,
        r"data_offsets must be \[begin, end\]",
    ),
    "entry_not_an_object": (
        lambda k: _mutated(k, _entry(KEY, entry=5)),
        CheckpointError,
        "entry is a JSON int",
    ),
    "entry_without_dtype": (
        lambda k: _mutated(k, _entry(KEY, dtype=...)),
        CheckpointError,
        "entry lacks dtype",
    ),
    "metadata_not_strings": (
        lambda k: _mutated(k, lambda h, d: ({**h, "__metadata__": {"format": 1}}, d)),
        CheckpointError,
        "__metadata__ must be an object of strings",
    ),
    "no_tensors": (
        lambda k: k.folder(weights=k.raw_safetensors({})),
        CheckpointError,
        "holds no tensors",
    ),
    # ---- another format under the safetensors name, or another extension
    "zip_named_safetensors": (
        lambda k: k.folder(weights=_npz_bytes()),
        CheckpointError,
        "starts like a zip archive",
    ),
    "pickle_named_safetensors": (
        lambda k: k.folder(weights=pickle.dumps(_RunsCode(k.tmp_path / "MARKER"), protocol=4)),
        CheckpointError,
        "starts like a Python pickle",
    ),
    "json_named_safetensors": (
        lambda k: k.folder(weights=b'{"hidden_size": 768}'),
        CheckpointError,
        "starts like a JSON text file",
    ),
    "pth_extension": (
        _other_file("vit.pth", b"\x80\x04K\x01."),
        CheckpointError,
        r"expected a model folder or a \.safetensors file; .*python -m conversion",
    ),
    "npz_extension": (
        _other_file("vit.npz", _npz_bytes()),
        CheckpointError,
        r"vit\.npz: expected a model folder .*python -m conversion",
    ),
    "folder_with_pytorch_bin": (
        _folder_with("pytorch_model.bin"),
        CheckpointError,
        r"no model\.safetensors in this folder .*convert it first",
    ),
    "empty_folder": (_folder_with(), CheckpointError, r"\(found: nothing\)"),
    "weights_is_a_folder": (
        _weights_is_a_folder,
        CheckpointError,
        r"no model\.safetensors in this folder",
    ),
    "missing_path": (
        lambda k: k.tmp_path / "nowhere",
        CheckpointError,
        "nowhere: no such file or folder",
    ),
    "interrupted_swap": (_interrupted_swap, CheckpointError, r"\.model\.old-1a2b3c4d.*rename it"),
    "no_config": (_no_config, ConfigError, "no config.json beside it"),
    # ---- dtypes
    "int32_weights": (
        _with(KEY, np.arange(16, dtype=np.int32)),
        LayoutError,
        rf"{KEY} \(I32\); expected a float dtype .*integers are quantised weights",
    ),
    "bool_weights": (_with(KEY, np.ones(16, bool)), LayoutError, rf"{KEY} \(BOOL\)"),
    "uint8_weights": (_with(KEY, np.ones(16, np.uint8)), LayoutError, rf"{KEY} \(U8\)"),
    "float8_weights": (_relabel_u8("F8_E4M3"), LayoutError, rf"{KEY} \(F8_E4M3\).*dequantise"),
    "complex_weights": (
        _with(KEY, np.ones(16, np.complex64)),
        LayoutError,
        rf"{KEY} \(C64\).*complex numbers",
    ),
    # ---- values
    "nan_weights": (
        _with(KEY, _nan()),
        CheckpointError,
        rf"1 tensor\(s\) hold non-finite values: {KEY}: 2 NaN of 16 values.*re-export",
    ),
    "inf_weights": (_with(KEY, _inf()), CheckpointError, rf"{KEY}: 1 inf of 16 values"),
    "float64_beyond_float32": (
        _with(KEY, np.full(16, 1e39)),
        CheckpointError,
        rf"{KEY}: 16 beyond float32's range of 16 values",
    ),
    # ---- keys and shapes against the layout and the config
    "mixed_with_timm_keys": (
        _extra_keys(**{"blocks.0.attn.qkv.weight": (48, 16), "pos_embed": (1, 5, 16)}),
        LayoutError,
        r"unexpected keys \(2\).*2 of the unexpected keys look like timm keys.*python -m conv",
    ),
    "mixed_with_jax_keys": (
        _extra_keys(Transformer__encoderblock_0__LayerNorm_0__scale=(16,)),
        LayoutError,
        r"look like original JAX / big_vision keys \(e\.g\. Transformer/encoderblock_0",
    ),
    "ddp_prefixed_keys": (_ddp_prefixed, LayoutError, r"look like a wrapped \(DDP or Lightning\)"),
    "width_contradicts_config": (
        _config(hidden_size=32, intermediate_size=32),
        LayoutError,
        r"vit\.embeddings\.cls_token: expected \(1, 1, 32\), found \(1, 1, 16\).*config\.json "
        "belongs to these weights",
    ),
    "depth_contradicts_config": (
        _config(num_hidden_layers=3),
        LayoutError,
        r"layers=3.*missing keys \(16\): vit\.encoder\.layer\.2\.",
    ),
    "absurd_depth_in_config": (
        _config(num_hidden_layers=10**9),
        LayoutError,
        r"num_hidden_layers=1000000000, but the file holds only 40 tensors",
    ),
    "classifier_contradicts_config": (
        _config(id2label={str(i): f"c{i}" for i in range(5)}, label2id=...),
        LayoutError,
        r"classifier\.weight: expected \(5, 16\), found \(3, 16\).*num_labels=N",
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_checkpoint(kit: Any, name: str) -> None:
    build, error, fragment = CASES[name]
    path = build(kit)
    with pytest.raises(error, match=fragment) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message or name == "interrupted_swap", message
    assert "Traceback" not in message and "\n" not in message
    assert not (kit.tmp_path / "MARKER").exists()


# ------------------------------------------------------------------ accepted dtypes
def _ml_bfloat16() -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_float_dtypes_are_accepted_and_computed_in_float32(kit: Any, dtype: str) -> None:
    import torch

    np_dtype = _ml_bfloat16() if dtype == "bfloat16" else np.dtype(dtype)
    stored = {k: v.astype(np_dtype) for k, v in kit.tensors().items()}
    model = load(kit.folder(tensors=stored))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    got = model.vit.layernorm.weight.detach().numpy()
    assert np.array_equal(got, stored[KEY].astype(np.float32))  # f16/bf16: exact; f64: rounded
    half = load(kit.folder(name="again", tensors=stored), dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_bfloat16_file_in_flax(kit: Any) -> None:
    import jax

    stored = {k: v.astype(_ml_bfloat16()) for k, v in kit.tensors().items()}
    model = load(kit.folder(tensors=stored), backend="flax")
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(model.params)} == {"float32"}


def test_mixed_float_dtypes_in_one_file(kit: Any) -> None:
    tensors = kit.tensors()
    tensors[KEY] = tensors[KEY].astype(np.float16)
    tensors["vit.layernorm.bias"] = tensors["vit.layernorm.bias"].astype(np.float64)
    model = load(kit.folder(tensors=tensors))
    assert model.vit.layernorm.weight.dtype == model.classifier.weight.dtype


def test_duplicate_names_are_seen_although_json_keeps_the_last() -> None:
    """The reason for `object_pairs_hook`: a plain parser silently drops one entry."""
    assert json.loads('{"a": 1, "a": 2}') == {"a": 2}


# ------------------------------------------------------------ code-carrying pickles
def test_the_payload_is_live(tmp_path: Path) -> None:
    """Unpickled with plain `pickle`, the payload does run: so its absence below is proof."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_RunsCode(marker)))
    assert marker.exists()


def _pth(path: Path, marker: Path, legacy: bool = False) -> Path:
    import torch

    state = {"cls_token": torch.zeros(1, 1, 8), "pos_embed": _RunsCode(marker)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


PICKLE_ROADS: dict[str, Callable[[Path, Path], Path]] = {
    "torch_zip_pth": lambda d, m: _pth(d / "evil.pth", m),
    "torch_legacy_pth": lambda d, m: _pth(d / "evil.pt", m, legacy=True),
    "plain_pickle_bin": lambda d, m: (
        (d / "evil.bin").write_bytes(pickle.dumps({"w": _RunsCode(m)}, protocol=2)),
        d / "evil.bin",
    )[1],
    "hf_folder_pytorch_model_bin": lambda d, m: (
        _pth((d / "hf").mkdir() or d / "hf" / "pytorch_model.bin", m).parent
    ),
}


@pytest.mark.parametrize("road", PICKLE_ROADS)
def test_code_carrying_pickles_are_refused_unrun(tmp_path: Path, road: str) -> None:
    from conversion import convert

    marker = tmp_path / "MARKER"
    source = PICKLE_ROADS[road](tmp_path, marker)
    if road.startswith("hf"):
        (source / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(CheckpointError, match=r"refused to unpickle: .* (posix|nt)\.system"):
        convert(source, tmp_path / "out", progress=False)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError):  # vit_core never unpickles: it names the cure
        load(source)
    assert not marker.exists()


def test_pickled_objects_in_an_npz_are_refused_unrun(tmp_path: Path) -> None:
    from conversion.sources import jax as jax_source

    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.npz"
    np.savez(path, **{"embedding/kernel": np.array([_RunsCode(marker)], dtype=object)})
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        jax_source.read(path, {})
    assert not marker.exists()


def test_vit_core_reads_no_pickle_anywhere() -> None:
    """The core's only readers are safetensors, JSON, numpy without pickles, and PIL."""
    root = Path(__file__).resolve().parents[2] / "vit_core"
    for source in root.glob("*.py"):
        text = source.read_text()
        for call in ("pickle.load", "torch.load", "allow_pickle=True", "joblib", "dill"):
            assert call not in text, f"{source.name} calls {call}"


def test_conversion_refuses_integer_weights(tmp_path: Path) -> None:
    """As `load` does: an integer tensor means the file is not the ViT it claims to be."""
    from safetensors.numpy import save_file

    from conversion.convert import convert

    rng = np.random.default_rng(0)
    tensors = {
        k: rng.standard_normal(s).astype(np.float32)
        for k, s in {
            "cls_token": (1, 1, 8),
            "pos_embed": (1, 5, 8),
            "patch_embed.proj.weight": (8, 3, 4, 4),
            "patch_embed.proj.bias": (8,),
            "norm.weight": (8,),
            "norm.bias": (8,),
            "blocks.0.norm1.weight": (8,),
            "blocks.0.norm1.bias": (8,),
            "blocks.0.attn.qkv.weight": (24, 8),
            "blocks.0.attn.qkv.bias": (24,),
            "blocks.0.attn.proj.weight": (8, 8),
            "blocks.0.attn.proj.bias": (8,),
            "blocks.0.norm2.weight": (8,),
            "blocks.0.norm2.bias": (8,),
            "blocks.0.mlp.fc1.weight": (16, 8),
            "blocks.0.mlp.fc1.bias": (16,),
            "blocks.0.mlp.fc2.weight": (8, 16),
            "blocks.0.mlp.fc2.bias": (8,),
        }.items()
    }
    tensors["norm.bias"] = np.zeros(8, np.int32)
    save_file(tensors, tmp_path / "vit.safetensors")
    with pytest.raises(
        LayoutError, match=r"non-floating-point weights \(1\): layernorm.bias \(int32\)"
    ):
        convert(
            tmp_path / "vit.safetensors", tmp_path / "out", overrides={"num_attention_heads": 2}
        )
    assert not (tmp_path / "out").exists()


def test_info_names_a_duplicated_tensor(kit: Any) -> None:
    from vit_core.info import folder_info

    with pytest.raises(CheckpointError, match="twice"):
        folder_info(_mutated(kit, _duplicate))
