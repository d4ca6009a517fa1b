"""Original JAX `.npz` checkpoints -> canonical tensors.

Two key layouts, both flat `.npz` archives with `/`-joined Flax parameter paths, told
apart from the file itself:

- **vit_jax**: google-research/vision_transformer and its AugReg files (old files put
  `opt/target/` in front of every key). Pre-Linen names share one counter across module
  types (`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`),
  and `Transformer/posembed_input/pos_embedding` includes the class token's slot.
- **big_vision**: keys under `params/` (SigLIP image towers: `params/img/`), per-type
  numbering (`LayerNorm_0/1`, `MultiHeadDotProductAttention_0`, `MlpBlock_0`), blocks
  either one per `Transformer/encoderblock_{i}` or all stacked on a leading axis in one
  `Transformer/encoderblock` (scanned), and a top-level `pos_embedding` added *before*
  the class token is prepended: the class token has no position embedding, so a zero
  class slot is exact. Without a class token (`pool_type` gap) the model averages the
  patch tokens after the final LayerNorm (`use_class_token=False, pooling_type="mean"`);
  a `MAPHead_0` (`pool_type` map, SigLIP) is the canonical MAP head (`pooling_type="map"`,
  `head.*`); a file without `pos_embedding` is a `posemb="sincos2d"` model, whose fixed
  positions (`posemb_sincos_2d`) are written out as a table for the model's grid.

ImageNet-21k files keep their `pre_logits` layer (Dense + tanh before the head) as the
canonical pooler with `classifier_uses_pooler=True`. Hybrid (ResNet stem) models are
refused by name. Nothing is ever unpickled: an archive holding a pickled object is
refused before any array is read.

The sizes come from the arrays' headers first; then every key goes through its row of the
rule tables (`EMBEDDING_RULES`, `BLOCK_RULES`, ...), its shape checked, and any key left
over is refused rather than dropped.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conversion.sources.base import QKV, Architecture, Rule, SourceWeights, copy, position_table
from vit_core.config import ViTConfig, hw_pair
from vit_core.errors import CheckpointError, ConfigError
from vit_core.flax_layout import kernel_to_torch
from vit_core.layout import ModelKind, check_layout

FORMAT_VIT_JAX = "vit_jax"
FORMAT_BIG_VISION = "big_vision"
# Where the model's parameters live inside the archive (timm's `_load_weights` order).
PREFIXES = ("", "opt/target/", "params/", "params/img/")
ANCHOR = "embedding/kernel"
# (attention, second LayerNorm, MLP) module indices inside an encoder block.
NUMBERING = {FORMAT_VIT_JAX: (1, 2, 3), FORMAT_BIG_VISION: (0, 1, 0)}
POSEMB_VIT_JAX = "Transformer/posembed_input/pos_embedding"
POSEMB_BIG_VISION = "pos_embedding"
DEFAULT_ACT = "gelu_pytorch_tanh"
# --image-size default: both releases resize positions with scipy.ndimage.zoom(order=1).
DEFAULT_INTERPOLATION = "jax_zoom"
DEFAULT_EPS = 1e-6
# big_vision's default resolution: the grid of a sincos2d file that states no image size.
DEFAULT_SINCOS_IMAGE = 224
SINCOS_TEMPERATURE = 10_000.0
# The MAP head's parameters: `MAPHead_0/...`, or at the top level in the ViT-G-era files
# big_vision's `fix_old_checkpoints` moves there (`probe`, `MultiHeadDotProductAttention_0`,
# `LayerNorm_0`, `MlpBlock_0`).
MAP_PREFIXES = ("MAPHead_0/", "")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
# Parts of other model families, refused with what they are.
_REFUSED = {
    "conv_root/": "a hybrid ResNet + ViT model (ResNet stem), which is not a plain ViT",
}


# --------------------------------------------------------------------- the archive
def _is_zip(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) in _ZIP_MAGIC
    except OSError:
        return False


def detect(path: Path) -> bool:
    """Whether `path` is a NumPy `.npz` archive with a JAX ViT patch embedding
    (`embedding/kernel`, bare or under `opt/target/`, `params/`, `params/img/`).

    Judged from the zip directory alone: no array is read. Hybrid files are claimed too,
    so that `read` can say by name why they are refused.
    """
    path = Path(path)
    if not path.is_file() or not _is_zip(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False
    return any(f"{prefix}{ANCHOR}.npy" in names for prefix in PREFIXES)


def _header(archive: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of one `.npy` member from its header alone; None if not a v1/v2 header."""
    with archive.open(member) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            return None
    return tuple(shape), dtype


