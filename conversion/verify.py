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
from vit_core.loading import folder_outputs

PROBE_SEED = 0
PROBE_BATCH = 2
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


def probe(config: ViTConfig) -> np.ndarray:
    """The fixed probe batch: unit-normal pixels, (PROBE_BATCH, C, H, W) float32."""
    height, width = config.image_hw
    rng = np.random.default_rng(PROBE_SEED)
    shape = (PROBE_BATCH, config.num_channels, height, width)
    return rng.standard_normal(shape).astype(np.float32)


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


def _timm_model(config: ViTConfig, kind: ModelKind, no_embed_class: bool) -> Any:
    """A timm VisionTransformer with this config's architecture and numerics.

    A timm or `.npz` file does not record its activation or LayerNorm eps, so the source
    model takes them from the converted config (a `--gelu`/`--set` there is a statement
    about the source). A transformers source records them and runs as it is.
    """
    import torch
    from timm.models.vision_transformer import VisionTransformer

    ratio = config.intermediate_size / config.hidden_size
    if int(config.hidden_size * ratio) != config.intermediate_size:
        raise ValueError(f"timm cannot express MLP width {config.intermediate_size}")
    tanh = config.hidden_act in TANH_GELU
    act = functools.partial(torch.nn.GELU, approximate="tanh") if tanh else torch.nn.GELU
    model = VisionTransformer(
        img_size=config.image_hw,
        patch_size=config.patch_hw,
        in_chans=config.num_channels,
        num_classes=config.num_labels if kind.classifier else 0,
        global_pool="token" if config.pooling_type == "cls" else "avg",
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=ratio,
        qkv_bias=config.qkv_bias,
        class_token=config.use_class_token,
        no_embed_class=no_embed_class,
        fc_norm=False,
        act_layer=act,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=config.layer_norm_eps),
    )
    return model.eval()


def _timm_outputs(model: Any, kind: ModelKind, pixels: np.ndarray) -> Outputs:
    import torch

    with torch.inference_mode():
        features = model.forward_features(torch.from_numpy(pixels))
        out = {"last_hidden_state": _numpy(features)}
        if kind.classifier:
            out["logits"] = _numpy(model.forward_head(features))
    return out


def timm_source(path: Path, reader: ModuleType, config: ViTConfig, kind: ModelKind,
                dtype: str, pixels: np.ndarray) -> Outputs:  # fmt: skip
    """timm running the source state dict, in a model built from the converted config."""
    from conversion.sources import read_state_dict

    tensors, _ = read_state_dict(reader.weight_files(path)[0])
    if "pre_logits.fc.weight" in tensors:
        raise _Skip("timm since 0.6 has no pre_logits layer to run this checkpoint's pooler")
    if kind.pooler and not kind.classifier:
        raise _Skip("timm has no pooler")
    table = tensors["pos_embed"]
    no_embed_class = config.use_class_token and table.shape[1] == config.num_positions - 1
    model = _timm_model(config, kind, no_embed_class)
    model.load_state_dict(_torch_state(tensors, dtype), strict=True)
    return _timm_outputs(model, kind, pixels)


def jax_source(path: Path, reader: ModuleType, config: ViTConfig, kind: ModelKind,
               dtype: str, pixels: np.ndarray) -> Outputs:  # fmt: skip
    """timm's own `.npz` loader (it reads the original and big_vision layouts)."""
    import torch

    if config.classifier_uses_pooler or kind.pooler:
        raise _Skip("timm drops the pre_logits layer of ImageNet-21k .npz files")
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        table_key = next((k for k in names if k.endswith("pos_embedding")), None)
        rows = archive[table_key].shape[1] if table_key else None
    no_embed_class = config.use_class_token and rows == config.num_positions - 1
    model = _timm_model(config, kind, no_embed_class)
    try:
        model.load_pretrained(str(path))
    except Exception as exc:  # timm's loader raises whatever its key lookups raise
        raise _Skip(f"timm's .npz loader could not read it ({type(exc).__name__}: {exc})") from None
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
