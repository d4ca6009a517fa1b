"""int8 inference: the encoder's Linear layers as dynamically quantized int8 matmuls.

Why dynamic (weights int8 per output channel, activations quantized per call from their
observed range): 95 % of a ViT's FLOPs are in the encoder's four Linear layers per
block, and on x86 CPUs without VNNI the fbgemm / oneDNN int8 kernels run those about
1.8-2.2x faster than float32 sgemm (measured here; `make bench` has the whole-model
figures). Static quantization would need calibration data and quantize/dequantize
around every LayerNorm, GELU and softmax for no measurable gain. The classifier and the
pooler stay in float32: they cost under 0.1 % of the time and carry the logits' precision.

torch marks `torch.ao.quantization` deprecated in favour of torchao, whose CPU int8 path
needs `torch.compile`; the eager kernels used here are those torch 2.14 (pinned) ships.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

_DEPRECATION_NOTICES = r".*(torch\.ao\.quantization is deprecated|quantized tensor creation)"


def quantize_encoder(model: nn.Module) -> nn.Module:
    """`model` with every encoder Linear (qkv, proj, fc1, fc2) replaced by its int8 form."""
    encoder = next(m for name, m in model.named_modules() if name.endswith("encoder"))
    with warnings.catch_warnings():  # torch's deprecation notices (see above) are not news
        warnings.filterwarnings("ignore", message=_DEPRECATION_NOTICES)
        plan = {nn.Linear: per_channel_dynamic_qconfig}
        quantize_dynamic(encoder, plan, dtype=torch.qint8, inplace=True)
    return model.eval()
