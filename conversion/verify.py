"""`--verify`: evidence that the converted folder computes what the source computed.

The folder is loaded in both backends with `vit_core.load` (the road every user takes)
and a fixed, seeded probe batch goes through both; where the source's own library is
importable it runs too: timm (a `VisionTransformer` built from the config, holding the
source state dict; for `.npz` sources, timm's own `.npz` loader) or transformers (from
the source folder, PyTorch or Flax as stored). Every output is compared as max abs
difference. All compute is float32; for a cast (`--dtype`), the source's weights go
through the same rounding first, so only conversion mistakes show.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from vit_core.backend import BACKENDS
from vit_core.config import TANH_GELU, ViTConfig
from vit_core.errors import ViTError
from vit_core.layout import ModelKind, model_kind
from vit_core.loading import PROBE_BATCH, PROBE_SEED, folder_outputs, probe

TOLERANCE = {"float32": 1e-5}  # any other stored dtype: DEFAULT_TOLERANCE
DEFAULT_TOLERANCE = 1e-4

Outputs = dict[str, np.ndarray]


@dataclass
class Comparison:
    left: str
    right: str
    output: str
    diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.diff <= self.tolerance)


@dataclass
class VerifyReport:
    """Every comparison made, and why any source check was skipped."""

    image_size: tuple[int, int]
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and all(c.ok for c in self.comparisons)

    def format(self) -> str:
        h, w = self.image_size
        lines = [
            f"verify: {PROBE_BATCH} seeded probe images at {h}x{w} (seed {PROBE_SEED}), "
            "float32 compute; max abs differences:"
        ]
        for c in self.comparisons:
            verdict = "ok" if c.ok else f"MISMATCH (> {c.tolerance:g})"
            lines.append(
                f"  {c.left + ' vs ' + c.right:<22} {c.output:<18} {c.diff:.3e}  {verdict}"
            )
        lines += [f"  FAILED: {failure}" for failure in self.failures]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


class VerificationError(ViTError):
    """The converted folder does not compute what the source computes."""

    def __init__(self, report: VerifyReport) -> None:
        self.report = report
        bad = [f"{c.left} vs {c.right} {c.output} {c.diff:.3e}" for c in report.comparisons]
        bad = [b for b, c in zip(bad, report.comparisons, strict=True) if not c.ok]
        bad += report.failures
        super().__init__("verification failed, so the output was not written: " + "; ".join(bad))


# ------------------------------------------------------------------- sources
def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _torch_state(tensors: Mapping[str, np.ndarray], dtype: str) -> dict[str, Any]:
    """numpy (bfloat16 included) -> float32 torch tensors, rounded through `dtype`."""
    import torch

    state = {}
    for key, value in tensors.items():
        if str(value.dtype) == "bfloat16":
            tensor = torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.array(value))
        state[key] = tensor.to(getattr(torch, dtype)).float()
    return state


_TIMM_ACT = {
    "gelu": "gelu",
    **dict.fromkeys(TANH_GELU, "gelu_tanh"),
    "quick_gelu": "quick_gelu",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
    "tanh": "tanh",
}
_TIMM_POOL = {"cls": "token", "mean": "avg", "map": "map"}


def _timm_model(config: ViTConfig, kind: ModelKind, no_embed_class: bool | None = None) -> Any:
    """A timm VisionTransformer (VisionTransformerDistilled for DeiT distilled) with this
    config's architecture and numerics: every family switch of docs/families.md.

    A timm or `.npz` file does not record its activation or LayerNorm eps, so the source
    model takes them from the converted config (a `--gelu`/`--set` there is a statement
    about the source). A transformers source records them and runs as it is.
    `no_embed_class`: the source's position table has no prefix rows (a big_vision file,
    whose class slot the converted folder fills with a zero row), else the config's.
    """
    import torch
    from timm.layers import LayerNorm, Mlp, SwiGLUPacked
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    width = config.mlp_in_width
    ratio = width / config.hidden_size
    if int(config.hidden_size * ratio) != width:
        raise _Skip(f"timm cannot express MLP width {width} at width {config.hidden_size}")
    if config.hidden_act not in _TIMM_ACT:
        raise _Skip(f"timm has no activation {config.hidden_act!r}")
    scaled = config.layerscale_value is not None
    settings: dict[str, Any] = {
        "img_size": config.image_hw,
        "patch_size": config.patch_hw,
        "in_chans": config.num_channels,
        "num_classes": config.num_labels if kind.classifier else 0,
        "global_pool": _TIMM_POOL[config.pooling_type],
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": ratio,
        "qkv_bias": config.qkv_bias,
        "class_token": config.use_class_token,
        "no_embed_class": config.no_embed_class if no_embed_class is None else no_embed_class,
        "reg_tokens": config.num_register_tokens,
        # LayerScale exists iff init_values is truthy; the weights replace the init
        "init_values": (config.layerscale_value or 1.0) if scaled else None,
        "pre_norm": config.use_pre_norm,
        "final_norm": config.use_final_norm,
        "fc_norm": config.use_fc_norm,
        "act_layer": _TIMM_ACT[config.hidden_act],
        "norm_layer": functools.partial(LayerNorm, eps=config.layer_norm_eps),
        "mlp_layer": SwiGLUPacked if config.use_swiglu_ffn else Mlp,
    }
    cls = VisionTransformerDistilled if config.use_distillation_token else VisionTransformer
    model = cls(**settings)
    proj = model.patch_embed.proj  # timm ties the patch bias to `not pre_norm`
    if config.patch_embedding_bias and proj.bias is None:
        proj.bias = torch.nn.Parameter(torch.zeros(proj.out_channels))
    elif not config.patch_embedding_bias and proj.bias is not None:
        proj.bias = None
    return model.eval()


def _timm_outputs(model: Any, kind: ModelKind, pixels: np.ndarray) -> Outputs:
    """forward_features (every token, after the final norm), the logits (DeiT distilled:
    each head's too), and the image embedding (forward_head's pre_logits) where it is the
    folder's pooler_output: not for a Dense+tanh pooler, nor DeiT distilled (timm's is the
    mean of its two tokens, the folder's the class token)."""
    import torch

    with torch.inference_mode():
        features = model.forward_features(torch.from_numpy(pixels))
        out = {"last_hidden_state": _numpy(features)}
        if kind.classifier:
            out["logits"] = _numpy(model.forward_head(features))
        if kind.classifier and hasattr(model, "dist_token"):  # DeiT: both heads, then the mean
            out["cls_logits"] = _numpy(model.head(features[:, 0]))
            out["distillation_logits"] = _numpy(model.head_dist(features[:, 1]))
        if not kind.pooler and not hasattr(model, "dist_token"):
            out["pooler_output"] = _numpy(model.forward_head(features, pre_logits=True))
    return out


