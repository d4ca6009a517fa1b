"""Model names as the ecosystems spell them, resolved to a `ViTConfig`.

The same architecture goes by many names: `vit-base-patch16-224` (Hugging Face hub),
`vit_base_patch16_224.augreg2_in21k_ft_in1k` (timm, with a pretrained tag),
`ViT-B_16` (the original JAX release), `B/16` (big_vision). A name fixes the
architecture, the numerics of the family that publishes it (transformers' configs say
LayerNorm eps 1e-12; timm, the JAX release and big_vision use 1e-6, and the JAX models
the tanh GELU) and, through a tag, the label count. Names only describe: nothing is ever
downloaded.

timm's names come from a table (`timm_names.json`, written from timm by
scripts/generate_timm_names.py, so timm is not needed here): every architecture and
pretrained tag of timm's `vision_transformer` and `deit` modules, CLIP, SigLIP, DINOv2,
DeiT, DeiT-3 and the register models included, with each one's switches (see
docs/families.md). The few timm builds that this package cannot run are in the table
with the reason, and asking for one is a `ConfigError` that gives it.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from typing import Any

from vit_core.errors import ConfigError

# Architecture of the standard sizes (ViT paper, Table 1; tiny and small from DeiT/timm).
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3},
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "huge": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16},
}
PATCH_SIZES = (8, 14, 16, 32)

_LETTERS = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}
_HUB = re.compile(r"^vit-(?P<size>[a-z]+)-patch(?P<patch>\d+)-(?P<res>\d+)(?P<tag>-in21k)?$")
_TIMM = re.compile(
    r"^vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_(?P<res>\d+)(\.(?P<tag>[a-z0-9_]+))?$"
)
_JAX = re.compile(r"^(?:imagenet21k/)?ViT-(?P<letter>Ti|S|B|L|H)_(?P<patch>\d+)(?P<res>-\d+)?$")
_BIG_VISION = re.compile(r"^(?P<letter>Ti|S|B|L|H)/(?P<patch>\d+)$")

IN21K_CLASSES, IN1K_CLASSES = 21843, 1000
# timm's pretrained tags; `orig_in21k` weights have their head (and pre_logits) removed.
TIMM_TAGS = {
    "augreg_in21k": IN21K_CLASSES,
    "augreg_in21k_ft_in1k": IN1K_CLASSES,
    "augreg2_in21k_ft_in1k": IN1K_CLASSES,
    "augreg_in1k": IN1K_CLASSES,
    "orig_in21k": 0,
    "orig_in21k_ft_in1k": IN1K_CLASSES,
    "sam_in1k": IN1K_CLASSES,
}
TIMM_NUMERICS = {"layer_norm_eps": 1e-6, "hidden_act": "gelu"}
# timm's defaults for every field its table (`timm_names.json`) can set; a row there keeps
# only what differs from these.
TIMM_BASE: dict[str, Any] = {
    **TIMM_NUMERICS,
    "num_channels": 3,
    "qkv_bias": True,
    "use_class_token": True,
    "num_register_tokens": 0,
    "use_distillation_token": False,
    "no_embed_class": False,
    "layerscale_value": None,
    "use_pre_norm": False,
    "patch_embedding_bias": True,
    "use_final_norm": True,
    "use_fc_norm": False,
    "use_swiglu_ffn": False,
    "pooling_type": "cls",
}
TIMM_NAMES_FILE = "timm_names.json"
JAX_NUMERICS = {"layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}


def standard_resolutions(patch: int) -> tuple[int, int]:
    """224 and the usual fine-tuning size: 384, or 336 where 14-pixel patches cannot tile 384."""
    return (224, 384) if 384 % patch == 0 else (224, 336)


def _architecture(size: str, patch: int, resolution: int, name: str) -> dict[str, Any]:
    if size not in SIZES or patch not in PATCH_SIZES:
        raise ConfigError(f"unknown model name {name!r}; {valid_names_hint()}")
    arch = SIZES[size]
    return {
        **arch,
        "intermediate_size": 4 * arch["hidden_size"],
        "patch_size": patch,
        "image_size": resolution,
        "encoder_stride": patch,
    }


# ---------------------------------------------------------------- timm's table
@functools.cache
def _timm_table() -> dict[str, Any]:
    text = importlib.resources.files("vit_core").joinpath(TIMM_NAMES_FILE).read_text("utf-8")
    table: dict[str, Any] = json.loads(text)
    return table


def timm_version() -> str:
    """The timm release the name table was read from."""
    return str(_timm_table()["timm_version"])


def _timm_entry(name: str) -> dict[str, Any] | None:
    """A timm name's row, resolved ({"refused": reason} or every field), or None."""
    table = _timm_table()
    arch = name.split(".", 1)[0]
    base = table["architectures"].get(arch)
    if base is None:
        return None
    if name == arch:
        entry = base
    elif name in table["tags"]:
        tag = table["tags"][name]  # what the tag changes; a whole row where the two differ
        refused = "refused" in base or "refused" in tag
        entry = (tag or base) if refused else {**base, **tag}
    else:
        return None
    if "refused" in entry:
        return entry
    fields = {**TIMM_BASE, **entry}
    patch = fields["patch_size"]
    fields["encoder_stride"] = patch if isinstance(patch, int) else patch[0]
    return fields