class _Archive:
    """The arrays of one `.npz` under one key prefix, read on demand, never unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.npz: Any = None
        self.headers: dict[str, tuple[tuple[int, ...], np.dtype] | None] = {}
        self.prefix = ""
        self.used: set[str] = set()

    def open(self) -> None:
        path = self.path
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        if not _is_zip(path):
            raise CheckpointError(
                f"{path}: not an .npz archive (no zip signature); the original JAX and "
                "big_vision checkpoints are NumPy .npz files"
            )
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
                not_npy = [m for m in members if not m.endswith(".npy")]
                if not_npy or not members:
                    raise CheckpointError(
                        f"{path}: a zip archive but not an .npz (members that are not .npy "
                        f"arrays: {', '.join(not_npy[:5]) or 'none at all'})"
                    )
                for member in members:
                    self.headers[member[: -len(".npy")]] = _header(archive, member)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise CheckpointError(
                f"{path}: not a readable .npz archive (truncated or corrupt?): {exc}"
            ) from None
        pickled = sorted(k for k, h in self.headers.items() if h is not None and h[1].hasobject)
        if pickled:
            raise CheckpointError(
                f"{path}: holds pickled Python objects (key {pickled[0]!r}"
                + (f" and {len(pickled) - 1} more" if len(pickled) > 1 else "")
                + "); refused without unpickling, since a pickle can run code. A JAX "
                "checkpoint holds plain numeric arrays only"
            )
        try:
            self.npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{path}: not a readable .npz archive: {exc}") from None
        if not isinstance(self.npz, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: not an .npz archive")
        self.prefix = self._find_prefix()

    def close(self) -> None:
        if self.npz is not None:
            self.npz.close()

    def _find_prefix(self) -> str:
        found = [p for p in PREFIXES if p + ANCHOR in self.headers]
        if len(found) == 1:
            return found[0]
        if found:
            raise CheckpointError(
                f"{self.path}: holds more than one model ({', '.join(p + ANCHOR for p in found)}); "
                "extract the one to convert into its own .npz"
            )
        sample = ", ".join(sorted(self.headers)[:8])
        raise CheckpointError(
            f"{self.path}: unknown .npz layout: no patch embedding "
            f"({' or '.join(repr(p + ANCHOR) for p in PREFIXES)}); this reader knows the "
            "google-research/vision_transformer and big_vision ViT layouts. "
            f"Keys found ({len(self.headers)}): {sample}"
            + (", ..." if len(self.headers) > 8 else "")
        )

    # ---------------------------------------------------------------- key access
    def keys(self) -> list[str]:
        """Keys under the prefix, prefix removed."""
        n = len(self.prefix)
        return sorted(k[n:] for k in self.headers if k.startswith(self.prefix))

    def has(self, key: str) -> bool:
        return self.prefix + key in self.headers

    def shape(self, key: str) -> tuple[int, ...]:
        self._require(key)
        header = self.headers[self.prefix + key]
        return header[0] if header is not None else tuple(self.get(key, mark=False).shape)

    def _require(self, key: str) -> None:
        if not self.has(key):
            raise CheckpointError(f"{self.path}: missing key {self.prefix + key!r}")

    def get(self, key: str, mark: bool = True) -> np.ndarray:
        """One array as float32 (bfloat16 stored as raw 2-byte void is recovered)."""
        self._require(key)
        full = self.prefix + key
        try:
            value = self.npz[full]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{self.path}: cannot read key {full!r}: {exc}") from None
        if value.dtype.kind == "V" and value.dtype.itemsize == 2 and value.dtype.names is None:
            value = _bfloat16(value, self.path, full)
        if value.dtype.kind != "f":
            raise CheckpointError(
                f"{self.path}: key {full!r} holds {value.dtype} values; expected floating point"
            )
        if mark:
            self.used.add(key)
        return np.ascontiguousarray(value, dtype=np.float32)


def _bfloat16(value: np.ndarray, path: Path, key: str) -> np.ndarray:
    """big_vision saves bfloat16 arrays as 2-byte void; view them back (exact in float32)."""
    try:
        import ml_dtypes
    except ImportError:
        raise CheckpointError(
            f"{path}: key {key!r} holds bfloat16 stored as raw 2-byte values; reading it "
            "needs the ml_dtypes package (`pip install ml_dtypes`, it comes with jax)"
        ) from None
    return value.view(ml_dtypes.bfloat16).astype(np.float32)


@contextmanager
def _opened(path: Path) -> Iterator[_Archive]:
    archive = _Archive(Path(path))
    try:
        archive.open()
        yield archive
    finally:
        archive.close()


# ----------------------------------------------------------------- transforms
def flax_kernel(value: np.ndarray, arch: Architecture) -> np.ndarray:
    """A Flax kernel (convolution HWIO, Dense (in, out)) in PyTorch's orientation."""
    return kernel_to_torch(value)