def timm_source(path: Path, reader: ModuleType, config: ViTConfig, kind: ModelKind,
                dtype: str, pixels: np.ndarray) -> Outputs:  # fmt: skip
    """timm running the source state dict, in a model built from the converted config."""
    import re

    import torch

    from conversion.sources import read_state_dict

    tensors, _ = read_state_dict(reader.weight_files(path)[0])
    if "pre_logits.fc.weight" in tensors:
        raise _Skip("timm since 0.6 has no pre_logits layer to run this checkpoint's pooler")
    if kind.pooler and not kind.classifier:
        raise _Skip("timm has no pooler")
    # the original DeiT-3 names of layer scale, as timm's own checkpoint filter renames them
    tensors = {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in tensors.items()}
    model = _timm_model(config, kind)
    if "attn_pool.latent" in tensors and "attn_pool.q.weight" not in tensors:
        model.attn_pool.q = torch.nn.Identity()  # q_proj=False: the latent is the query
    model.load_state_dict(_torch_state(tensors, dtype), strict=True)
    return _timm_outputs(model, kind, pixels)


def jax_source(path: Path, reader: ModuleType, config: ViTConfig, kind: ModelKind,
               dtype: str, pixels: np.ndarray) -> Outputs:  # fmt: skip
    """timm's own `.npz` loader (it reads the original and big_vision layouts, MAP heads
    included). A big_vision file with sincos2d positions stores none, and timm's loader
    needs them: it reads a copy holding the table the reader computes
    (`sincos_position_table`, big_vision's formula), so everything else is still checked."""
    import tempfile

    import torch

    if config.classifier_uses_pooler or kind.pooler:
        raise _Skip("timm drops the pre_logits layer of ImageNet-21k .npz files")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    table_key = next((k for k in arrays if k.endswith("pos_embedding")), None)
    with tempfile.TemporaryDirectory() as tmp:
        source = str(path)
        if table_key is None:
            anchor = next(k for k in arrays if k.endswith("embedding/kernel"))
            prefix = anchor[: -len("embedding/kernel")]
            height, width = config.grid_hw
            arrays[prefix + "pos_embedding"] = reader.sincos_position_table(
                height, width, config.hidden_size
            )
            source = str(Path(tmp) / "with_positions.npz")
            np.savez(source, **arrays)
            rows = height * width
        else:
            rows = arrays[table_key].shape[1]
        no_embed_class = config.use_class_token and rows == config.num_positions - 1
        model = _timm_model(config, kind, no_embed_class)
        try:
            model.load_pretrained(source)
        except Exception as exc:  # timm's loader raises whatever its key lookups raise
            raise _Skip(
                f"timm's .npz loader could not read it ({type(exc).__name__}: {exc})"
            ) from None
    if dtype != "float32":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(getattr(torch, dtype)).float())
    return _timm_outputs(model, kind, pixels)


