"""Internal-name numpy weights (see `vit_core.layout`) <-> a torch model's state dict.

The internal names are the state-dict keys, so this is only a change of container:
`torch.from_numpy` shares memory with the arrays it is given.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from vit_core.errors import ViTError


def assign_internal_weights(
    model: nn.Module,
    internal: Mapping[str, np.ndarray],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load `internal` into `model` strictly (the layout was checked before we get here),
    each tensor cast to `dtype` on the host (half the bytes travel) and moved to `device`
    (None: as it is, on the CPU, where float32 shares the arrays' memory)."""
    state = {k: _tensor(v).to(dtype=dtype).to(device=device) for k, v in internal.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch tensor over `array`; numpy's bfloat16 (ml_dtypes) travels as raw 16-bit words."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # torch.from_numpy wants writable memory
        array = array.copy()
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def internal_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's weights as float32 numpy arrays under their internal names."""
    if any(key.endswith("._packed_params.dtype") for key in model.state_dict()):
        raise ViTError(
            "this model holds int8-quantized layers (load(..., quantize='int8')), an "
            "inference-only form that the canonical layout does not store; save the "
            "float32 model it was made from"
        )
    # A copy: `.numpy()` alone would share memory with the live parameters.
    return {k: v.detach().cpu().float().numpy().copy() for k, v in model.state_dict().items()}
