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

Memory: neither form keeps a float copy of a weight it quantized, nor holds all the
float weights resident while it is built. They are views of the checkpoint's memory map,
and each one's pages are given back (`release=`, `vit_core.checkpoint.release_pages`)
after each read the build makes; a later read faults them back in from the page cache.
Peak RSS at ViT-B/16 batch 8 went from 1.23x / 1.35x float32's to 0.79x (dynamic) and
1.0x (static); torch's own import is about half of float32's figure, and most of the
rest of static's is its imports (torchao, inductor, export: about 340 MiB) and the compile.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from torch.ao.quantization import per_channel_dynamic_qconfig

from vit_core.config import ViTConfig
from vit_core.errors import InputError, ViTError
from vit_core.layout import ModelKind
from vit_core.outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from vit_torch.compiled import check_compiler, frozen_weights, quiet
from vit_torch.modeling import ViTPreTrainedModel

_DEPRECATION_NOTICES = r".*(torch\.ao\.quantization is deprecated|quantized tensor creation)"
CALIBRATION_BATCH = 8  # images per calibration forward: observers see every image anyway
FLOAT_MODULES = ("classifier", "pooler")  # submodule names kept in float32 in both forms


def quantize_encoder(model: nn.Module, release: Callable[[str], None] | None = None) -> nn.Module:
    """`model` with every encoder Linear (qkv, proj, fc1, fc2) replaced by its int8 form.

    One Linear at a time, each swapped out before the next is read, and `release` is
    called with the state-dict name of each float weight once it is replaced (the torch
    backend gives the weight's mapped pages back there): so the float weights are never
    all in memory at once, and none stays once the model is built. The int8 form is
    `quantize_dynamic`'s (the same observer and kernels, so the same numbers), made per
    module instead of for the whole encoder in one pass.
    """
    prefix, encoder = next((n, m) for n, m in model.named_modules() if n.endswith("encoder"))
    # names, not modules: a list of the float Linears would keep every one alive
    names = [name for name, m in encoder.named_modules() if type(m) is nn.Linear]
    with warnings.catch_warnings():  # torch's deprecation notices (see above) are not news
        warnings.filterwarnings("ignore", message=_DEPRECATION_NOTICES)
        for name in names:
            parent, _, leaf = name.rpartition(".")
            linear = encoder.get_submodule(name)
            linear.qconfig = per_channel_dynamic_qconfig
            setattr(encoder.get_submodule(parent), leaf, Int8Linear.from_float(linear))
            if release is not None:
                release(f"{prefix}.{name}.weight")
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
        with torch.no_grad(), frozen_weights(), quiet():
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


def quantize_static(
    model: ViTPreTrainedModel, calibration: Any, release: Callable[[str], None] | None = None
) -> StaticInt8ViT:
    """`model` exported, calibrated on `calibration` (pixel values (N, C, H, W) as the
    image processor makes them), quantized to int8 and compiled for x86 CPUs.

    The float weights are never all resident at once, and none stays: `release` is
    called with a weight's state-dict name once a calibration pass has read it (it is
    read again from the page cache by the next pass) and once its int8 form exists, and
    the converted graph keeps only what it reads (`_drop_unread`).
    """
    pixels = _calibration_tensor(calibration, model.config)
    quantizer = _x86_quantizer()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    float_names = set(model.state_dict())

    def release_float(target: str) -> None:
        name = target.removeprefix("model.")  # the path under `_Outputs`
        if release is not None and name in float_names:
            release(name)

    example = torch.zeros((2, *pixels.shape[1:]))  # batch 2: export keeps the batch symbolic
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), quiet():
        exported = torch.export.export(
            _Outputs(model.eval()), (example,), dynamic_shapes=({0: batch},)
        )
        prepared = prepare_pt2e(exported.module(), quantizer)
        calibrate = _ReleasingInterpreter(prepared, release_float)
        for start in range(0, len(pixels), CALIBRATION_BATCH):
            calibrate.run(pixels[start : start + CALIBRATION_BATCH])
        del calibrate
        converted = convert_pt2e(prepared, fold_quantize=False)
        _fold_weight_quantization(converted, release_float)
    _forget_cached_modules()
    for target in _drop_unread(converted):
        release_float(target)
    return StaticInt8ViT(converted, model.config, model.kind)


class _ReleasingInterpreter(torch.fx.Interpreter):
    """The prepared graph run node by node (the same ops, so the same observed ranges),
    calling `release` with a weight's attribute path after each node that reads it.

    The exported graph observes every weight at its very start (its weight observers
    come first, the matmuls that use them later), so a plain call holds every float
    weight resident through the whole pass: 330 MiB at ViT-B/16, the peak of the
    whole int8-static build. Released after each read, a weight is resident only while
    one node reads it; the second read (observer, then matmul) is a minor fault from the
    page cache.
    """

    def __init__(self, graph: torch.fx.GraphModule, release: Callable[[str], None]) -> None:
        super().__init__(graph)
        self.release = release
        self.after: dict[torch.fx.Node, list[str]] = {}
        for node in graph.graph.find_nodes(op="get_attr"):
            readers = set(node.users)
            for reader in list(readers):  # a weight observer passes the weight through
                if reader.op == "call_module":
                    readers |= set(reader.users)
            for reader in readers:
                self.after.setdefault(reader, []).append(str(node.target))

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        for target in self.after.get(n, ()):
            self.release(target)
        return out


