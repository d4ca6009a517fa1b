"""int8 inference, two ways: dynamic (`quantize="int8"`) and static (`"int8-static"`).

Why int8 at all: 95 % of a ViT's FLOPs are in the encoder's four Linear layers per block,
and on x86 CPUs without VNNI the fbgemm / oneDNN int8 kernels run those about 1.8-2.2x
faster than float32 sgemm (measured here; `make bench` has the whole-model figures).

Dynamic (`quantize_encoder`): weights int8 per output channel, activations quantized per
call from their observed range. No data and no compiler needed, every batch size and
every output (attentions, hidden states) works, but the float work between the matmuls
(LayerNorm, GELU, softmax, the quantize/dequantize of each call) caps the whole model
near 1.6-1.7x float32. torch marks `torch.ao.quantization` deprecated; the eager kernels
used here are those torch 2.14 (pinned) ships.

Static (`quantize_static`): the model is exported (`torch.export`), calibrated on
images the caller provides (activations get fixed uint8 scales), converted with
torchao's PT2E flow for x86 (`X86InductorQuantizer`) and compiled by inductor with
frozen weights, which fuses the quantize/dequantize steps into the int8 kernels and
the float ops around them. It is the faster of the two (about 1.9x float32 on ViT-B/16),
at the price of a calibration set, a C++ compiler at run time, and a compile of about a
minute (ViT-B/16) at the first call of each new batch size. The classifier and the pooler
stay float32 in both: under 0.1 % of the time, and they carry the logits' precision.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from vit_core.config import ViTConfig
from vit_core.errors import InputError, ViTError
from vit_core.layout import ModelKind
from vit_core.outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from vit_torch.modeling import ViTPreTrainedModel

_DEPRECATION_NOTICES = r".*(torch\.ao\.quantization is deprecated|quantized tensor creation)"
CALIBRATION_BATCH = 8  # images per calibration forward: observers see every image anyway
FLOAT_MODULES = ("classifier", "pooler")  # submodule names kept in float32 in both forms


def quantize_encoder(model: nn.Module) -> nn.Module:
    """`model` with every encoder Linear (qkv, proj, fc1, fc2) replaced by its int8 form."""
    encoder = next(m for name, m in model.named_modules() if name.endswith("encoder"))
    with warnings.catch_warnings():  # torch's deprecation notices (see above) are not news
        warnings.filterwarnings("ignore", message=_DEPRECATION_NOTICES)
        plan = {nn.Linear: per_channel_dynamic_qconfig}
        quantize_dynamic(encoder, plan, dtype=torch.qint8, inplace=True)
    return model.eval()


class StaticInt8ViT(nn.Module):
    """A statically quantized, compiled ViT: called like the float model it came from.

    Inference only: it returns `logits` (or `last_hidden_state` and `pooler_output`),
    not attentions or hidden states, which the fused graph no longer computes. Each new
    batch size is compiled once on its first call (inductor specialises the kernels to
    the shape; that is where its speed comes from).
    """

    def __init__(self, graph: nn.Module, config: ViTConfig, kind: ModelKind) -> None:
        super().__init__()
        self.config = config
        self.kind = kind
        self.graph = graph
        self._compiled = torch.compile(graph.forward, dynamic=False)  # not a second submodule

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
        return_dict: bool = True,
    ) -> ImageClassifierOutput | BaseModelOutputWithPooling | tuple[Any, ...]:
        if output_attentions or output_hidden_states or interpolate_pos_encoding:
            raise ViTError(
                "an int8-static model computes only the final outputs (its graph is fused "
                "and built for one image size); for attentions, hidden states or another "
                "image size load the float32 model or quantize='int8'"
            )
        self.config.check_pixel_shape(tuple(pixel_values.shape), False)
        # frozen weights let inductor fold the quantize steps (set as the compile runs)
        with torch.no_grad(), inductor_config.patch(freezing=True), _quiet():
            outputs = self._compiled(pixel_values.float())
        out: ImageClassifierOutput | BaseModelOutputWithPooling
        if self.kind.classifier:
            out = ImageClassifierOutput(logits=outputs[0])
        else:
            out = BaseModelOutputWithPooling(*outputs)
        return out if return_dict else out.to_tuple()

    def save_pretrained(self, folder: Any) -> None:
        raise ViTError(
            "this model is int8-static (load(..., quantize='int8-static')), a compiled, "
            "inference-only form that the canonical layout does not store; save the "
            "float32 model it was made from"
        )


class _Outputs(nn.Module):
    """The float model as export wants it: tensors in, a tuple of tensors out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values)
        if isinstance(out, ImageClassifierOutput):
            return (out.logits,)
        if out.pooler_output is None:
            return (out.last_hidden_state,)
        return (out.last_hidden_state, out.pooler_output)