def _timm_fields(name: str) -> dict[str, Any] | None:
    entry = _timm_entry(name)
    if entry is None:
        return None
    if "refused" in entry:
        raise ConfigError(
            f"{name}: {entry['refused']} is not supported (this package runs timm's ViT "
            "family: plain, CLIP, SigLIP, DINOv2, DeiT, DeiT-3, MAE and the register models)"
        )
    return dict(entry)


def timm_tags(architecture: str) -> list[str]:
    """The pretrained tags timm publishes for an architecture (without the name)."""
    prefix = architecture + "."
    return [t[len(prefix) :] for t in _timm_table()["tags"] if t.startswith(prefix)]


def refused_models() -> dict[str, str]:
    """timm names this package knows but cannot run, with the reason for each."""
    return dict(_refused())


@functools.cache
def _refused() -> dict[str, str]:
    table = _timm_table()
    out = {}
    for name in [*table["architectures"], *table["tags"]]:
        entry = _timm_entry(name)
        if entry is not None and "refused" in entry:
            out[name] = str(entry["refused"])
    return out


# Coverage labels of timm's names (docs/coverage.json, the README's coverage table),
# first match wins.
FAMILIES: tuple[tuple[str, str], ...] = (
    (r"^deit3_", "DeiT-3"),
    (r"^deit_", "DeiT"),
    (r"clip", "CLIP"),
    (r"siglip", "SigLIP"),
    (r"dinov2", "DINOv2"),
    (r"_reg\d", "registers"),
    (r"\.mae$", "MAE"),
    (r"_gap_", "gap"),
    (r"^vit_[a-z]+_patch\d+_\d+(\.|$)", "plain"),
)


def family(name: str) -> str:
    """The family label of a timm name: CLIP, SigLIP, DINOv2, registers, DeiT, DeiT-3,
    MAE, gap, plain or other."""
    return next((label for pattern, label in FAMILIES if re.search(pattern, name)), "other")