def hf_source(path: Path, reader: ModuleType, config: ViTConfig, kind: ModelKind,
              dtype: str, pixels: np.ndarray) -> Outputs:  # fmt: skip
    """transformers (PyTorch, or Flax for a msgpack source) from the source folder."""
    import transformers

    transformers.logging.set_verbosity_error()
    folder = reader.source_folder(path)
    if not (folder / "config.json").is_file():
        raise _Skip("transformers needs the source's config.json, and there is none")
    family = reader.family_of(path)
    if family is not None:  # a DINOv2, CLIP, SigLIP, DeiT or ViT-MAE folder
        model_type, head = family
        return _hf_family_outputs(folder, model_type, head, config, kind, dtype, pixels)
    if not config.transformers_compatible:
        raise _Skip("the config uses fields transformers ignores (see EXTENSION_FIELDS)")
    flax = reader.weight_files(path)[0].suffix == ".msgpack"
    prefix = "Flax" if flax else ""
    base_cls = getattr(transformers, f"{prefix}ViTModel")
    base = base_cls.from_pretrained(folder, add_pooling_layer=kind.pooler)
    head = (
        getattr(transformers, f"{prefix}ViTForImageClassification").from_pretrained(folder)
        if kind.classifier
        else None
    )
    if flax:
        return _hf_flax_outputs(base, head, dtype, pixels, kind)
    return _hf_torch_outputs(base, head, dtype, pixels, kind)


def _hf_torch_outputs(base: Any, head: Any, dtype: str, pixels: np.ndarray, kind: Any) -> Outputs:
    import torch

    out: Outputs = {}
    x = torch.from_numpy(pixels)
    with torch.inference_mode():
        for model in (m for m in (base, head) if m is not None):
            model.float().eval()
            for p in model.parameters():
                p.copy_(p.to(getattr(torch, dtype)).float())
        if head is not None:
            out["logits"] = _numpy(head(x).logits)
        result = base(x)
    out["last_hidden_state"] = _numpy(result.last_hidden_state)
    if kind.pooler:
        out["pooler_output"] = _numpy(result.pooler_output)
    return out


def _hf_flax_outputs(base: Any, head: Any, dtype: str, pixels: np.ndarray, kind: Any) -> Outputs:
    import jax
    import jax.numpy as jnp

    from vit_core.checkpoint import numpy_dtype

    def rounded(params: Any) -> Any:
        cast = numpy_dtype(dtype)
        return jax.tree_util.tree_map(
            lambda a: jnp.asarray(np.asarray(a).astype(cast).astype(np.float32)), params
        )

    out: Outputs = {}
    if head is not None:
        out["logits"] = _numpy(head(pixels, params=rounded(head.params)).logits)
    result = base(pixels, params=rounded(base.params))
    out["last_hidden_state"] = _numpy(result.last_hidden_state)
    if kind.pooler:
        out["pooler_output"] = _numpy(result.pooler_output)
    return out


