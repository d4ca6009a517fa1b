"""Helpers shared by test modules: random canonical folders and architectures to draw.

Test folders are not packages (several hold a test_cli.py or a test_docs.py), so shared
code lives here, on pytest's `pythonpath`, under a name that cannot shadow a real package.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
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
    MAX_DIFFS[name] = max(diff, MAX_DIFFS.get(name, 0.0))


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
        classifier_uses_pooler=classifier and draw(st.booleans()),
        num_labels=draw(st.sampled_from([0, 1, 3])) if classifier else 2,
        # the family switches (docs/families.md)
        num_register_tokens=draw(st.sampled_from([0, 0, 1, 4])),
        use_distillation_token=use_class_token and pooling == "cls" and draw(st.booleans()),
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


SHIPPED = Path(__file__).resolve().parents[2] / "vit_core" / "assets" / "vit-digits"


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