# ---------------------------------------------------------------- resolution
def name_fields(name: str) -> dict[str, Any]:
    """The `ViTConfig` fields a model name fixes, or a `ConfigError` listing valid forms."""
    text = name.strip()
    if match := _HUB.match(text.lower()):
        fields = _architecture(match["size"], int(match["patch"]), int(match["res"]), name)
        if match["tag"]:  # the hub's -in21k models are encoders with their pre_logits pooler
            fields["num_labels"] = 0
        return fields
    if (timm_fields := _timm_fields(text.lower())) is not None:
        return timm_fields
    arch, _, tag = text.lower().partition(".")
    known = _timm_entry(arch)
    if tag and known is not None and tag not in TIMM_TAGS:
        tags = timm_tags(arch)
        raise ConfigError(
            f"unknown timm tag {tag!r} in {name!r}; timm's tags for {arch}: "
            f"{', '.join(tags) or 'none'} (and the plain-ViT tags: {', '.join(TIMM_TAGS)})"
        )
    if tag and known is not None:  # a plain-ViT tag on an architecture timm has
        return {**(_timm_fields(arch) or {}), "num_labels": TIMM_TAGS[tag]}
    if match := _TIMM.match(text.lower()):
        fields = _architecture(match["size"], int(match["patch"]), int(match["res"]), name)
        tag = match["tag"]
        if tag is not None and tag not in TIMM_TAGS:
            raise ConfigError(
                f"unknown timm tag {tag!r} in {name!r}; plain-ViT tags: {', '.join(TIMM_TAGS)}"
            )
        return {**fields, **TIMM_NUMERICS, "num_labels": TIMM_TAGS.get(tag or "", IN1K_CLASSES)}
    if match := _JAX.match(text):
        resolution = int(match["res"][1:]) if match["res"] else 224
        size = _LETTERS[match["letter"]]
        fields = _architecture(size, int(match["patch"]), resolution, name)
        in21k = text.startswith("imagenet21k/")
        extra = {"num_labels": IN21K_CLASSES, "classifier_uses_pooler": True} if in21k else {}
        return {**fields, **JAX_NUMERICS, **extra}
    if match := _BIG_VISION.match(text):
        size = _LETTERS[match["letter"]]
        return {**_architecture(size, int(match["patch"]), 224, name), **JAX_NUMERICS}
    raise ConfigError(f"unknown model name {name!r}; {valid_names_hint()}")


def name_source(name: str) -> str:
    """Which ecosystem's spelling a name is: "hub", "timm", "jax" or "big_vision"
    (a `ConfigError` for a name `name_fields` does not know)."""
    name_fields(name)
    text = name.strip()
    if _HUB.match(text.lower()):
        return "hub"
    if _JAX.match(text):
        return "jax"
    if _BIG_VISION.match(text):
        return "big_vision"
    return "timm"


def valid_names_hint() -> str:
    sizes, patches = "|".join(SIZES), "|".join(map(str, PATCH_SIZES))
    return (
        f"valid names: vit-{{{sizes}}}-patch{{{patches}}}-RESOLUTION (e.g. vit-base-patch16-224, "
        "vit-large-patch32-384, vit-base-patch16-224-in21k), timm's "
        "vit_base_patch16_224[.augreg2_in21k_ft_in1k], the JAX release's ViT-B_16 "
        "(imagenet21k/ViT-B_16 for the 21k checkpoints), big_vision's B/16, and every "
        "architecture and pretrained tag of timm's ViT and DeiT families "
        "(vit_small_patch14_dinov2.lvd142m, vit_base_patch16_clip_224.openai, "
        "deit3_base_patch16_224.fb_in1k, ...); see vit_core.list_models()"
    )


def list_models() -> list[str]:
    """Every standard name this package resolves, in each ecosystem's spelling, then
    timm's architectures and pretrained tags that it runs (`refused_models()` has the
    others, with their reasons)."""
    names = []
    for size in SIZES:
        letter = next(k for k, v in _LETTERS.items() if v == size)
        for patch in PATCH_SIZES:
            names.append(f"{letter}/{patch}")
            names.append(f"ViT-{letter}_{patch}")
            names.append(f"imagenet21k/ViT-{letter}_{patch}")
            for res in standard_resolutions(patch):
                names.append(f"vit-{size}-patch{patch}-{res}")
                names.append(f"vit_{size}_patch{patch}_{res}")
                names += [f"vit_{size}_patch{patch}_{res}.{tag}" for tag in TIMM_TAGS]
            names.append(f"vit-{size}-patch{patch}-224-in21k")
    table = _timm_table()
    seen = set(names)
    for name in sorted([*table["architectures"], *table["tags"]]):
        entry = _timm_entry(name)
        if name not in seen and entry is not None and "refused" not in entry:
            names.append(name)
    return names
