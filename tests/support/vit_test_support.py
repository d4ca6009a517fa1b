"""Helpers shared by test modules: random canonical folders and architectures to draw.

Test folders are not packages (several hold a test_cli.py or a test_docs.py), so shared
code lives here, on pytest's `pythonpath`, under a name that cannot shadow a real package.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from safetensors.numpy import save_file

from vit_core import ViTConfig, ViTImageProcessor
from vit_core.layout import WEIGHTS_NAME, ModelKind, expected_shapes

# Largest max-abs difference per named comparison over the run (tests/conftest.py prints
# it and writes it with --parity-json; the README's parity table is made from that file).
MAX_DIFFS: dict[str, float] = {}


def record_max_diff(name: str, diff: float) -> None:
    MAX_DIFFS[name] = max(float(diff), MAX_DIFFS.get(name, 0.0))  # numpy's: JSON


def random_canonical_weights(
    config: ViTConfig, kind: ModelKind, seed: int
) -> dict[str, np.ndarray]:
    """Every tensor of the layout, perturbed, at a scale that keeps activations near unit size."""
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in expected_shapes(config, kind).items():
        if key.endswith("bias"):
            value = 0.1 * rng.standard_normal(shape)
        elif key.endswith(".lambda1"):  # LayerScale: far from 1 (and from a 1e-5 init)
            value = 0.3 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:  # LayerNorm scales: the other 1-D weights
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif key.endswith(("_token", "_tokens", "position_embeddings", "probe")):
            value = 0.5 * rng.standard_normal(shape)
        else:  # Linear (out, in) and Conv2d (O, I, H, W): scale by fan-in
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        weights[key] = value.astype(np.float32)
    return weights


def write_folder(folder: Path, config: ViTConfig, kind: ModelKind, seed: int) -> None:
    save_file(random_canonical_weights(config, kind, seed), folder / WEIGHTS_NAME, {"format": "pt"})
    config.save_pretrained(folder)


@st.composite
def architectures(draw: st.DrawFn) -> tuple[ViTConfig, ModelKind]:
    heads = draw(st.sampled_from([1, 2, 4]))
    patch = (draw(st.sampled_from([2, 4, 8])), draw(st.sampled_from([2, 4, 8])))
    grid = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    classifier = draw(st.booleans())
    use_class_token = draw(st.booleans())
    pooling = draw(st.sampled_from(["cls", "mean", "map"] if use_class_token else ["mean", "map"]))
    final_norm = draw(st.booleans())
    distilled = use_class_token and pooling == "cls" and draw(st.booleans())
    # a distilled classifier's heads read the tokens themselves, never a pooler
    uses_pooler = classifier and not distilled and draw(st.booleans())
    config = ViTConfig(
        hidden_size=heads * draw(st.sampled_from([4, 8])),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        intermediate_size=draw(st.sampled_from([16, 24])),
        hidden_act=draw(
            st.sampled_from(["gelu", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu"])
        ),
        layer_norm_eps=draw(st.sampled_from([1e-12, 1e-6])),
        image_size=(grid[0] * patch[0], grid[1] * patch[1]),
        patch_size=patch,
        num_channels=draw(st.sampled_from([1, 3])),
        qkv_bias=draw(st.booleans()),
        use_class_token=use_class_token,
        pooling_type=pooling,
        classifier_uses_pooler=uses_pooler,
        num_labels=draw(st.sampled_from([0, 1, 3])) if classifier else 2,
        # the family switches (docs/families.md)
        num_register_tokens=draw(st.sampled_from([0, 0, 1, 4])),
        use_distillation_token=distilled,
        no_embed_class=draw(st.booleans()),
        layerscale_value=draw(st.sampled_from([None, 0.3])),
        use_pre_norm=draw(st.booleans()),
        patch_embedding_bias=draw(st.booleans()),
        use_final_norm=final_norm,
        use_fc_norm=final_norm and draw(st.booleans()),
        use_swiglu_ffn=draw(st.booleans()),
    )
    kind = ModelKind(
        classifier=classifier,
        pooler=config.classifier_uses_pooler if classifier else draw(st.booleans()),
    )
    return config, kind


ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "vit_core" / "assets" / "vit-digits"


def load_script(name: str) -> Any:
    """scripts/NAME.py as a module (the scripts import each other by plain name)."""
    import importlib.util
    import sys

    scripts = str(ROOT / "scripts")
    sys.path.insert(0, scripts)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(scripts)
    return module


def training_digits(count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` digits of the shipped model's training split (never its held-out
    ones: the split of scripts/train_digits.py), through the shipped processor."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.data.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    x_train, _, y_train, _ = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    processor = ViTImageProcessor.from_pretrained(SHIPPED)
    pixels = processor(list(x_train[:count]), return_tensors="np")["pixel_values"]
    return pixels, y_train[:count]


TINY_FIELDS: dict[str, Any] = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "image_size": 8,
    "patch_size": 4,
    "num_labels": 3,
}


def tiny_config(**fields: Any) -> ViTConfig:
    """A model small enough to build in milliseconds (two layers, width 16, 8x8 pixels in
    2x2 patches of 4, three labels), with `fields` changed."""
    return ViTConfig(**{**TINY_FIELDS, **fields})


# With dropout on: both twins' model tests use it.
TINY_DROPOUT_CONFIG = tiny_config(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)

# Each family the converter writes (docs/families.md), as `tiny_config` fields and the
# model kind its folders hold: for tests that must cover every family (the exports).
FAMILIES: dict[str, tuple[dict[str, Any], ModelKind]] = {
    "vit": ({}, ModelKind(classifier=True, pooler=False)),
    "vit-pooler": ({}, ModelKind(classifier=False, pooler=True)),
    "deit-distilled": (
        {"use_distillation_token": True},
        ModelKind(classifier=True, pooler=False),
    ),
    "deit3": (
        {"layerscale_value": 0.3, "no_embed_class": True},
        ModelKind(classifier=True, pooler=False),
    ),
    "dinov2-registers": (
        {"num_register_tokens": 4, "no_embed_class": True, "layerscale_value": 0.3},
        ModelKind(classifier=False, pooler=False),
    ),
    "dinov2-swiglu": (
        {"use_swiglu_ffn": True, "hidden_act": "silu", "layerscale_value": 0.3},
        ModelKind(classifier=False, pooler=False),
    ),
    "clip": (
        {"use_pre_norm": True, "patch_embedding_bias": False, "hidden_act": "quick_gelu"},
        ModelKind(classifier=False, pooler=False),
    ),
    "siglip-map": (
        {"use_class_token": False, "pooling_type": "map"},
        ModelKind(classifier=False, pooler=False),
    ),
    "gap-fc-norm": (
        {"use_class_token": False, "pooling_type": "mean", "use_fc_norm": True},
        ModelKind(classifier=True, pooler=False),
    ),
}


def write_photos(
    root: Path,
    photos: Mapping[str, tuple[str, tuple[int, int]]],
    broken: Mapping[str, str] | None = None,
) -> Path:
    """Real photos for tests that read image files, under `root` (returned).

    `photos`: path -> (a scikit-image photo: "chelsea", "astronaut", "coffee"; the
    (width, height) to resize it to), saved in the format the suffix names. `broken`:
    path -> how no decoder reads it: "empty", "text" (text under an image's name), "cut"
    (a JPEG cut in half).
    """
    from PIL import Image
    from skimage import data

    for name, (photo, size) in photos.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(getattr(data, photo)())
        picture.resize(size, Image.Resampling.BILINEAR).save(root / name)
    for name, how in (broken or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if how == "cut":
            jpeg = io.BytesIO()
            Image.fromarray(data.coffee()).save(jpeg, "JPEG")
            (root / name).write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
        else:
            (root / name).write_text({"empty": "", "text": "not an image"}[how])
    return root


# The `finetune` settings of the tests' runs on the small digits folder (tests/conftest.py's
# `digits_folder`): the shipped model at 16x16, 3 epochs of 3 steps of 16 digits, every
# part of the recipe switched on (warm-up, cosine, layer decay, label smoothing, crops).
FINETUNE_ARGS = (
    *("--image-size", "16", "--epochs", "3", "--batch-size", "16", "--lr", "2e-3"),
    *("--warmup-steps", "2", "--layer-decay", "0.8", "--crop-scale", "0.5", "1"),
    *("--workers", "1"),
)


@dataclass
class FinetuneRun:
    """One `python -m vit_core finetune` run in this process: its OUT, exit status, output."""

    out: Path
    code: int
    stdout: str
    stderr: str


def run_finetune(data: Path, out: Path, *args: str) -> FinetuneRun:
    """`finetune --data DATA -o OUT` with `FINETUNE_ARGS` and `args` (later flags win),
    run through the command line's `main`, its output captured."""
    import contextlib

    from vit_core.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["finetune", "--data", str(data), "-o", str(out), *FINETUNE_ARGS, *args]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return FinetuneRun(out, code, stdout.getvalue(), stderr.getvalue())


# The fused qkv bias's key part has a zero gradient in exact arithmetic (a constant added
# to every key shifts each query's scores alike, which softmax ignores), so AdamW's first
# steps, lr * g / (|g| + eps), turn rounding noise in g into moves of up to lr: two runs
# that sum a gradient in other orders (another framework, another process count) move it
# apart by up to about lr per step, without any effect on the model's outputs.
KEY_BIAS = "attention.attention.key.bias"


def finetune_differences(
    got: Path, want: Path, backends: tuple[str, str], pixels: np.ndarray
) -> dict[str, float]:
    """How far apart two fine-tuned folders are (`got` run in backends[0], `want` in
    backends[1]): the largest weight difference (canonical keys, the key biases aside), the
    largest key-bias one, the largest logit difference on `pixels`, and the largest relative
    difference of the epochs' mean losses."""
    import json

    from safetensors.numpy import load_file

    from vit_core import load
    from vit_core.backend import get_backend

    a, b = load_file(got / WEIGHTS_NAME), load_file(want / WEIGHTS_NAME)
    assert a.keys() == b.keys()
    diffs = {k: float(np.abs(a[k] - b[k]).max()) for k in a}
    logits = [
        get_backend(backend).run(load(folder, backend=backend), pixels)["logits"]
        for folder, backend in ((got, backends[0]), (want, backends[1]))
    ]
    losses = [
        np.array([h["loss"] for h in json.loads((f / "finetune.json").read_text())["history"]])
        for f in (got, want)
    ]
    return {
        "weights": max(v for k, v in diffs.items() if not k.endswith(KEY_BIAS)),
        "key bias": max(v for k, v in diffs.items() if k.endswith(KEY_BIAS)),
        "logits": float(np.abs(logits[0] - logits[1]).max()),
        "loss": float(np.max(np.abs(losses[0] - losses[1]) / np.abs(losses[1]))),
    }


def folder_pixels(folder: Path, model: Path) -> np.ndarray:
    """Every image under `folder` (sorted) through `model`'s processor."""
    from vit_core.batching import images_in_folder
    from vit_core.processing import ViTImageProcessor, open_image

    processor = ViTImageProcessor.from_pretrained(model)
    images = [open_image(p) for p in images_in_folder(folder)]
    return processor(images, return_tensors="np")["pixel_values"]
