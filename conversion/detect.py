"""Which reader a source is for, judged from the file itself, and why none fits.

Every available reader is asked (`detect(path)`); exactly one must claim the source.
Readers look at content (magic bytes, key names), never at the file name alone, so a
timm `.bin` and a transformers `pytorch_model.bin` go to the right place. When none
claims it, `diagnose` says what the file is instead: empty, JSON, random bytes, a
truncated archive, a pickle that asks to run code, or a state dict of another model.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

from conversion.sources import (
    KINDS,
    available_readers,
    preview_keys,
    reader,
    sniff,
    state_dict_keys,
)
from vit_core._io import local_path
from vit_core.errors import CheckpointError

# Key patterns of popular non-ViT models, to name what a refused state dict looks like.
_LOOKS_LIKE = (
    (r"^(layer[1-4]\.\d+\.conv\d|conv1\.weight|bn1\.)", "a ResNet"),
    (r"^(stages\.\d+|downsample_layers\.)", "a ConvNeXt-style CNN"),
    (r"^layers\.\d+\.blocks\.", "a Swin transformer"),
    (r"^(bert|roberta|text_model)\.", "a text model"),
    (r"^features\.\d+\.", "a VGG/AlexNet-style CNN"),
)


def detect(path: str | Path, requested: str = "auto") -> tuple[str, ModuleType]:
    """(kind, reader module) for `path`; `requested` ("timm", "jax", "hf") skips the guess."""
    path = local_path(path)
    if requested != "auto":
        return requested, reader(requested)
    readers = available_readers()
    claims = [kind for kind, module in readers.items() if _claims(module, path)]
    if len(claims) == 1:
        return claims[0], readers[claims[0]]
    if claims:
        raise CheckpointError(
            f"{path}: could be read as {' or '.join(claims)}; say which with --from"
        )
    raise CheckpointError(diagnose(path, readers))


def _claims(module: ModuleType, path: Path) -> bool:
    try:
        return bool(module.detect(path))
    except (CheckpointError, OSError, ValueError):
        return False


def diagnose(path: Path, readers: dict[str, ModuleType]) -> str:
    """Why no reader claims `path`, in words that say what the file is."""
    missing = [kind for kind in KINDS if kind not in readers]
    unavailable = f" (readers not installed: {', '.join(missing)})" if missing else ""
    if path.is_dir():
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        return (
            f"{path}: a folder without a checkpoint this converter reads (found: {found}); "
            "pass a weights file, or a transformers or timm model folder"
        )
    kind = sniff(path)
    if kind in ("safetensors", "torch-zip", "pickle"):
        keys = state_dict_keys(path)  # raises for truncated files and refused pickles
        return f"{path}: not a ViT checkpoint: {_describe_keys(keys)}"
    if kind == "npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.files)
        except (OSError, ValueError) as exc:
            return f"{path}: a NumPy .npz archive that cannot be read ({exc})"
        return f"{path}: a NumPy .npz archive whose keys match no ViT layout{unavailable}: " + (
            preview_keys(keys)
        )
    return f"{path}: " + {
        "empty": "the file is empty, not a checkpoint",
        "json": "a JSON file, not a checkpoint (for a transformers model, pass the folder "
        "that holds its config.json and weights)",
        "zip": "a zip archive that cannot be read: the file is truncated or corrupt",
        "msgpack": f"a msgpack file that no reader claims{unavailable}",
    }.get(
        kind,
        "not a checkpoint: its first bytes match no weights format this converter reads "
        "(safetensors, PyTorch zip or pickle, NumPy .npz, Flax msgpack)",
    )


def _describe_keys(keys: list[str]) -> str:
    """What a readable state dict that no reader claims holds."""
    guess = next(
        (name for pattern, name in _LOOKS_LIKE if any(re.match(pattern, k) for k in keys)), None
    )
    looks = f"it looks like {guess}; " if guess else ""
    return (
        f"{looks}its {len(keys)} keys match no supported ViT layout (timm `patch_embed.proj`, "
        f"`blocks.N`; transformers `embeddings.patch_embeddings`): {preview_keys(keys)}"
    )
