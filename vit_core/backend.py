"""The backend interface, and the one registry through which the core reaches a framework.

The core never imports a framework or a twin module by name: it asks `get_backend(name)`
for a backend ("torch", "flax", "onnx") and hands it a config and canonical numpy
tensors. A backend is a module (`vit_torch.backend`, `vit_flax.backend`) that offers the
functions of `Backend`: build a model, run it on numpy pixels to a dict of numpy outputs,
and stream decoded image batches for `predict`. The onnx backend (`vit_onnx.backend`)
builds nothing: it runs an exported `.onnx` file, which `load` hands it whole.
Everything that must run a model on numpy pixels (the CLI, conversion's verification,
the benchmarks, the tests) goes through `Backend.run`, written once per framework.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vit_core.errors import InputError

if TYPE_CHECKING:
    from vit_core.batching import Batch
    from vit_core.config import ViTConfig
    from vit_core.layout import ModelKind
    from vit_core.outputs import ModelOutput

# Outputs as numpy: logits | reconstruction | last_hidden_state, pooler_output;
# hidden_states and attentions (tuples of arrays) when asked for.
Outputs = dict[str, Any]


@dataclass(frozen=True)
class BackendEntry:
    """Where a backend lives, the pip extra that installs its framework, and the `load`
    options only it takes (so a wrong pairing is refused before the framework is imported)."""

    module: str
    extra: str
    computes: str  # how, for a refusal of another backend's option
    options: tuple[str, ...] = ()
    # True: it runs an exported graph file, not a twin built from a canonical folder;
    # `load` hands it the path (its `open_graph`) and reads no tensors itself.
    exported: bool = False
    # The module whose `trainer` fine-tunes its models (`vit_core.finetune.Training`);
    # None for a backend that only runs them.
    training: str | None = None


REGISTRY: dict[str, BackendEntry] = {
    "torch": BackendEntry(
        "vit_torch.backend",
        "torch",
        "runs eagerly in float32 or dtype= (e.g. 'bfloat16')",
        ("quantize", "calibration", "compile"),
        training="vit_torch.training",
    ),
    "flax": BackendEntry(
        "vit_flax.backend",
        "flax",
        "is always compiled (jax.jit, XLA) and computes in float32 or dtype= (e.g. 'bfloat16')",
        training="vit_flax.training",
    ),
    "onnx": BackendEntry(
        "vit_onnx.backend",
        "onnx",
        "runs an exported .onnx graph with onnxruntime, in float32 (for int8, quantize the "
        "file: onnxruntime.quantization.quantize_dynamic)",
        exported=True,
    ),
}
# The twins: the backends that build a model from a canonical folder (demo, conversion's
# verification and the parity tests hold them to each other).
BACKENDS: tuple[str, ...] = tuple(name for name, entry in REGISTRY.items() if not entry.exported)
# Every backend that runs a model: the twins and the runtimes of exported graphs
# (`predict --backend` and `embed --backend` choose among them).
ALL_BACKENDS: tuple[str, ...] = tuple(REGISTRY)


class Backend(Protocol):
    """What each backend module offers (each twin's `backend.py`)."""

    def resolve_device(self, device: Any, dtype: Any) -> Any:
        """The framework's device that `device` names (None: the framework's default),
        before any tensor is read: one this machine does not have is an `InputError`
        naming those it has; half precision asked for on a CPU warns (`warn_if_slow_dtype`)."""
        ...

    def check_options(self, dtype: Any, device: Any, **options: Any) -> None:
        """Refuse, before any tensor is read, option values this backend cannot honour
        (`device` as `resolve_device` gave it)."""
        ...

    def build(
        self,
        config: ViTConfig,
        kind: ModelKind,
        internal: Mapping[str, np.ndarray],
        dtype: Any = None,
        model_class: type | None = None,
        device: Any = None,
        **options: Any,
    ) -> Any:
        """The twin of `kind` (or `model_class`) holding `internal` on `device` (as
        `resolve_device` gave it), ready for inference."""
        ...

    def run(
        self,
        model: Any,
        pixels: np.ndarray,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
    ) -> Outputs:
        """The model's outputs on numpy pixels (N, C, H, W), as float32 numpy arrays; the
        pixels go to the model's device in its compute dtype first."""
        ...

    def intermediates(
        self,
        model: Any,
        pixels: np.ndarray,
        indices: Sequence[int],
        norm: bool,
        interpolate_pos_encoding: bool | str = False,
    ) -> list[np.ndarray]:
        """The outputs of the blocks `indices` names (negative from the end), in block
        order: each (N, T, D) float32 with every token (prefix tokens first), after the
        final norm if `norm`; no later block is run (`forward_intermediates` with
        `stop_early`). A classifier gives its encoder's."""
        ...

    def batch_runner(self, model: Any, workers: int) -> tuple[Callable[[np.ndarray], Outputs], str]:
        """`run` as `predict` uses it on a stream of batches, and how it runs (with
        `workers` decoding), in words."""
        ...

    def batches(
        self, paths: Sequence[Path], processor: Any, batch_size: int, workers: int
    ) -> Iterator[Batch]:
        """Decoded, preprocessed batches of image files, `workers` decoding in parallel."""
        ...

    def parameter_count(self, model: Any) -> int: ...

    def as_tensor(self, array: np.ndarray) -> Any:
        """The framework's tensor holding `array` (for `return_tensors=`)."""
        ...


HALF_PRECISION = ("bfloat16", "float16")
DTYPES = ("float32", *HALF_PRECISION)  # the compute dtypes both backends run (`dtype=`)


def warn_if_slow_dtype(dtype_name: str, device: str) -> None:
    """A `RuntimeWarning` when half precision is asked for on a CPU device (`device`, in
    words): CPUs without native bfloat16/float16 arithmetic convert around every op, so
    it is slower there than float32, and it is what a GPU or TPU is for. It warns rather
    than refuses: the numbers are right, and a CPU with AMX runs bfloat16 well."""
    if dtype_name not in HALF_PRECISION:
        return
    warnings.warn(
        f"dtype={dtype_name!r} on the CPU ({device}) is slow: most CPUs have no "
        f"{dtype_name} arithmetic and convert around every op, so float32 (the default) "
        "is usually faster there; half precision pays on a GPU or TPU (device=)",
        RuntimeWarning,
        stacklevel=4,  # the caller of load (through resolve_device)
    )


def check_backend_name(name: str) -> None:
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(REGISTRY)}")