def _hf_family_outputs(folder: Path, model_type: str, head: str, config: ViTConfig,
                       kind: ModelKind, dtype: str, pixels: np.ndarray) -> Outputs:  # fmt: skip
    """transformers' own class for a ViT-family source, its outputs named as the converted
    folder's: CLIP's last_hidden_state after post_layernorm (transformers returns it
    before), CLIP's image embeddings as `logits`, DeiT's two heads beside their mean,
    ViT-MAE with nothing masked (mask_ratio 0, patches in order)."""
    import torch
    import transformers

    def load(name: str, **kwargs: Any) -> Any:
        model = getattr(transformers, name).from_pretrained(folder, **kwargs).float().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(getattr(torch, dtype)).float())
        return model

    x = torch.from_numpy(pixels)
    out: Outputs = {}
    with torch.inference_mode():
        if model_type in ("dinov2", "dinov2_with_registers"):
            height, width = config.image_hw
            if height != width:
                raise _Skip(
                    "transformers' DINOv2 resamples its position table for non-square "
                    "inputs, even at the trained size"
                )
            name = "Dinov2Model" if model_type == "dinov2" else "Dinov2WithRegistersModel"
            result = load(name)(x)
            out["last_hidden_state"] = _numpy(result.last_hidden_state)
            out["pooler_output"] = _numpy(result.pooler_output)
        elif model_type in ("clip", "clip_vision_model"):
            name = {"clip": "CLIPModel", "projection": "CLIPVisionModelWithProjection"}.get(
                model_type if model_type == "clip" else head, "CLIPVisionModel"
            )
            model = load(name)
            vision = model.vision_model
            result = vision(x)
            out["last_hidden_state"] = _numpy(vision.post_layernorm(result.last_hidden_state))
            out["pooler_output"] = _numpy(result.pooler_output)
            if kind.classifier:
                out["logits"] = _numpy(model.visual_projection(result.pooler_output))
        elif model_type in ("siglip", "siglip_vision_model"):
            name = "SiglipModel" if model_type == "siglip" else "SiglipVisionModel"
            result = load(name).vision_model(x)
            out["last_hidden_state"] = _numpy(result.last_hidden_state)
            if result.pooler_output is not None:  # no MAP head: transformers has no pooler
                out["pooler_output"] = _numpy(result.pooler_output)
        elif model_type == "deit" and head == "teacher":
            model = load("DeiTForImageClassificationWithTeacher")
            result = model(x)
            for name in ("logits", "cls_logits", "distillation_logits"):
                out[name] = _numpy(getattr(result, name))
            out["last_hidden_state"] = _numpy(model.deit(x).last_hidden_state)
        elif model_type == "deit":
            result = load("DeiTModel", add_pooling_layer=kind.pooler)(x)
            out["last_hidden_state"] = _numpy(result.last_hidden_state)
            if kind.pooler:
                out["pooler_output"] = _numpy(result.pooler_output)
        elif model_type == "vit_mae":
            gh, gw = config.grid_hw
            noise = torch.arange(gh * gw, dtype=torch.float32).expand(len(pixels), -1)
            result = load("ViTMAEModel", mask_ratio=0.0)(x, noise=noise)
            out["last_hidden_state"] = _numpy(result.last_hidden_state)
        else:
            raise _Skip(f"no transformers class known for model_type {model_type!r}")
    return out


class _Skip(Exception):
    """The source library cannot run this source; the reason goes into the report."""


SOURCE_RUNNERS: dict[str, tuple[str, Callable[..., Outputs]]] = {
    "timm": ("timm", timm_source),
    "jax": ("timm", jax_source),
    "hf": ("transformers", hf_source),
}


# --------------------------------------------------------------------- verify
def verify_folder(
    folder: Path, source: Path, source_kind: str, reader: ModuleType, dtype: str, resampled: bool
) -> VerifyReport:
    """Compare both twins with each other and, where possible, with the source library."""
    import importlib.util

    from safetensors import safe_open

    config = ViTConfig.from_pretrained(folder)
    with safe_open(folder / "model.safetensors", framework="np") as handle:
        kind = model_kind(set(handle.keys()), config)
    pixels = probe(config)
    tolerance = TOLERANCE.get(dtype, DEFAULT_TOLERANCE)
    report = VerifyReport(image_size=config.image_hw)
    twins = {}
    for backend in BACKENDS:
        try:
            twins[backend] = folder_outputs(folder, backend, pixels)
        except Exception as exc:  # whatever stops a backend is a failed verification
            first = str(exc).splitlines()[0] if str(exc) else ""
            report.failures.append(
                f"{backend} could not load or run the converted folder "
                f"({type(exc).__name__}: {first})"
            )
    if len(twins) == 2:
        _compare(report, "torch", twins["torch"], "flax", twins["flax"], tolerance)
    library, runner = SOURCE_RUNNERS.get(source_kind, (None, None))
    if runner is None or library is None:
        report.notes.append(f"no source library known for {source_kind!r} sources")
    elif resampled:
        report.notes.append("source not run: the position embeddings were resampled")
    elif importlib.util.find_spec(library) is None:
        report.notes.append(f"source not run: {library} is not installed")
    else:
        try:
            expected = runner(source, reader, config, kind, dtype, pixels)
        except _Skip as why:
            report.notes.append(f"source not run: {why}")
        else:
            for backend, outputs in twins.items():
                _compare(report, library, expected, backend, outputs, tolerance)
    return report


def _compare(
    report: VerifyReport, left: str, a: Outputs, right: str, b: Outputs, tolerance: float
) -> None:
    for name in a:
        if name not in b:
            continue
        if a[name].shape != b[name].shape:
            diff = float("inf")
        else:
            diff = (
                float(np.max(np.abs(a[name].astype(np.float64) - b[name]))) if a[name].size else 0.0
            )
        report.comparisons.append(Comparison(left, right, name, diff, tolerance))
