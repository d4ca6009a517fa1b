"""The torch backend (`vit_core.backend`): build the twin, run it on numpy, stream batches.

The core hands over a config and internal-name numpy tensors; the model is built on the
meta device (no random init is run) and the tensors are assigned as its parameters on the
device asked for (shared with the memory map where torch allows: on the CPU, in float32).
Options only this backend takes: `quantize=` and `calibration=` (`vit_torch.quantization`),
`compile=` (`vit_torch.compiled`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vit_core.backend import Outputs, as_numpy_outputs, class_to_build, warn_if_slow_dtype
from vit_core.batching import Batch, ImageFiles, collate, useful_workers
from vit_core.config import ViTConfig
from vit_core.errors import InputError
from vit_core.intermediates import BACKEND_OPTIONS, all_tokens, check_has_blocks_to_read
from vit_core.layout import MASKED_IMAGE_MODELING, ModelKind
from vit_torch.modeling import ViTForImageClassification, ViTForMaskedImageModeling, ViTModel
from vit_torch.weights import assign_internal_weights

QUANTIZATIONS = ("int8", "int8-static")  # `quantize=`: dynamic and static int8
# The class `build` makes for each kind of model (`ModelKind.model_type`).
TWINS = {
    "base": ViTModel,
    "classification": ViTForImageClassification,
    MASKED_IMAGE_MODELING: ViTForMaskedImageModeling,
}
# Device types `device=` can name besides the CPU, and the torch module that counts each.
ACCELERATORS = ("cuda", "mps", "xpu")
DEVICE_EXAMPLES = "'cpu', 'cuda', 'cuda:1', 'mps' or a torch.device"


def torch_dtype(dtype: Any) -> torch.dtype:
    """`dtype=` as a torch dtype: None is float32 whatever the file stores (as
    transformers and the twin do); else a torch dtype or its name ("bfloat16",
    "torch.float16"), or a numpy (ml_dtypes) floating type."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        found: Any = dtype
    else:
        try:
            name = dtype.removeprefix("torch.") if isinstance(dtype, str) else np.dtype(dtype).name
        except TypeError:
            name = ""
        found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise InputError(
            f"dtype={dtype!r} is not a floating-point torch dtype; choose 'float32' (the "
            "default), 'bfloat16' or 'float16'"
        )
    return found


def device_count(kind: str) -> int:
    """How many devices of type `kind` torch can use here (0: none, or not built in)."""
    if kind == "cpu":
        return 1
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    counter = getattr(torch, kind, None)  # torch.cuda, torch.xpu
    if counter is None or not hasattr(counter, "device_count") or not counter.is_available():
        return 0
    return int(counter.device_count())


def available_devices() -> list[str]:
    """The devices torch can use here, as `device=` names them."""
    found = ["cpu"]
    for kind in ACCELERATORS:
        count = device_count(kind)
        found += [kind] if kind == "mps" and count else [f"{kind}:{i}" for i in range(count)]
    return found


def _absent(kind: str) -> str:
    """Why torch has no `kind` device here, as far as torch can tell."""
    if kind == "cuda" and torch.version.cuda is None and torch.version.hip is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if kind == "cuda":
        return (
            "torch sees no CUDA GPU (torch.cuda.is_available() is False: no GPU or driver, "
            "or CUDA_VISIBLE_DEVICES hides them)"
        )
    if kind == "mps":
        return "MPS needs macOS on Apple silicon (torch.backends.mps.is_available() is False)"
    return f"torch has no {kind} device here"


def resolve_device(device: Any, dtype: Any) -> torch.device:
    """The torch device `device` names (None: torch's default device), checked to exist
    before any tensor is read; half precision on the CPU warns (it is slow there)."""
    if device is None:
        resolved = torch.get_default_device()
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError):
            gpu = " (torch calls NVIDIA GPUs 'cuda')" if str(device).startswith("gpu") else ""
            raise InputError(
                f"device={device!r} is not a torch device{gpu}; torch takes "
                f"{DEVICE_EXAMPLES}; available here: {', '.join(available_devices())}"
            ) from None
        count = device_count(resolved.type)
        if count == 0:
            raise InputError(
                f"device={device!r}: {_absent(resolved.type)}; available here: "
                f"{', '.join(available_devices())}"
            )
        if resolved.index is not None and resolved.index >= count:
            raise InputError(
                f"device={device!r}: torch sees {count} {resolved.type} device"
                f"{'s' if count > 1 else ''} here ({', '.join(available_devices())}), "
                "numbered from 0"
            )
    if resolved.type == "cpu":
        warn_if_slow_dtype(
            str(torch_dtype(dtype)).removeprefix("torch."), f"torch, device {resolved}"
        )
    return resolved


def check_options(
    dtype: Any,
    device: torch.device | None = None,
    quantize: str | None = None,
    calibration: Any = None,
    compile: bool = False,
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
    if device is not None and device.type != "cpu":
        raise InputError(
            f"quantize={quantize!r} runs fbgemm/oneDNN int8 kernels, which are CPU code; "
            f"it cannot be combined with device='{device}' (load the float model there, "
            "or bfloat16 with dtype=)"
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
    device: torch.device | None = None,
    quantize: str | None = None,
    calibration: Any = None,
    compile: bool = False,
) -> Any:
    """The torch twin of `kind` (or `model_class`) in eval mode, holding `internal` on
    `device` in `dtype`; compiled (`vit_torch.compiled`) or quantized if asked."""
    if kind.decoder and (quantize is not None or compile):
        raise InputError(
            "quantize= and compile= serve inference with the base and classification models; "
            "a masked-image-modeling model is for pre-training: load it without them"
        )
    cls = class_to_build(kind, TWINS, model_class)
    with torch.device("meta"):
        if kind.model_type == "base":
            model = cls(config, add_pooling_layer=kind.pooler, use_mask_token=kind.mask_token)
        else:
            model = cls(config)
    assign_internal_weights(model, internal, torch_dtype(dtype), device).eval()
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


def placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype of `model`: its first floating-point parameter's
    (an int8 model's float parts are on the CPU in float32, as are its inputs)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.float32


def as_input(model: torch.nn.Module, pixels: np.ndarray) -> torch.Tensor:
    """Numpy pixels as `model` computes them: in its dtype (cast on the host, so half
    the bytes travel), on its device."""
    device, dtype = placement(model)
    return torch.from_numpy(pixels).to(dtype=dtype).to(device=device)


def run(
    model: torch.nn.Module,
    pixels: np.ndarray,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    interpolate_pos_encoding: bool | str = False,
) -> Outputs:
    """The model's outputs on numpy pixels (moved to its device and dtype), as float32
    numpy, without autograd."""
    with torch.inference_mode():
        out = model(
            as_input(model, pixels),
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
    eager = _eager_vit(model)
    with torch.inference_mode():
        taken = eager.forward_intermediates(
            as_input(eager, pixels),
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
    check_has_blocks_to_read(model)
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