def heads_kernel(value: np.ndarray, arch: Architecture) -> np.ndarray:
    """An attention kernel split by heads, (D, heads, head_dim) for query/key/value or
    (heads, head_dim, D) for the output, as the (D, D) Dense it is, PyTorch-oriented."""
    return kernel_to_torch(value.reshape(arch.width, arch.width))


def heads_bias(value: np.ndarray, arch: Architecture) -> np.ndarray:
    """A (heads, head_dim) bias as the (D,) bias of one Dense."""
    return value.reshape(arch.width)


def sincos_position_table(height: int, width: int, dim: int) -> np.ndarray:
    """big_vision's fixed positions (`posemb_sincos_2d`, the MoCo v3 form) for a
    height x width patch grid, (1, height * width, dim) float32, row-major:
    [sin(x w), cos(x w), sin(y w), cos(y w)] with w_k = 1 / 10000^(k / (dim/4 - 1))."""
    quarter = dim // 4
    if dim % 4 or quarter < 2:
        raise CheckpointError(
            f"sincos2d position embeddings need a width divisible by 4 and at least 8 "
            f"(big_vision asserts it); this model's is {dim}"
        )
    y, x = np.mgrid[:height, :width]
    omega = 1.0 / SINCOS_TEMPERATURE ** (np.arange(quarter) / (quarter - 1))
    ys = y.reshape(-1)[:, None] * omega[None, :]
    xs = x.reshape(-1)[:, None] * omega[None, :]
    table = np.concatenate([np.sin(xs), np.cos(xs), np.sin(ys), np.cos(ys)], axis=1)
    return table.astype(np.float32)[None]


