"""timm's registered models as oracles: built small, every tensor perturbed, saved.

Shared by the conversion tests (tests/conversion/test_timm_families.py) and the
intermediate-layer parity tests (tests/parity/test_intermediates.py). timm is imported
only when a model is built, so a module importing this one can still skip without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

HEADS = 4
SMALL = {"depth": 2, "embed_dim": 64, "num_heads": HEADS}
LAYERSCALE = 0.3  # every LayerScale gamma is set near this, far from any init


def family_model(oracle: Any, name: str, seed: int, **overrides: Any) -> Any:
    """A registered timm model, small, every tensor perturbed, LayerScale near 0.3."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **overrides})
    oracle.perturb_torch(model, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("gamma"):
                p.copy_(LAYERSCALE + 0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def save(model: Any, path: Path) -> Path:
    """The model's state dict as a timm checkpoint: safetensors or, by suffix, torch.save."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path
