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
  patch tokens after the final LayerNorm (`use_class_token=False, pooling_type="mean"`).

ImageNet-21k files keep their `pre_logits` layer (Dense + tanh before the head) as the
canonical pooler with `classifier_uses_pooler=True`. MAP heads, hybrid (ResNet stem)
models and fixed sin-cos position embeddings are refused by name. Nothing is ever
unpickled: an archive holding a pickled object is refused before any array is read.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from conversion.sources.base import SourceWeights
from vit_core.config import ViTConfig
from vit_core.errors import CheckpointError, ConfigError
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
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")
# Parts of other model families, refused with what they are.
_REFUSED = {
    "MAPHead_0/": "a MAP (multihead attention pooling) head (big_vision pool_type='map'), "
    "which the canonical ViT layout cannot express",
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

    Judged from the zip directory alone: no array is read. MAP-head, hybrid or sin-cos
    files are claimed too, so that `read` can say by name why they are refused.
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


# ----------------------------------------------------------------------- reading
def _hw(image: Any) -> tuple[int, int]:
    """An image_size hint as (height, width)."""
    if isinstance(image, int) and not isinstance(image, bool):
        return image, image
    if isinstance(image, list | tuple) and len(image) == 2 and all(type(v) is int for v in image):
        return image[0], image[1]
    raise ConfigError(f"image_size must be an int or [height, width]; got {image!r}")


class _Reader:
    """One pass over an opened archive: canonical tensors (unprefixed), config, notes."""

    def __init__(self, archive: _Archive, hints: dict[str, Any]) -> None:
        self.a = archive
        self.path = archive.path
        self.hints = hints
        self.assumed: list[str] = []
        self.t: dict[str, np.ndarray] = {}
        self.f: dict[str, Any] = {}  # what the weights say: sizes, tokens, heads

    def _key(self, key: str) -> str:
        return repr(self.a.prefix + key)

    def _fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def _checked(self, key: str, shape: tuple[int, ...], what: str) -> np.ndarray:
        """The array at `key` (under the prefix), which must have `shape`."""
        found = self.a.shape(key)
        if tuple(found) != tuple(shape):
            raise self._fail(
                f"key {self._key(key)} has shape {tuple(found)}, expected {tuple(shape)} ({what})"
            )
        return self.a.get(key)

    # ------------------------------------------------------------------ layout
    def _refuse_other_families(self) -> None:
        a = self.a
        keys = a.keys()
        for part, what in _REFUSED.items():
            hits = [k for k in keys if k.startswith(part) or f"/{part}" in k]
            if hits:
                raise self._fail(
                    f"key {self._key(hits[0])} shows {what}; refused rather than converted wrongly"
                )
        if not (a.has(POSEMB_VIT_JAX) or a.has(POSEMB_BIG_VISION)):
            raise self._fail(
                f"no learned position embedding ({self._key(POSEMB_VIT_JAX)} or "
                f"{self._key(POSEMB_BIG_VISION)}): a big_vision model with fixed sin-cos "
                "position embeddings (posemb='sincos2d') or none; refused, since its "
                "positions are not stored in the file"
            )
        if a.has(POSEMB_VIT_JAX) and a.has(POSEMB_BIG_VISION):
            raise self._fail(
                f"has both {self._key(POSEMB_VIT_JAX)} and {self._key(POSEMB_BIG_VISION)}; "
                "which one the model adds is unclear"
            )

    def _blocks(self) -> tuple[list[str], bool]:
        """Block key prefixes and whether they are scanned (stacked on a leading axis)."""
        keys = self.a.keys()
        scanned = any(k.startswith("Transformer/encoderblock/") for k in keys)
        indices = sorted({int(m[1]) for k in keys if (m := _BLOCK.match(k))})
        if scanned and indices:
            raise self._fail(
                f"has both scanned ({self.a.prefix}Transformer/encoderblock/) and per-layer "
                f"({self.a.prefix}Transformer/encoderblock_{indices[0]}/) blocks"
            )
        if scanned:
            return ["Transformer/encoderblock/"], True
        if not indices:
            raise self._fail(
                f"no encoder blocks (expected keys under {self.a.prefix}Transformer/"
                f"encoderblock_0/ or {self.a.prefix}Transformer/encoderblock/)"
            )
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        if missing:
            raise self._fail(
                f"missing keys under {self.a.prefix}Transformer/encoderblock_{missing[0]}/ "
                f"(blocks found: {', '.join(map(str, indices))})"
            )
        return [f"Transformer/encoderblock_{i}/" for i in indices], False

    def _numbering(self, first: str) -> str:
        """Module numbering of the blocks: vit_jax's shared counter or big_vision's per type."""
        for fmt in (FORMAT_VIT_JAX, FORMAT_BIG_VISION):
            mha = NUMBERING[fmt][0]
            if self.a.has(f"{first}MultiHeadDotProductAttention_{mha}/query/kernel"):
                return fmt
        raise self._fail(
            f"missing key {self._key(first + 'MultiHeadDotProductAttention_1/query/kernel')} "
            "(vit_jax numbering) or ..._0/query/kernel (big_vision numbering)"
        )

    # ------------------------------------------------------------------- parts
    def _embeddings(self, top_level_posemb: bool) -> None:
        a, t = self.a, self.t
        kernel_shape = a.shape(ANCHOR)
        if len(kernel_shape) != 4:
            raise self._fail(
                f"key {self._key(ANCHOR)} has shape {kernel_shape}; expected a (patch, patch, "
                "channels, width) convolution kernel (a Dense patch embedding, as in NaFlex "
                "models, is not supported)"
            )
        ph, pw, channels, width = kernel_shape
        self.f.update(patch=(ph, pw), channels=channels, width=width)
        t["embeddings.patch_embeddings.projection.weight"] = a.get(ANCHOR).transpose(3, 2, 0, 1)
        t["embeddings.patch_embeddings.projection.bias"] = self._checked(
            "embedding/bias", (width,), "width"
        )
        use_cls = self.f["use_cls"] = a.has("cls")
        if use_cls:
            t["embeddings.cls_token"] = self._checked("cls", (1, 1, width), "class token")
        else:
            self.assumed.append(
                "no class token: the model averages the patch tokens after the final "
                "LayerNorm (pool_type/classifier 'gap'; pool types '0' and 'none' would look "
                "the same in the file)"
            )
        # vit_jax adds positions after prepending the class token (a slot for it);
        # big_vision before (none: the class token's slot is zero, exactly).
        pos_key = POSEMB_BIG_VISION if top_level_posemb else POSEMB_VIT_JAX
        pos_shape = a.shape(pos_key)
        if len(pos_shape) != 3 or pos_shape[0] != 1 or pos_shape[2] != width:
            raise self._fail(
                f"key {self._key(pos_key)} has shape {pos_shape}; expected (1, tokens, {width})"
            )
        has_slot = use_cls and not top_level_posemb
        self.f["grid"] = self._grid(pos_shape[1] - int(has_slot), pos_key)
        pos = a.get(pos_key)
        if use_cls and not has_slot:
            pos = np.concatenate([np.zeros((1, 1, width), np.float32), pos], axis=1)
        t["embeddings.position_embeddings"] = pos

    def _grid(self, patches: int, key: str) -> tuple[int, int]:
        """Patch grid (rows, cols) of `patches` positions: from hints' image_size, else square."""
        patch = self.f["patch"]
        side = math.isqrt(patches)
        square = side * side == patches
        image = self.hints.get("image_size")
        if image is not None:
            h, w = _hw(image)
            if h % patch[0] == 0 and w % patch[1] == 0:
                grid = (h // patch[0], w // patch[1])
                if grid[0] * grid[1] == patches:
                    return grid
            if square:
                self.assumed.append(
                    f"image_size {image} given, but {self.a.prefix + key} holds {patches} patch "
                    f"positions: used the square {side}x{side} grid the weights were trained at"
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

    def _sizes(self, blocks: list[str], scanned: bool, numbering: str) -> None:
        """Depth, heads and MLP width, from the first block's attention and MLP kernels."""
        width = self.f["width"]
        mha_i, _, mlp_i = NUMBERING[numbering]
        lead = 1 if scanned else 0
        q_key = f"{blocks[0]}MultiHeadDotProductAttention_{mha_i}/query/kernel"
        q_shape = self.a.shape(q_key)
        if len(q_shape) != 3 + lead or q_shape[lead] != width:
            raise self._fail(
                f"key {self._key(q_key)} has shape {q_shape}; expected "
                f"{'(layers, ' if scanned else '('}{width}, heads, head_dim)"
            )
        heads, head_dim = q_shape[-2:]
        if heads * head_dim != width:
            raise self._fail(
                f"key {self._key(q_key)} has {heads} heads x {head_dim} = {heads * head_dim} "
                f"features; the canonical layout needs heads x head_dim = width ({width})"
            )
        m_key = f"{blocks[0]}MlpBlock_{mlp_i}/Dense_0/kernel"
        m_shape = self.a.shape(m_key)
        if len(m_shape) != 2 + lead:
            raise self._fail(f"key {self._key(m_key)} has shape {m_shape}; expected (width, mlp)")
        self.f.update(
            depth=q_shape[0] if scanned else len(blocks),
            heads=heads,
            intermediate=m_shape[-1],
        )

    def _encoder(self, blocks: list[str], scanned: bool, numbering: str) -> None:
        t, f = self.t, self.f
        width, depth, heads, mlp_dim = f["width"], f["depth"], f["heads"], f["intermediate"]
        head_dim = width // heads
        mha_i, ln2_i, mlp_i = NUMBERING[numbering]
        stacked: dict[str, np.ndarray] = {}  # scanned arrays, read once for all layers

        def take(i: int, key: str, shape: tuple[int, ...], what: str) -> np.ndarray:
            if not scanned:
                return self._checked(blocks[i] + key, shape, what)
            if key not in stacked:
                stacked[key] = self._checked(blocks[0] + key, (depth, *shape), what)
            return stacked[key][i]

        mha, mlp = f"MultiHeadDotProductAttention_{mha_i}/", f"MlpBlock_{mlp_i}/"
        for i in range(depth):
            c = f"encoder.layer.{i}."
            for ln, name in ((0, "layernorm_before"), (ln2_i, "layernorm_after")):
                t[c + name + ".weight"] = take(i, f"LayerNorm_{ln}/scale", (width,), "width")
                t[c + name + ".bias"] = take(i, f"LayerNorm_{ln}/bias", (width,), "width")
            for part in ("query", "key", "value"):
                kernel = take(i, f"{mha}{part}/kernel", (width, heads, head_dim), "(D, H, hd)")
                t[c + f"attention.attention.{part}.weight"] = kernel.reshape(width, width).T
                bias = take(i, f"{mha}{part}/bias", (heads, head_dim), "(heads, head_dim)")
                t[c + f"attention.attention.{part}.bias"] = bias.reshape(width)
            out = take(i, f"{mha}out/kernel", (heads, head_dim, width), "(H, hd, D)")
            t[c + "attention.output.dense.weight"] = out.reshape(width, width).T
            t[c + "attention.output.dense.bias"] = take(i, f"{mha}out/bias", (width,), "width")
            fc1 = take(i, f"{mlp}Dense_0/kernel", (width, mlp_dim), "(width, mlp)")
            t[c + "intermediate.dense.weight"] = fc1.T
            t[c + "intermediate.dense.bias"] = take(i, f"{mlp}Dense_0/bias", (mlp_dim,), "mlp")
            fc2 = take(i, f"{mlp}Dense_1/kernel", (mlp_dim, width), "(mlp, width)")
            t[c + "output.dense.weight"] = fc2.T
            t[c + "output.dense.bias"] = take(i, f"{mlp}Dense_1/bias", (width,), "width")
        for name, key in (("weight", "scale"), ("bias", "bias")):
            norm = f"Transformer/encoder_norm/{key}"
            t[f"layernorm.{name}"] = self._checked(norm, (width,), "width")

    def _heads(self) -> None:
        """pre_logits (Dense + tanh) -> the pooler; head -> the classifier (if any classes)."""
        a, t, width = self.a, self.t, self.f["width"]
        pooler = a.has("pre_logits/kernel") or a.has("pre_logits/bias")
        rep = width
        if pooler:
            p_shape = a.shape("pre_logits/kernel")
            if len(p_shape) != 2 or p_shape[0] != width:
                raise self._fail(
                    f"key {self._key('pre_logits/kernel')} has shape {p_shape}; expected "
                    f"({width}, representation_size)"
                )
            rep = p_shape[1]
            t["pooler.dense.weight"] = a.get("pre_logits/kernel").T
            t["pooler.dense.bias"] = self._checked("pre_logits/bias", (rep,), "pre_logits size")
        num_labels = 0
        if a.has("head/kernel") or a.has("head/bias"):
            h_shape = a.shape("head/kernel")
            if len(h_shape) != 2 or h_shape[0] != rep:
                raise self._fail(
                    f"key {self._key('head/kernel')} has shape {h_shape}; expected "
                    f"({rep}, num_classes)"
                )
            num_labels = h_shape[1]
            kernel = a.get("head/kernel")
            bias = self._checked("head/bias", (num_labels,), "classes")
            if num_labels and pooler and rep != width:
                raise self._fail(
                    f"pre_logits maps width {width} to {rep} features before the head; the "
                    "canonical classifier reads width-sized features, so only "
                    "representation_size == hidden_size is supported"
                )
            if num_labels:
                t["classifier.weight"] = kernel.T
                t["classifier.bias"] = bias
            else:
                self.assumed.append("zero-sized head: converted as a base model (no classifier)")
        self.f.update(pooler=pooler, rep=rep, num_labels=num_labels)

    # -------------------------------------------------------------------- all
    def read(self) -> SourceWeights:
        a = self.a
        self._refuse_other_families()
        blocks, scanned = self._blocks()
        numbering = self._numbering(blocks[0])
        top_level_posemb = a.has(POSEMB_BIG_VISION)
        self._embeddings(top_level_posemb)
        self._sizes(blocks, scanned, numbering)
        self._encoder(blocks, scanned, numbering)
        self._heads()
        leftover = sorted(set(a.keys()) - a.used)
        if leftover:
            raise self._fail(
                f"keys this reader does not know ({len(leftover)}): "
                + ", ".join(a.prefix + k for k in leftover[:10])
                + ("" if len(leftover) <= 10 else ", ...")
                + "; refused rather than dropped"
            )
        big_vision = (
            a.prefix.startswith("params/")
            or top_level_posemb
            or scanned
            or numbering == FORMAT_BIG_VISION
        )
        classifier = self.f["num_labels"] > 0
        prefix = "vit." if classifier else ""
        tensors = {  # contiguous: a transposed view must not reach a raw-buffer writer
            (k if k.startswith("classifier.") else prefix + k): np.ascontiguousarray(v)
            for k, v in self.t.items()
        }
        config = self._config()
        kind = ModelKind(classifier=classifier, pooler=self.f["pooler"])
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

    def _config(self) -> dict[str, Any]:
        f, hints = self.f, self.hints
        (ph, pw), (gh, gw) = f["patch"], f["grid"]
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
        config: dict[str, Any] = {
            "hidden_size": f["width"],
            "num_hidden_layers": f["depth"],
            "num_attention_heads": f["heads"],
            "intermediate_size": f["intermediate"],
            "hidden_act": act,
            "layer_norm_eps": eps,
            "image_size": gh * ph if square else [gh * ph, gw * pw],
            "patch_size": ph if ph == pw else [ph, pw],
            "num_channels": f["channels"],
            "qkv_bias": True,
            "use_class_token": f["use_cls"],
            "pooling_type": "cls" if f["use_cls"] else "mean",
            "classifier_uses_pooler": f["pooler"] and f["num_labels"] > 0,
            "num_labels": f["num_labels"],
        }
        if ph == pw:
            config["encoder_stride"] = ph
        if f["pooler"]:
            config["pooler_output_size"] = f["rep"]
            config["pooler_act"] = "tanh"
        return config

    def _processor(self) -> dict[str, Any]:
        (ph, pw), (gh, gw), channels = self.f["patch"], self.f["grid"], self.f["channels"]
        return {
            "do_resize": True,
            "size": {"height": gh * ph, "width": gw * pw},
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