def quantize_static(model: ViTPreTrainedModel, calibration: Any) -> StaticInt8ViT:
    """`model` exported, calibrated on `calibration` (pixel values (N, C, H, W) as the
    image processor makes them), quantized to int8 and compiled for x86 CPUs."""
    pixels = _calibration_tensor(calibration, model.config)
    quantizer = _x86_quantizer()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = torch.zeros((2, *pixels.shape[1:]))  # batch 2: export keeps the batch symbolic
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), _quiet():
        exported = torch.export.export(
            _Outputs(model.eval()), (example,), dynamic_shapes=({0: batch},)
        )
        prepared = prepare_pt2e(exported.module(), quantizer)
        for start in range(0, len(pixels), CALIBRATION_BATCH):
            prepared(pixels[start : start + CALIBRATION_BATCH])
        converted = convert_pt2e(prepared)
    return StaticInt8ViT(converted, model.config, model.kind)


def _calibration_tensor(calibration: Any, config: ViTConfig) -> torch.Tensor:
    pixels = torch.as_tensor(np.asarray(calibration, dtype=np.float32))
    if pixels.ndim != 4 or len(pixels) == 0:
        raise InputError(
            f"calibration= must be pixel values shaped (N, C, H, W) with N >= 1; "
            f"got shape {tuple(pixels.shape)}"
        )
    try:
        config.check_pixel_shape(tuple(pixels.shape), False)
    except ValueError as error:
        raise InputError(f"calibration=: {error}") from None
    if not torch.isfinite(pixels).all():
        raise InputError("calibration= holds NaN or infinite values")
    return pixels


def _x86_quantizer() -> Any:
    """torchao's x86 quantizer (uint8 activations per tensor, int8 weights per channel),
    with the classifier and pooler left in float32."""
    try:
        with _quiet():
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError:
        raise InputError(
            "quantize='int8-static' needs torchao: pip install 'vit-twin[int8]' "
            "(or quantize='int8', which needs nothing more)"
        ) from None
    _check_compiler()
    quantizer = x86.X86InductorQuantizer()
    # Without VNNI the u8 x s8 kernels sum pairs of products in int16, which saturates on
    # full-range activations (logits off by ~1 on the digits model); 7-bit ones cannot.
    config = x86.get_default_x86_inductor_quantization_config(reduce_range=not cpu_has_vnni())
    quantizer.set_global(config)
    for name in FLOAT_MODULES:
        quantizer.set_module_name_qconfig(f"model.{name}", None)
        quantizer.set_module_name_qconfig(f"model.vit.{name}", None)
    return quantizer


def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI or AVX-VNNI (int8 dot products summed in int32)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume the worst; 7-bit activations are right everywhere
        return False
    return any(flag in cpuinfo.split() for flag in ("avx512_vnni", "avx_vnni"))


def _check_compiler() -> None:
    """inductor writes C++ for the CPU: fail here, not at the first call, if it cannot."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:
        raise InputError(
            f"quantize='int8-static' compiles C++ kernels with torch.compile and found no "
            f"C++ compiler ({error}); install g++ (or set CXX), or use quantize='int8'"
        ) from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchao's import, export and inductor's lowering warn about torch's own internals
    (deprecations, tensor copies), which are not the user's news."""
    loggers = [logging.getLogger(f"torch.utils.{name}") for name in ("_pytree", "cpp_extension")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