def _fold_weight_quantization(graph: torch.fx.GraphModule, release: Callable[[str], None]) -> None:
    """Fold each weight's quantize step into an int8 constant, one weight at a time,
    calling `release` with the float weight's attribute path as soon as it is folded.

    What `convert_pt2e(fold_quantize=True)` does (the same op on the same tensors, the
    result registered the same way), except that it folds every weight in one pass and
    so holds all the float weights resident while it runs. Only quantize steps whose
    inputs are all attributes are folded here; anything else is left to inductor's
    freezing, which folds it at compile time as before.
    """
    from torchao.quantization.pt2e.constant_fold import replace_node_with_constant

    quantize_ops = {
        torch.ops.quantized_decomposed.quantize_per_channel.default,
        torch.ops.quantized_decomposed.quantize_per_tensor.default,
    }
    for node in list(graph.graph.nodes):
        sources = node.all_input_nodes
        if node.target not in quantize_ops or not sources:
            continue
        if any(source.op != "get_attr" for source in sources):
            continue
        args, kwargs = torch.fx.node.map_arg(
            (node.args, node.kwargs), lambda source: _attribute(graph, str(source.target))
        )
        replace_node_with_constant(graph, node, _quantized(node.target, args, kwargs))
        for source in sources:
            if not source.users:
                graph.graph.erase_node(source)
                release(str(source.target))
    graph.graph.lint()
    graph.recompile()


def _quantized(op: Any, args: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """`op(*args, **kwargs)`; a per-channel quantize along axis 0 a block of rows at a
    time, into its int8 result: each row depends only on its own scale and zero point,
    so the values are the same, but the op's float temporaries stay a few MiB instead
    of a few times the weight (each freed one would stay in the process's heap beside
    the int8 results allocated after it: +170 MiB at ViT-B/16)."""
    per_channel = torch.ops.quantized_decomposed.quantize_per_channel.default
    if op is not per_channel or kwargs or len(args) != 7 or args[3] != 0:
        return op(*args, **kwargs)
    weight, scales, zero_points, axis, low, high, dtype = args
    out = torch.empty(weight.shape, dtype=dtype)
    rows = max(1, 2**18 // max(1, weight[0].numel()))  # ~1 MiB of float32 per block
    for start in range(0, len(weight), rows):
        block = slice(start, start + rows)
        out[block] = op(weight[block], scales[block], zero_points[block], axis, low, high, dtype)
    return out


def _attribute(graph: torch.fx.GraphModule, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    return getattr(graph.get_submodule(owner), leaf)


def _drop_unread(graph: torch.fx.GraphModule) -> list[str]:
    """Remove from `graph` the parameters and buffers no node reads; their names.

    convert_pt2e's folding erases the graph's reads of each float weight it turns into
    an int8 constant, but deletes only top-level attributes, and `_fold_weight_quantization`
    leaves them too: the float weights, nested under the exported module's paths, would
    stay (330 MiB at ViT-B/16, for as long as the model lives).
    """
    read = [str(node.target) for node in graph.graph.nodes if node.op == "get_attr"]
    prefixes = tuple(f"{target}." for target in read)  # a read submodule keeps its own
    unread = [
        name
        for name, _ in [*graph.named_parameters(), *graph.named_buffers()]
        if name not in read and not name.startswith(prefixes)
    ]
    for name in unread:
        owner, _, leaf = name.rpartition(".")
        delattr(graph.get_submodule(owner), leaf)
    return unread


def _forget_cached_modules() -> None:
    """Empty torchao's and torch.ao's caches of module -> device, which hold every module
    they were asked about (`functools.cache` keeps its arguments): the exported and the
    prepared graph, and with them every float weight (330 MiB at ViT-B/16), for the life
    of the process. Private functions: if a later release renames one, there is nothing
    of it to forget."""
    import torch.ao.quantization.fx.utils as torch_ao_utils
    import torchao.utils

    for module, name in (
        (torchao.utils, "_assert_and_get_unique_device"),
        (torch_ao_utils, "assert_and_get_unique_device"),
    ):
        cache_clear = getattr(getattr(module, name, None), "cache_clear", None)
        if callable(cache_clear):
            cache_clear()


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
        with quiet():
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError:
        raise InputError(
            "quantize='int8-static' needs torchao: pip install 'vit-twin[int8]' "
            "(or quantize='int8', which needs nothing more)"
        ) from None
    check_compiler("quantize='int8-static'")
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