def is_given(value: Any) -> bool:
    """Whether an option value asks for something: None is unset and False is off."""
    return value is not None and value is not False


def backend_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options given (not None or False) for backend `name`; one that belongs to
    another backend is refused, naming the backend that takes it."""
    check_backend_name(name)
    given = {option: value for option, value in options.items() if is_given(value)}
    for option, value in given.items():
        if option in REGISTRY[name].options:
            continue
        owners = [b for b, entry in REGISTRY.items() if option in entry.options]
        if not owners:
            raise TypeError(f"load() got an unexpected keyword argument {option!r}")
        raise InputError(
            f"{option}={value!r} runs on the {' or '.join(owners)} backend; the {name} "
            f"backend {REGISTRY[name].computes}"
        )
    return given


def get_backend(name: str) -> Backend:
    """The backend module for `name`, importing its framework now (and only now)."""
    check_backend_name(name)
    entry = REGISTRY[name]
    try:
        module: Any = importlib.import_module(entry.module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] == entry.module.split(".")[0]:
            raise  # the backend itself is broken, not its framework missing
        raise ImportError(
            f"backend {name!r} needs its framework ({exc.name} is not installed); "
            f"install it with `pip install 'vit-twin[{entry.extra}]'`"
        ) from exc
    return module


def class_to_build(kind: ModelKind, twins: Mapping[str, type], model_class: type | None) -> Any:
    """The twin class a backend builds for `kind`: `model_class` when given (it must be a
    subclass of the twin's own class for that kind), else the twin's own; `twins` maps
    each `ModelKind.model_type` ("base", "classification", "masked-image-modeling") to
    the backend's class."""
    twin = twins[kind.model_type]
    if model_class is None:
        return twin
    if not issubclass(model_class, twin):
        raise InputError(
            f"model_class={model_class.__name__} cannot hold this checkpoint, which needs a "
            f"{twin.__name__} (a subclass of it, or model_type= to choose the other model)"
        )
    return model_class


def as_numpy_outputs(record: ModelOutput, to_numpy: Callable[[Any], np.ndarray]) -> Outputs:
    """An output record as float32 numpy arrays; `None` fields and the loss left out."""
    out: Outputs = {}
    for name in record:  # the fields that hold a value
        if name == "loss":
            continue
        value = getattr(record, name)
        if isinstance(value, tuple):
            out[name] = tuple(to_numpy(v) for v in value)
        else:
            out[name] = to_numpy(value)
    return out