# ------------------------------------------------------------------ key rules
# JAX key (under the archive's prefix) -> canonical key (before the `vit.` prefix), the
# transform, and the shape the JAX array must have (sizes named as in `_Sizes`).
# fmt: off
EMBEDDING_RULES: tuple[Rule, ...] = (
    Rule("embedding/kernel", "embeddings.patch_embeddings.projection.weight", flax_kernel,
         ("patch_height", "patch_width", "channels", "width")),
    Rule("embedding/bias", "embeddings.patch_embeddings.projection.bias", copy, ("width",)),
    Rule("Transformer/encoder_norm/scale", "layernorm.weight", copy, ("width",)),
    Rule("Transformer/encoder_norm/bias", "layernorm.bias", copy, ("width",)),
)
# {posemb}: POSEMB_VIT_JAX (a class-token slot) or POSEMB_BIG_VISION (none); a sincos2d
# file has neither, and its table is computed (`sincos_position_table`)
POSITION_RULES: tuple[Rule, ...] = (
    Rule("{posemb}", "embeddings.position_embeddings", position_table,
         (1, "positions", "width")),
)
CLASS_TOKEN_RULES: tuple[Rule, ...] = (
    Rule("cls", "embeddings.cls_token", copy, (1, 1, "width")),
)
# Inside one block, `Transformer/encoderblock_{i}/` (scanned: `Transformer/encoderblock/`,
# every array stacked on a leading layer axis); {mha}, {ln2}, {mlp}: the module numbers
# of the file's numbering (NUMBERING).
BLOCK_RULES: tuple[Rule, ...] = (
    Rule("LayerNorm_0/scale", "encoder.layer.{i}.layernorm_before.weight", copy, ("width",)),
    Rule("LayerNorm_0/bias", "encoder.layer.{i}.layernorm_before.bias", copy, ("width",)),
    Rule("MultiHeadDotProductAttention_{mha}/{qkv}/kernel",
         "encoder.layer.{i}.attention.attention.{qkv}.weight", heads_kernel,
         ("width", "heads", "head_dim")),
    Rule("MultiHeadDotProductAttention_{mha}/{qkv}/bias",
         "encoder.layer.{i}.attention.attention.{qkv}.bias", heads_bias, ("heads", "head_dim")),
    Rule("MultiHeadDotProductAttention_{mha}/out/kernel",
         "encoder.layer.{i}.attention.output.dense.weight", heads_kernel,
         ("heads", "head_dim", "width")),
    Rule("MultiHeadDotProductAttention_{mha}/out/bias",
         "encoder.layer.{i}.attention.output.dense.bias", copy, ("width",)),
    Rule("LayerNorm_{ln2}/scale", "encoder.layer.{i}.layernorm_after.weight", copy, ("width",)),
    Rule("LayerNorm_{ln2}/bias", "encoder.layer.{i}.layernorm_after.bias", copy, ("width",)),
    Rule("MlpBlock_{mlp}/Dense_0/kernel", "encoder.layer.{i}.intermediate.dense.weight",
         flax_kernel, ("width", "mlp")),
    Rule("MlpBlock_{mlp}/Dense_0/bias", "encoder.layer.{i}.intermediate.dense.bias", copy,
         ("mlp",)),
    Rule("MlpBlock_{mlp}/Dense_1/kernel", "encoder.layer.{i}.output.dense.weight",
         flax_kernel, ("mlp", "width")),
    Rule("MlpBlock_{mlp}/Dense_1/bias", "encoder.layer.{i}.output.dense.bias", copy, ("width",)),
)
# ImageNet-21k files: the representation layer (Dense + tanh) = the canonical pooler.
POOLER_RULES: tuple[Rule, ...] = (
    Rule("pre_logits/kernel", "pooler.dense.weight", flax_kernel, ("width", "representation")),
    Rule("pre_logits/bias", "pooler.dense.bias", copy, ("representation",)),
)
HEAD_RULES: tuple[Rule, ...] = (
    Rule("head/kernel", "classifier.weight", flax_kernel, ("representation", "classes")),
    Rule("head/bias", "classifier.bias", copy, ("classes",)),
)
# big_vision MAPHead (pool_type='map'): {map} is one of MAP_PREFIXES. The query, key and
# value projections land in MAP_QKV, fused afterwards into the one in-projection.
MAP_QKV = "head.attention.{qkv}"
MAP_RULES: tuple[Rule, ...] = (
    Rule("{map}probe", "head.probe", copy, (1, 1, "width")),
    Rule("{map}MultiHeadDotProductAttention_0/{qkv}/kernel", MAP_QKV + ".weight",
         heads_kernel, ("width", "heads", "head_dim")),
    Rule("{map}MultiHeadDotProductAttention_0/{qkv}/bias", MAP_QKV + ".bias", heads_bias,
         ("heads", "head_dim")),
    Rule("{map}MultiHeadDotProductAttention_0/out/kernel", "head.attention.out_proj.weight",
         heads_kernel, ("heads", "head_dim", "width")),
    Rule("{map}MultiHeadDotProductAttention_0/out/bias", "head.attention.out_proj.bias", copy,
         ("width",)),
    Rule("{map}LayerNorm_0/scale", "head.layernorm.weight", copy, ("width",)),
    Rule("{map}LayerNorm_0/bias", "head.layernorm.bias", copy, ("width",)),
    Rule("{map}MlpBlock_0/Dense_0/kernel", "head.mlp.fc1.weight", flax_kernel,
         ("width", "mlp")),
    Rule("{map}MlpBlock_0/Dense_0/bias", "head.mlp.fc1.bias", copy, ("mlp",)),
    Rule("{map}MlpBlock_0/Dense_1/kernel", "head.mlp.fc2.weight", flax_kernel,
         ("mlp", "width")),
    Rule("{map}MlpBlock_0/Dense_1/bias", "head.mlp.fc2.bias", copy, ("width",)),
)
# fmt: on


@dataclass
class _Sizes(Architecture):
    """What the archive's shapes say, by the names the rules' shapes use."""

    patch_height: int = 0
    patch_width: int = 0
    channels: int = 0
    positions: int = 0  # rows of the stored position table
    grid: tuple[int, int] = (0, 0)
    depth: int = 0
    heads: int = 0
    head_dim: int = 0
    mlp: int = 0
    pooler: bool = False
    representation: int = 0  # features into the head: pre_logits' output, else width
    classes: int = 0


