"""ONNX export of the torch twin: one self-contained `.onnx` file per model.

`write_onnx` traces the eager float32 twin with torch's `torch.export`-based ONNX exporter
(`torch.onnx.export(dynamo=True)`; it needs `onnxscript`, pure Python, no network). That
exporter is torch's default and recommended one since 2.9; the TorchScript exporter it
replaced warns that it is deprecated, stops at opset 20 and traces through `torch.jit`,
itself deprecated. The graph it writes:

- one input, `pixel_values` (batch, C, H, W) float32, the batch axis symbolic ("batch"),
  so one file serves any batch size; H and W are fixed: a graph is exported for one input
  size (load the folder with `image_size=` for another, the position table resampled);
- the outputs the twin returns, under its field names and in its order: `logits` (and a
  distilled model's `cls_logits`, `distillation_logits`) for a classifier,
  `last_hidden_state` (and `pooler_output` where the model returns one) for an encoder;
- in its `metadata_props`, the text it is given (config.json's and the preprocessor
  config's, keyed by file name) and the `ModelKind` as JSON (`KIND_METADATA_KEY`), so the
  file runs on its own (`vit_onnx`).

`DEFAULT_OPSET` is 20, torch 2.14's default for this exporter: the first opset with a
`Gelu` operator (with `LayerNormalization`, from 17, each block's non-linear parts are
single operators that every runtime fuses), and onnxruntime runs it from 1.17 on. 23
would add the `Attention` operator, which few runtimes besides onnxruntime >= 1.22
implement; 18 is the lowest the exporter's op library is written for (`MIN_OPSET`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vit_core._io import atomic_path
from vit_core.config import CONFIG_NAME
from vit_core.errors import InputError
from vit_core.layout import EXPORT_INPUT_NAME as INPUT_NAME
from vit_core.layout import KIND_METADATA_KEY
from vit_core.outputs import ModelOutput
from vit_torch.modeling import ViTForImageClassification, ViTModel

DEFAULT_OPSET = 20
MIN_OPSET = 18  # torch's ONNX op library is written for 18; lower is silently raised to it
BATCH_AXIS = "batch"
# One .onnx file is one protobuf message, which cannot exceed 2 GiB; larger models (ViT-H,
# ViT-g) would need ONNX's external-data files beside it, which this writer does not make.
MAX_BYTES = 2**31 - 2**24  # the weights, less room for the graph and the metadata
EXAMPLE_BATCH = 2  # the traced batch: torch.export specialises a size-1 axis to a constant


class GraphOutputs(nn.Module):
    """The twin as its exported graph computes it: pixels in, the output fields out as a
    tuple (the ONNX exporter flattens outputs positionally; `output_names` names them)."""

    def __init__(self, model: ViTModel | ViTForImageClassification) -> None:
        super().__init__()
        self.model = model

    def fields(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every field of the twin's output record that holds a value, in record order."""
        record: ModelOutput = self.model(pixel_values)
        return {name: record[name] for name in record if name != "loss"}

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fields(pixel_values).values())


def _check_exportable(
    model: nn.Module, image_size: tuple[int, int], metadata: Mapping[str, str], opset: int
) -> None:
    """Refuse, before tracing, what would write a file that does not run on its own or
    does not compute what the twin computes."""
    if not isinstance(model, ViTModel | ViTForImageClassification):
        raise InputError(
            f"write_onnx exports the eager twin (ViTModel or ViTForImageClassification); got "
            f"{type(model).__name__} (a compiled or int8-static model: export the float32 "
            "model, and quantize the graph with onnxruntime.quantization.quantize_dynamic)"
        )
    held = sorted({_kind_of(value) for value in model.state_dict().values()} - {"float32"})
    if held:
        raise InputError(
            f"write_onnx exports float32 models; this one also holds {', '.join(held)} "
            "state (load the folder with dtype='float32'; an int8 model: export the float32 "
            "model and quantize the graph with onnxruntime.quantization.quantize_dynamic)"
        )
    if tuple(image_size) != model.config.image_hw:
        raise InputError(
            f"image_size={tuple(image_size)} differs from the model's "
            f"{model.config.image_hw}; a graph is exported at its model's size, so that "
            "the config in its metadata describes it: load the folder with "
            f"image_size={tuple(image_size)} (the position table resampled) and export that"
        )
    if CONFIG_NAME not in metadata:
        raise InputError(
            f"metadata has no {CONFIG_NAME!r} entry (got {sorted(metadata)}); an exported "
            "file carries its config so that it runs on its own"
        )
    if KIND_METADATA_KEY in metadata:
        raise InputError(f"metadata key {KIND_METADATA_KEY!r} is written by write_onnx itself")
    newest = _newest_opset()
    if not MIN_OPSET <= opset <= newest:
        raise InputError(
            f"opset {opset} is out of range: the exporter writes opsets {MIN_OPSET} to "
            f"{newest} (default {DEFAULT_OPSET})"
        )
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size > MAX_BYTES:
        raise InputError(
            f"the weights take {size / 2**30:.2f} GiB; one .onnx file holds at most 2 GiB "
            "(protobuf's limit), so this model cannot be exported as one file"
        )


def _kind_of(value: object) -> str:
    """A state-dict entry's dtype name, or its type's for what is not a tensor (the packed
    weights and scales of an int8 layer)."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.")
    return type(value).__name__


def _newest_opset() -> int:
    """The newest opset both the installed onnx and torch's exporter know."""
    import onnx.defs
    from torch.onnx._constants import ONNX_MAX_OPSET

    return min(onnx.defs.onnx_opset_version(), ONNX_MAX_OPSET)


def write_onnx(
    model: ViTModel | ViTForImageClassification,
    path: Path,
    image_size: tuple[int, int],
    metadata: Mapping[str, str],
    opset: int = DEFAULT_OPSET,
) -> None:
    """Write `model` (the eager float32 twin) as one ONNX file at `path`, atomically.

    `image_size` must be the model's own (`config.image_hw`): the graph takes
    (batch, C, H, W) at that size, any batch. `metadata` (file name -> text; config.json's
    at least) is stored in the file's `metadata_props` with the model's kind. The model is
    traced in eval mode (dropout off) and left in the mode it had.
    """
    import onnx

    _check_exportable(model, image_size, metadata, opset)
    was_training = model.training
    graph = GraphOutputs(model).eval()  # the model too: dropout off while tracing
    example = torch.zeros(EXAMPLE_BATCH, model.config.num_channels, *image_size)
    try:
        with torch.no_grad():
            names = list(graph.fields(example))
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim(BATCH_AXIS)}},
                optimize=True,
                verbose=False,
            )
    finally:
        model.train(was_training)
    assert program is not None  # dynamo=True always returns the program
    proto = program.model_proto
    kind = json.dumps(dataclasses.asdict(model.kind), sort_keys=True)
    onnx.helper.set_model_props(proto, {**metadata, KIND_METADATA_KEY: kind})
    with atomic_path(Path(path)) as staged:
        onnx.save_model(proto, staged)
