"""The torch backend (`vit_core.backend`): build the twin, run it on numpy, stream batches.

The core hands over a config and internal-name numpy tensors; the model is built on the
meta device (no random init is run) and the tensors are assigned as its parameters, shared
with the memory map where torch allows. Options only this backend takes: `quantize=` and
`calibration=` (`vit_torch.quantization`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vit_core.backend import Outputs, as_numpy_outputs, class_to_build
from vit_core.batching import Batch, ImageFiles, collate, useful_workers
from vit_core.config import ViTConfig
from vit_core.errors import InputError
from vit_core.intermediates import BACKEND_OPTIONS, all_tokens
from vit_core.layout import ModelKind
from vit_torch.modeling import ViTForImageClassification, ViTModel
from vit_torch.weights import assign_internal_weights

QUANTIZATIONS = ("int8", "int8-static")  # `quantize=`: dynamic and static int8


def check_options(
    dtype: Any, quantize: str | None = None, calibration: Any = None, compile: bool = False
) -> None:
    """Refuse, before any tensor is read, what int8 and compile cannot do (a package
    error, so the CLIs print it as one line); their code is imported only if used."""
    if not isinstance(compile, bool):
        raise InputError(f"compile= takes True or False, not {compile!r}")
    if compile and quantize is not None:
        raise InputError(
            f"compile=True compiles the float model; quantize={quantize!r} cannot be "
            "combined with it (int8-static is compiled already; int8 runs eager "
            "int8 kernels)"
        )
    if calibration is not None and quantize != "int8-static":
        raise InputError(
            "calibration= sets the activation scales of quantize='int8-static'; "
            f"with quantize={quantize!r} it would be ignored"
        )
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise InputError(
            f"unknown quantize {quantize!r}; choose one of {QUANTIZATIONS} (fbgemm/oneDNN "
            "int8 kernels)"
        )
    if dtype is not None:
        raise InputError(
            f"quantize={quantize!r} keeps activations in float32; it cannot be combined "
            f"with dtype={dtype!r}"
        )
    if calibration is None and quantize == "int8-static":
        raise InputError(
            "quantize='int8-static' needs calibration=: pixel values (N, C, H, W) of a few "
            "dozen to a few hundred images like those the model will see, made by its "
            "image processor (ViTImageProcessor(...)(images)['pixel_values'])"
        )


def build(
    config: ViTConfig,
    kind: ModelKind,
    internal: Mapping[str, np.ndarray],
    dtype: Any = None,
    model_class: type | None = None,
    quantize: str | None = None,
    calibration: Any = None,
    compile: bool = False,
) -> Any:
    """The torch twin of `kind` (or `model_class`) in eval mode, holding `internal`;
    compiled (`vit_torch.compiled`) or quantized if asked."""
    cls = class_to_build(kind, ViTForImageClassification, ViTModel, model_class)
    with torch.device("meta"):
        model = cls(config) if kind.classifier else cls(config, add_pooling_layer=kind.pooler)
    # float32 unless asked otherwise, whatever the file stores (as transformers and the twin do)
    torch_dtype = getattr(torch, str(dtype).removeprefix("torch.")) if dtype else torch.float32
    assign_internal_weights(model, internal, torch_dtype).eval()
    if quantize in QUANTIZATIONS:
        from vit_core.checkpoint import release_pages
        from vit_torch.quantization import quantize_encoder, quantize_static

        def release(name: str) -> None:
            """A float weight read as far as int8 needs it: its mapped pages leave memory
            (a later read faults them back in from the page cache)."""
            release_pages(internal[name])

        if quantize == "int8":
            return quantize_encoder(model, release)
        return quantize_static(model, calibration, release)
    if compile:
        from vit_torch.compiled import CompiledViT

        return CompiledViT(model)
    return model


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def run(
    model: torch.nn.Module,
    pixels: np.ndarray,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    interpolate_pos_encoding: bool | str = False,
) -> Outputs:
    """The model's outputs on numpy pixels, as float32 numpy, without autograd."""
    with torch.inference_mode():
        out = model(
            torch.from_numpy(pixels),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
    return as_numpy_outputs(out, to_numpy)


def intermediates(
    model: torch.nn.Module,
    pixels: np.ndarray,
    indices: Sequence[int],
    norm: bool,
    interpolate_pos_encoding: bool | str = False,
) -> list[np.ndarray]:
    """The blocks' outputs (`vit_core.backend.Backend.intermediates`), without autograd."""
    with torch.inference_mode():
        taken = _eager_vit(model).forward_intermediates(
            torch.from_numpy(pixels),
            indices,
            norm=norm,
            interpolate_pos_encoding=interpolate_pos_encoding,
            **BACKEND_OPTIONS,
        )
    return [all_tokens(entry, to_numpy) for entry in taken]


def _eager_vit(model: torch.nn.Module) -> ViTModel | ViTForImageClassification:
    """The eager model behind `model`, whose blocks can be read one by one: a compiled
    model's `.model`; a float or dynamic int8 model is one already."""
    from vit_torch.compiled import CompiledViT

    if isinstance(model, CompiledViT):
        model = model.model
    if not isinstance(model, ViTModel | ViTForImageClassification):
        raise InputError(
            f"cannot read intermediate layers from {type(model).__name__}: it has no blocks "
            "to run one by one (an int8-static model is one fused graph that computes only "
            "the final outputs); load the float32 model, or quantize='int8', for them"
        )
    return model


def batch_runner(model: torch.nn.Module, workers: int) -> tuple[Callable[..., Outputs], str]:
    return partial(run, model), f"DataLoader with up to {workers} worker process(es)"


def _one_torch_thread(_worker_id: int) -> None:
    """Workers decode with PIL; torch threads in them would only fight the model's."""
    torch.set_num_threads(1)


def batches(
    paths: Sequence[Path], processor: Any, batch_size: int, workers: int
) -> Iterator[Batch]:
    """Batches from a `DataLoader` whose `workers` processes decode and preprocess.

    Memory is bounded by the DataLoader's prefetching (two batches per worker).
    """
    from torch.utils.data import DataLoader

    workers = useful_workers(workers, len(paths), batch_size)
    loader: DataLoader[Any] = DataLoader(
        ImageFiles(paths, processor),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=_one_torch_thread if workers else None,
    )
    yield from loader


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)