# ----------------------------------------------------------------------- reading
class _Reader:
    """One pass over an opened archive: canonical tensors (unprefixed), config, notes."""

    def __init__(self, archive: _Archive, hints: dict[str, Any]) -> None:
        self.archive = archive
        self.path = archive.path
        self.hints = hints
        self.assumed: list[str] = []
        self.blocks: list[str] = []  # block key prefixes (one, when scanned)
        self.scanned = False
        self.stacked: dict[str, np.ndarray] = {}  # scanned arrays, read once for all layers
        self.sizes = _Sizes(width=0, use_class_token=False, table_has_class_slot=False)
        self.map_prefix: str | None = None  # where the MAP head's keys are, if it has one

    def _key(self, key: str) -> str:
        return repr(self.archive.prefix + key)

    def _fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def _checked(self, key: str, shape: tuple[int, ...], what: str) -> np.ndarray:
        """The array at `key` (under the prefix), which must have `shape`."""
        found = self.archive.shape(key)
        if tuple(found) != tuple(shape):
            raise self._fail(
                f"key {self._key(key)} has shape {tuple(found)}, expected {tuple(shape)} ({what})"
            )
        return self.archive.get(key)

    # ------------------------------------------------------------------ layout
    def _refuse_other_families(self) -> None:
        archive = self.archive
        keys = archive.keys()
        for part, what in _REFUSED.items():
            hits = [k for k in keys if k.startswith(part) or f"/{part}" in k]
            if hits:
                raise self._fail(
                    f"key {self._key(hits[0])} shows {what}; refused rather than converted wrongly"
                )
        if archive.has(POSEMB_VIT_JAX) and archive.has(POSEMB_BIG_VISION):
            raise self._fail(
                f"has both {self._key(POSEMB_VIT_JAX)} and {self._key(POSEMB_BIG_VISION)}; "
                "which one the model adds is unclear"
            )

    def _find_map_head(self) -> None:
        """Where the MAP head's parameters are (`MAP_PREFIXES`), if the file has one."""
        found = [p for p in MAP_PREFIXES if self.archive.has(p + "probe")]
        if len(found) > 1:
            raise self._fail(
                f"has two MAP heads ({', '.join(self._key(p + 'probe') for p in found)})"
            )
        self.map_prefix = found[0] if found else None

    def _find_blocks(self) -> None:
        """Block key prefixes and whether they are scanned (stacked on a leading axis)."""
        keys = self.archive.keys()
        prefix = self.archive.prefix
        scanned = any(k.startswith("Transformer/encoderblock/") for k in keys)
        indices = sorted({int(m[1]) for k in keys if (m := _BLOCK.match(k))})
        if scanned and indices:
            raise self._fail(
                f"has both scanned ({prefix}Transformer/encoderblock/) and per-layer "
                f"({prefix}Transformer/encoderblock_{indices[0]}/) blocks"
            )
        if scanned:
            self.blocks, self.scanned = ["Transformer/encoderblock/"], True
            return
        if not indices:
            raise self._fail(
                f"no encoder blocks (expected keys under {prefix}Transformer/"
                f"encoderblock_0/ or {prefix}Transformer/encoderblock/)"
            )
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        if missing:
            raise self._fail(
                f"missing keys under {prefix}Transformer/encoderblock_{missing[0]}/ "
                f"(blocks found: {', '.join(map(str, indices))})"
            )
        self.blocks = [f"Transformer/encoderblock_{i}/" for i in indices]

    def _numbering(self) -> str:
        """Module numbering of the blocks: vit_jax's shared counter or big_vision's per type."""
        first = self.blocks[0]
        for fmt in (FORMAT_VIT_JAX, FORMAT_BIG_VISION):
            mha = NUMBERING[fmt][0]
            if self.archive.has(f"{first}MultiHeadDotProductAttention_{mha}/query/kernel"):
                return fmt
        raise self._fail(
            f"missing key {self._key(first + 'MultiHeadDotProductAttention_1/query/kernel')} "
            "(vit_jax numbering) or ..._0/query/kernel (big_vision numbering)"
        )

    # ------------------------------------------------------------------- sizes
    def _sizes(self, numbering: str, posemb: str | None) -> _Sizes:
        """Every size, from the arrays' headers alone (no array is read yet); `posemb`:
        the position table's key, None for a sincos2d file (no table stored)."""
        archive = self.archive
        kernel_shape = archive.shape(ANCHOR)
        if len(kernel_shape) != 4:
            raise self._fail(
                f"key {self._key(ANCHOR)} has shape {kernel_shape}; expected a (patch, patch, "
                "channels, width) convolution kernel (a Dense patch embedding, as in NaFlex "
                "models, is not supported)"
            )
        patch_height, patch_width, channels, width = kernel_shape
        use_cls = archive.has("cls")
        if not use_cls and self.map_prefix is None:
            self.assumed.append(
                "no class token: the model averages the patch tokens after the final "
                "LayerNorm (pool_type/classifier 'gap'; pool types '0' and 'none' would look "
                "the same in the file)"
            )
        if use_cls and self.map_prefix is not None:
            raise self._fail(
                f"has both a class token ({self._key('cls')}) and a MAP head "
                f"({self._key(self.map_prefix + 'probe')}); big_vision builds one or the "
                "other (pool_type 'tok' or 'map'), so what this model pools is unclear"
            )
        # vit_jax adds positions after prepending the class token (a slot for it);
        # big_vision before (none: the class token's slot is zero, exactly).
        has_slot = use_cls and posemb == POSEMB_VIT_JAX
        sizes = _Sizes(
            width=width,
            use_class_token=use_cls,
            table_has_class_slot=has_slot,
            patch_height=patch_height,
            patch_width=patch_width,
            channels=channels,
            representation=width,
        )
        if posemb is None:
            sizes.grid = self._sincos_grid(sizes)
            sizes.positions = sizes.grid[0] * sizes.grid[1]
        else:
            pos_shape = archive.shape(posemb)
            if len(pos_shape) != 3 or pos_shape[0] != 1 or pos_shape[2] != width:
                raise self._fail(
                    f"key {self._key(posemb)} has shape {pos_shape}; expected (1, tokens, {width})"
                )
            sizes.positions = pos_shape[1]
            sizes.grid = self._grid(pos_shape[1] - int(has_slot), posemb, sizes)
        self._block_sizes(numbering, sizes)
        self._head_sizes(sizes)
        return sizes

    def _grid(self, patches: int, key: str, sizes: _Sizes) -> tuple[int, int]:
        """Patch grid (rows, cols) of `patches` positions: from hints' image_size, else square."""
        patch = (sizes.patch_height, sizes.patch_width)
        side = math.isqrt(patches)
        square = side * side == patches
        image = self.hints.get("image_size")
        if image is not None:
            h, w = hw_pair(image, "image_size")
            if h % patch[0] == 0 and w % patch[1] == 0:
                grid = (h // patch[0], w // patch[1])
                if grid[0] * grid[1] == patches:
                    return grid
            if square:
                self.assumed.append(
                    f"image_size {image} given, but {self.archive.prefix + key} holds {patches} "
                    f"patch positions: used the square {side}x{side} grid the weights were "
                    "trained at"
                )
                return side, side
        if not square:
            raise self._fail(
                f"key {self._key(key)} holds {patches} patch positions, not a square grid; "
                "give the training image size (image_size as [height, width])"
            )
        if image is None:
            self.assumed.append(
                f"square patch grid {side}x{side} (image {side * patch[0]}x{side * patch[1]}) "
                f"from the {patches} position embeddings"
            )
        return side, side

    def _sincos_grid(self, sizes: _Sizes) -> tuple[int, int]:
        """The patch grid of a sincos2d file, whose positions are computed from the grid
        at run time: the hints' image_size, else big_vision's default 224."""
        patch = (sizes.patch_height, sizes.patch_width)
        image = self.hints.get("image_size")
        stated = image is not None
        h, w = hw_pair(image, "image_size") if image is not None else (DEFAULT_SINCOS_IMAGE,) * 2
        if h % patch[0] or w % patch[1]:
            raise self._fail(
                f"no stored position embedding (posemb='sincos2d'), so the image size decides "
                f"the grid; {h}x{w} is not a multiple of the patch size {patch[0]}x{patch[1]}: "
                "give the training image size (image_size as [height, width])"
            )
        grid = (h // patch[0], w // patch[1])
        self.assumed.append(
            "no stored position embedding: big_vision's fixed sincos2d positions "
            f"(posemb_sincos_2d), written out as a table for the {grid[0]}x{grid[1]} patch grid "
            f"({h}x{w} images"
            + (")" if stated else ", big_vision's default: the file does not record it)")
            + "; for another size give image_size (the table is then computed there, "
            "exactly) rather than --image-size, which resamples it"
        )
        return grid

    def _block_sizes(self, numbering: str, sizes: _Sizes) -> None:
        """Depth, heads and MLP width, from the first block's attention and MLP kernels."""
        width = sizes.width
        mha_i, _, mlp_i = NUMBERING[numbering]
        lead = 1 if self.scanned else 0
        q_key = f"{self.blocks[0]}MultiHeadDotProductAttention_{mha_i}/query/kernel"
        q_shape = self.archive.shape(q_key)
        if len(q_shape) != 3 + lead or q_shape[lead] != width:
            raise self._fail(
                f"key {self._key(q_key)} has shape {q_shape}; expected "
                f"{'(layers, ' if self.scanned else '('}{width}, heads, head_dim)"
            )
        heads, head_dim = q_shape[-2:]
        if heads * head_dim != width:
            raise self._fail(
                f"key {self._key(q_key)} has {heads} heads x {head_dim} = {heads * head_dim} "
                f"features; the canonical layout needs heads x head_dim = width ({width})"
            )
        m_key = f"{self.blocks[0]}MlpBlock_{mlp_i}/Dense_0/kernel"
        m_shape = self.archive.shape(m_key)
        if len(m_shape) != 2 + lead:
            raise self._fail(f"key {self._key(m_key)} has shape {m_shape}; expected (width, mlp)")
        sizes.depth = q_shape[0] if self.scanned else len(self.blocks)
        sizes.heads, sizes.head_dim, sizes.mlp = heads, head_dim, m_shape[-1]

    def _dense_columns(self, key: str, rows: int, columns: str) -> int:
        """The output size of the Dense kernel at `key`, whose input size must be `rows`."""
        found = self.archive.shape(key)
        if len(found) != 2 or found[0] != rows:
            raise self._fail(
                f"key {self._key(key)} has shape {found}; expected ({rows}, {columns})"
            )
        return found[1]

    def _head_sizes(self, sizes: _Sizes) -> None:
        """pre_logits (Dense + tanh, the pooler) and head (the classifier, if any classes)."""
        archive = self.archive
        sizes.pooler = archive.has("pre_logits/kernel") or archive.has("pre_logits/bias")
        if sizes.pooler:
            key, width = "pre_logits/kernel", sizes.width
            sizes.representation = self._dense_columns(key, width, "representation_size")
        if archive.has("head/kernel") or archive.has("head/bias"):
            sizes.classes = self._dense_columns("head/kernel", sizes.representation, "num_classes")
            if sizes.classes and sizes.pooler and sizes.representation != sizes.width:
                raise self._fail(
                    f"pre_logits maps width {sizes.width} to {sizes.representation} features "
                    "before the head; the canonical classifier reads width-sized features, so "
                    "only representation_size == hidden_size is supported"
                )

    # ------------------------------------------------------------------- rules
    def _apply(
        self, rules: tuple[Rule, ...], layer: int | None = None, **parts: Any
    ) -> dict[str, np.ndarray]:
        """The canonical tensors of `rules`, each JAX array checked against the rule's shape.
        `layer`: the block the rules' keys are inside; `parts` fill the keys' braces."""
        sizes, out = self.sizes, {}
        for rule in rules:
            dims = rule.shape or ()
            shape = tuple(getattr(sizes, d) if isinstance(d, str) else d for d in dims)
            what = ", ".join(map(str, dims))
            for qkv in QKV if "{qkv}" in rule.source else ("",):
                names = {**parts, "qkv": qkv, "i": layer}
                value = self._array(rule.source.format(**names), shape, layer, what)
                out.update(rule.apply(value, sizes, **names))
        return out

    def _array(self, key: str, shape: tuple[int, ...], layer: int | None, what: str) -> np.ndarray:
        """The array at `key`, inside block `layer` if one is given."""
        if layer is None:
            return self._checked(key, shape, what)
        if not self.scanned:
            return self._checked(self.blocks[layer] + key, shape, what)
        if key not in self.stacked:
            stacked_shape = (self.sizes.depth, *shape)
            self.stacked[key] = self._checked(self.blocks[0] + key, stacked_shape, what)
        return self.stacked[key][layer]

    # -------------------------------------------------------------------- all
    def read(self) -> SourceWeights:
        archive = self.archive
        self._refuse_other_families()
        self._find_map_head()
        self._find_blocks()
        numbering = self._numbering()
        big_vision_posemb = archive.has(POSEMB_BIG_VISION)
        posemb = POSEMB_BIG_VISION if big_vision_posemb else POSEMB_VIT_JAX
        sincos = not (big_vision_posemb or archive.has(POSEMB_VIT_JAX))
        sizes = self.sizes = self._sizes(numbering, None if sincos else posemb)
        mha, ln2, mlp = NUMBERING[numbering]
        tensors = self._apply(EMBEDDING_RULES)
        if sincos:
            table = sincos_position_table(*sizes.grid, sizes.width)
            tensors["embeddings.position_embeddings"] = position_table(table, sizes)
        else:
            tensors.update(self._apply(POSITION_RULES, posemb=posemb))
        if self.map_prefix is not None:
            tensors.update(self._map_head(self._apply(MAP_RULES, map=self.map_prefix)))
        if sizes.use_class_token:
            tensors.update(self._apply(CLASS_TOKEN_RULES))
        for i in range(sizes.depth):
            tensors.update(self._apply(BLOCK_RULES, layer=i, mha=mha, ln2=ln2, mlp=mlp))
        if sizes.pooler:
            tensors.update(self._apply(POOLER_RULES))
        if archive.has("head/kernel") or archive.has("head/bias"):
            head = self._apply(HEAD_RULES)  # read and checked even when it has no classes
            if sizes.classes:
                tensors.update(head)
            else:
                self.assumed.append("zero-sized head: converted as a base model (no classifier)")
        leftover = sorted(set(archive.keys()) - archive.used)
        if leftover:
            raise self._fail(
                f"keys this reader does not know ({len(leftover)}): "
                + ", ".join(archive.prefix + k for k in leftover[:10])
                + ("" if len(leftover) <= 10 else ", ...")
                + "; refused rather than dropped"
            )
        big_vision = (
            archive.prefix.startswith("params/")
            or big_vision_posemb
            or sincos
            or self.map_prefix is not None
            or self.scanned
            or numbering == FORMAT_BIG_VISION
        )
        classifier = sizes.classes > 0
        prefix = "vit." if classifier else ""
        tensors = {  # contiguous: a transposed view must not reach a raw-buffer writer
            (k if k.startswith("classifier.") else prefix + k): np.ascontiguousarray(v)
            for k, v in tensors.items()
        }
        config = self._config()
        kind = ModelKind(classifier=classifier, pooler=sizes.pooler)
        try:
            check_layout(tensors, ViTConfig(**config), kind, str(self.path))
        except ConfigError as exc:
            raise self._fail(f"the weights (and hints) give an invalid config: {exc}") from None
        self.assumed.append(
            "preprocessing: mean = std = 0.5 (pixels scaled to [-1, 1], as "
            "(x - 127.5) / 127.5 in the original pipeline), bilinear resize, no crop"
        )
        return SourceWeights(
            tensors=tensors,
            config=config,
            source_format=FORMAT_BIG_VISION if big_vision else FORMAT_VIT_JAX,
            assumed=self.assumed,
            processor=self._processor(),
            fixed=frozenset({"num_attention_heads"}),  # from the (D, heads, head_dim) kernels
        )

    def _map_head(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The MAP head's query, key and value projections as one (3D, D) in-projection
        (and its bias), in that order: the query reads the probe, key and value the tokens."""
        for part in ("weight", "bias"):
            names = [f"{MAP_QKV.format(qkv=n)}.{part}" for n in QKV]
            fused = np.concatenate([tensors.pop(n) for n in names], axis=0)
            tensors[f"head.attention.in_proj_{part}"] = fused
        return tensors

    def _config(self) -> dict[str, Any]:
        sizes, hints = self.sizes, self.hints
        (ph, pw), (gh, gw) = (sizes.patch_height, sizes.patch_width), sizes.grid
        act = hints.get("hidden_act")
        if act is None:
            act = DEFAULT_ACT
            self.assumed.append(
                "hidden_act='gelu_pytorch_tanh': the JAX originals' MLP used flax nn.gelu, "
                "whose default is the tanh approximation (use --gelu exact if this model "
                "was trained with exact GELU)"
            )
        eps = hints.get("layer_norm_eps")
        if eps is None:
            eps = DEFAULT_EPS
            self.assumed.append("layer_norm_eps=1e-6 (flax nn.LayerNorm's default)")
        square = gh * ph == gw * pw and ph == pw
        pooling = "cls" if sizes.use_class_token else "mean"
        if self.map_prefix is not None:
            pooling = "map"
        config: dict[str, Any] = {
            "hidden_size": sizes.width,
            "num_hidden_layers": sizes.depth,
            "num_attention_heads": sizes.heads,
            "intermediate_size": sizes.mlp,
            "hidden_act": act,
            "layer_norm_eps": eps,
            "image_size": gh * ph if square else [gh * ph, gw * pw],
            "patch_size": ph if ph == pw else [ph, pw],
            "num_channels": sizes.channels,
            "qkv_bias": True,
            "use_class_token": sizes.use_class_token,
            "pooling_type": pooling,
            "classifier_uses_pooler": sizes.pooler and sizes.classes > 0,
            "num_labels": sizes.classes,
        }
        if ph == pw:
            config["encoder_stride"] = ph
        if sizes.pooler:
            config["pooler_output_size"] = sizes.representation
            config["pooler_act"] = "tanh"
        return config

    def _processor(self) -> dict[str, Any]:
        sizes = self.sizes
        (gh, gw), channels = sizes.grid, sizes.channels
        return {
            "do_resize": True,
            "size": {"height": gh * sizes.patch_height, "width": gw * sizes.patch_width},
            "resample": 2,  # bilinear, as tf.image.resize in the original input pipeline
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5] * channels,
            "image_std": [0.5] * channels,
        }


def read(path: Path, hints: dict[str, Any] | None = None) -> SourceWeights:
    """Read an original-JAX or big_vision `.npz` into canonical tensors (float32).

    `hints` (config fields the user gave) fill only what the file cannot tell:
    `hidden_act` (default "gelu_pytorch_tanh", the originals' tanh GELU),
    `layer_norm_eps` (default 1e-6) and `image_size` (for a non-square patch grid).
    """
    with _opened(Path(path)) as archive:
        return _Reader(archive, dict(hints or {})).read()


def weight_files(path: Path) -> list[Path]:
    """The files whose bytes the conversion depends on (hashed into the metadata): the .npz."""
    return [Path(path)]
