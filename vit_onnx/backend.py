"""The onnx backend (`vit_core.backend`): an exported `.onnx` file, run by onnxruntime.

The twins' backends build a model from canonical tensors; this one builds nothing.
`vit_core.load(path, backend="onnx")` hands it the file (`open_graph`): a `.onnx` written
by `python -m vit_core export` (`vit_torch.export.write_onnx`), or a folder holding
`model.onnx`. The file carries its config, its kind and its preprocessor config in its
metadata, so it runs on its own, with neither torch nor jax installed. `OnnxViT` offers
what the CLI and the embedding code ask of a twin's model: `config`, `kind`, `processor`,
and a call on pixel values that returns the twin's output record, with its field names.

A graph computes what it was exported to compute, at the size it was exported for; the
rest is refused by name: attentions, hidden states, intermediate layers, run-time
interpolation of the positions, dtypes other than float32, int8 (quantize the file
instead: `onnxruntime.quantization.quantize_dynamic`, as benchmarks/run.py does).

Sessions run with every graph optimisation on (`ORT_ENABLE_ALL`), one intra-op thread per
core this process may use, and intra-op spinning off: between ops the idle threads sleep
instead of busy-waiting, so a session does not take the cores from the decoding workers
of `predict`, or from whatever runs after it. The CPU provider, or CUDA where
`device="cuda"` asks for it and this onnxruntime has it (the onnxruntime-gpu build).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from vit_core._io import local_path
from vit_core.backend import Outputs, as_numpy_outputs
from vit_core.batching import Batch, threaded_batches
from vit_core.config import CONFIG_NAME, ViTConfig
from vit_core.errors import CheckpointError, ConfigError, InputError, LayoutError, ViTError
from vit_core.layout import EXPORT_INPUT_NAME as INPUT_NAME
from vit_core.layout import KIND_METADATA_KEY, ONNX_NAME, ModelKind
from vit_core.outputs import BaseModelOutputWithPooling, ImageClassifierOutput, ModelOutput
from vit_core.processing import PROCESSOR_NAME, ViTImageProcessor

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
# What onnxruntime raises on a file it cannot read or a graph it cannot run.
ORT_ERRORS: tuple[type[Exception], ...] = (
    ort_errors.Fail,
    ort_errors.InvalidArgument,
    ort_errors.InvalidGraph,
    ort_errors.InvalidProtobuf,
    ort_errors.NoSuchFile,
    ort_errors.NotImplemented,
    ort_errors.RuntimeException,
)
CLASSIFIER_FIELDS = ("logits", "cls_logits", "distillation_logits")
ENCODER_FIELDS = ("last_hidden_state", "pooler_output")


def export_hint(folder: str | Path = "FOLDER") -> str:
    """The command that writes an exported graph of a model folder."""
    return (
        f"export the model folder with `python -m vit_core export {folder} --format onnx "
        f"-o {Path(folder) / ONNX_NAME}`"
    )


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _is_float32(dtype: Any) -> bool:
    """Whether `dtype=` asks for float32 (None, "float32", np.float32, torch.float32)."""
    if dtype is None or str(dtype).removeprefix("torch.") == "float32":
        return True
    try:
        return bool(np.dtype(dtype) == np.float32)
    except TypeError:
        return False


# ------------------------------------------------------------ the protocol
def resolve_device(device: Any, dtype: Any = None) -> list[Any]:
    """The onnxruntime execution providers `device` names: the CPU's for None or "cpu";
    CUDA's (then the CPU's, for the few ops CUDA lacks) for "cuda" or "cuda:N", where
    this onnxruntime has it. (`dtype` changes nothing: a graph computes in float32.)"""
    text = "cpu" if device is None else str(device)
    kind, _, index = text.partition(":")
    if text == "cpu":
        return [CPU]
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(
            f"device={device!r}: the onnx backend runs on 'cpu' or 'cuda' ('cuda:N' for "
            "the N-th GPU)"
        )
    available = ort.get_available_providers()
    if CUDA not in available:
        raise InputError(
            f"device={device!r}: this onnxruntime ({ort.__version__}) has no CUDA provider "
            f"(it has {', '.join(available)}); install onnxruntime-gpu in its place for CUDA"
        )
    return [(CUDA, {"device_id": int(index or 0)}), CPU]


def check_options(dtype: Any, device: Any = None) -> None:
    """A graph computes in the float32 it was exported in; `device` is checked by
    `resolve_device`."""
    if not _is_float32(dtype):
        raise InputError(
            f"dtype={dtype!r}: an exported graph computes in float32, the dtype it was "
            "exported in; load the folder with the torch or flax backend for another dtype"
        )


def build(config: ViTConfig, kind: ModelKind, internal: Any, *args: Any, **options: Any) -> Any:
    """Refused: this backend runs exported files (`open_graph`), it builds no model."""
    raise InputError(
        "the onnx backend runs exported .onnx files and builds no model from a checkpoint; "
        f"{export_hint()}, then load the .onnx file"
    )


def run(
    model: OnnxViT,
    pixels: np.ndarray,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    interpolate_pos_encoding: bool | str = False,
) -> Outputs:
    """The graph's outputs on numpy pixels, as float32 numpy (the flags as the twins take
    them; a graph computes only its final outputs, so anything else is refused)."""
    record = model(
        pixels,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        interpolate_pos_encoding=interpolate_pos_encoding,
    )
    return as_numpy_outputs(record, np.asarray)


def intermediates(
    model: OnnxViT,
    pixels: np.ndarray,
    indices: Sequence[int],
    norm: bool,
    interpolate_pos_encoding: bool | str = False,
) -> list[np.ndarray]:
    """Refused: an exported graph computes its final outputs only."""
    raise InputError(
        f"{model.path}: an exported graph computes its final outputs only, not the blocks' "
        "(layer=, --layer); read intermediate layers from the model folder with the torch "
        "or flax backend"
    )


def batch_runner(model: OnnxViT, workers: int) -> tuple[Callable[[np.ndarray], Outputs], str]:
    return partial(run, model), f"{model.describe()}, {workers} decoding thread(s)"


def batches(
    paths: Sequence[Path], processor: Any, batch_size: int, workers: int
) -> Iterator[Batch]:
    """Batches decoded by a thread pool (PIL releases the GIL), as the flax backend's."""
    return threaded_batches(paths, processor, batch_size, workers)


def parameter_count(model: OnnxViT) -> int:
    """The values of the graph's weights: its float initializers other than scalars
    (the constants the exporter folds; every ViT weight has an axis). The exporter stores
    weights that are equal once, so a model whose weights repeat (an untrained one's unit
    LayerNorm scales) counts fewer than its twin."""
    import onnx

    proto = onnx.load(str(model.path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    return sum(
        int(np.prod(tensor.dims))
        for tensor in proto.graph.initializer
        if tensor.data_type in floats and len(tensor.dims) > 0
    )


def as_tensor(array: np.ndarray) -> np.ndarray:
    """onnxruntime takes numpy arrays as they are."""
    return array


# ------------------------------------------------------------ the model
@dataclasses.dataclass(frozen=True)
class Graph:
    """What an exported file holds, read and checked: its session, the config and kind of
    the model it was exported from, its preprocessor (None if it carries none), and its
    output names in graph order."""

    path: Path
    session: ort.InferenceSession
    config: ViTConfig
    kind: ModelKind
    processor: ViTImageProcessor | None
    outputs: tuple[str, ...]

    def run(self, pixels: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The outputs `names` on `pixels` (N, C, H, W) at the graph's size."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        self.config.check_pixel_shape(pixels.shape, False)
        try:
            values = self.session.run(list(names), {INPUT_NAME: pixels})
        except ORT_ERRORS as exc:
            raise InputError(
                f"{self.path}: onnxruntime could not run the graph: {_reason(exc)}"
            ) from None
        return dict(zip(names, values, strict=True))


class OnnxViT:
    """An exported graph as a model: `config`, `kind`, `processor` (the one it was exported
    with, or None), and `model(pixel_values)` -> the twin's output record.

    `kind` is what this view returns: an exported classifier gives `ImageClassifierOutput`
    (`logits`, and a distilled model's two heads), an exported encoder
    `BaseModelOutputWithPooling` (`last_hidden_state`, `pooler_output` where it has one).
    """

    def __init__(self, graph: Graph, model_type: str = "auto") -> None:
        classifier = graph.kind.classifier
        if model_type == "classification" and not classifier:
            raise LayoutError(
                f"{graph.path}: an exported encoder (outputs {', '.join(graph.outputs)}) has "
                "no classifier head; export a classification folder for predictions"
            )
        if model_type == "base" and classifier:
            raise LayoutError(
                f"{graph.path}: an exported classifier computes {', '.join(graph.outputs)} "
                "only, not its encoder's last_hidden_state and pooler_output; for embeddings "
                "export the folder's encoder (loaded with model_type='base')"
            )
        self.graph = graph
        self.fields = graph.outputs

    @property
    def path(self) -> Path:
        return self.graph.path

    @property
    def config(self) -> ViTConfig:
        return self.graph.config

    @property
    def kind(self) -> ModelKind:
        return self.graph.kind

    @property
    def processor(self) -> ViTImageProcessor | None:
        return self.graph.processor

    def __call__(
        self,
        pixel_values: Any,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool | str = False,
    ) -> ModelOutput:
        """The output record on `pixel_values` (N, C, H, W), at the graph's input size."""
        asked = {
            "output_attentions": output_attentions,
            "output_hidden_states": output_hidden_states,
            "interpolate_pos_encoding": interpolate_pos_encoding,
        }
        refused = [f"{flag}={value!r}" for flag, value in asked.items() if value]
        if refused:
            (height, width) = self.config.image_hw
            raise InputError(
                f"{self.path}: {', '.join(refused)}: an exported graph computes its final "
                f"outputs only, on {height}x{width} inputs; use the model folder with the "
                "torch or flax backend for attentions, hidden states or another input size "
                "(or export again with --image-size)"
            )
        out: dict[str, Any] = self.graph.run(pixel_values, self.fields)
        if self.kind.classifier:
            return ImageClassifierOutput(**out)
        return BaseModelOutputWithPooling(**out)

    def describe(self) -> str:
        """How the graph runs, in words: `onnxruntime 1.20 on CPUExecutionProvider, ...`."""
        providers = self.graph.session.get_providers()
        return f"onnxruntime {ort.__version__} on {providers[0]}, {cores()} intra-op threads"

    def __repr__(self) -> str:
        what = "classifier" if self.kind.classifier else "encoder"
        return f"OnnxViT({self.path}, {what}, outputs {', '.join(self.fields)})"


# ------------------------------------------------------------ reading a file
def _reason(exc: BaseException) -> str:
    """onnxruntime's message without its "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :"
    prefix, first line only."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.rsplit(" : ", 1)[-1]


def graph_file(path: str | Path) -> Path:
    """The `.onnx` file `path` names: the file itself, or `model.onnx` in a folder."""
    path = local_path(path)
    if path.is_dir():
        file = path / ONNX_NAME
        if not file.is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
            raise CheckpointError(
                f"{path}: no {ONNX_NAME} in this folder (found: {found}); the onnx backend "
                f"runs an exported graph: {export_hint(path)}"
            )
        return file
    if path.suffix.lower() != ".onnx":
        raise CheckpointError(
            f"{path}: the onnx backend runs an exported .onnx file (or a folder holding "
            f"{ONNX_NAME}); {export_hint()}"
        )
    return path


def session(file: Path, providers: Sequence[Any]) -> ort.InferenceSession:
    """An onnxruntime session of `file` with this backend's options (module docstring);
    an unreadable file is a `CheckpointError` naming it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = cores()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: what goes wrong is raised, once
    try:
        opened = ort.InferenceSession(str(file), options, providers=list(providers))
    except ort_errors.EPFail as exc:  # the provider, not the file
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        raise InputError(
            f"{file}: onnxruntime's {first} failed to start ({_reason(exc)}); use device='cpu'"
        ) from None
    except ORT_ERRORS as exc:
        raise CheckpointError(
            f"{file}: not a readable ONNX model ({_reason(exc)}); {export_hint()}"
        ) from None
    if providers[0] != CPU and opened.get_providers()[0] != CUDA:
        raise InputError(
            f"{file}: onnxruntime could not start its CUDA provider here (no GPU, or a CUDA "
            "or cuDNN library it needs is missing); use device='cpu'"
        )
    return opened


def _metadata_json(file: Path, metadata: Mapping[str, str], key: str) -> Any:
    """The JSON value of metadata entry `key`, or a `ConfigError` naming the file."""
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: metadata entry {key!r} is not valid JSON ({exc})") from None


def _config(file: Path, metadata: Mapping[str, str]) -> ViTConfig:
    if CONFIG_NAME not in metadata:
        raise CheckpointError(
            f"{file}: no {CONFIG_NAME} in its metadata (entries: "
            f"{', '.join(sorted(metadata)) or 'none'}), so what it computes is unknown; it "
            f"was not written by this package: {export_hint()}"
        )
    return _metadata_object(file, metadata, CONFIG_NAME, ViTConfig.from_dict)


def _metadata_object(file: Path, metadata: Mapping[str, str], name: str, build: Any) -> Any:
    """`build(JSON object)` of the metadata entry `name` (a config or processor): an entry
    that is not a JSON object, or that `build` refuses, is a `ConfigError` naming it."""
    data = _metadata_json(file, metadata, name)
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: metadata entry {name!r} is not a JSON object")
    try:
        return build(data)
    except (ViTError, TypeError, ValueError) as exc:
        raise ConfigError(f"{file}: {name} in its metadata: {exc}") from None


def _kind(file: Path, metadata: Mapping[str, str]) -> ModelKind:
    """The model kind the file was exported from. Fields with a default (added to
    `ModelKind` after a file was written) may be absent; unknown ones are refused."""
    fields = {f.name for f in dataclasses.fields(ModelKind)}
    required = {f.name for f in dataclasses.fields(ModelKind) if f.default is dataclasses.MISSING}
    data = (
        _metadata_json(file, metadata, KIND_METADATA_KEY) if KIND_METADATA_KEY in metadata else None
    )
    if (
        not isinstance(data, dict)
        or not required <= set(data) <= fields
        or not all(isinstance(v, bool) for v in data.values())
    ):
        raise CheckpointError(
            f"{file}: metadata entry {KIND_METADATA_KEY!r} is missing or is not "
            f"{{{', '.join(sorted(fields))}: true|false}}; {export_hint()}"
        )
    return ModelKind(**data)


def _processor(file: Path, metadata: Mapping[str, str]) -> ViTImageProcessor | None:
    if PROCESSOR_NAME not in metadata:
        return None
    processor: ViTImageProcessor = _metadata_object(
        file, metadata, PROCESSOR_NAME, ViTImageProcessor.from_dict
    )
    return processor


def _check_signature(
    file: Path, opened: ort.InferenceSession, config: ViTConfig, kind: ModelKind
) -> tuple[str, ...]:
    """The graph's output names, once its input and outputs are those an export of
    `config` and `kind` has; else a `LayoutError` saying what the file has instead."""
    inputs = opened.get_inputs()
    expected = [config.num_channels, *config.image_hw]
    if (
        len(inputs) != 1
        or inputs[0].name != INPUT_NAME
        or inputs[0].type != "tensor(float)"
        or list(inputs[0].shape[1:]) != expected
    ):
        found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise LayoutError(
            f"{file}: the graph takes {found}; an export of its config takes one input "
            f"{INPUT_NAME} tensor(float) [batch, {', '.join(map(str, expected))}]"
        )
    outputs = tuple(o.name for o in opened.get_outputs())
    allowed = CLASSIFIER_FIELDS if kind.classifier else ENCODER_FIELDS
    required = allowed[0]
    if required not in outputs or not set(outputs) <= set(allowed):
        raise LayoutError(
            f"{file}: the graph's outputs are {', '.join(outputs)}; an exported "
            f"{'classifier' if kind.classifier else 'encoder'} gives {required} (and of "
            f"{', '.join(allowed[1:])}, those its model returns)"
        )
    return outputs


def read_graph(path: str | Path, device: Any = None) -> Graph:
    """The exported file `path` names (a `.onnx` file, or a folder holding `model.onnx`)
    in a session on `device`, its metadata and signature checked."""
    providers = resolve_device(device)
    file = graph_file(path)
    opened = session(file, providers)
    metadata = opened.get_modelmeta().custom_metadata_map
    config, kind = _config(file, metadata), _kind(file, metadata)
    outputs = _check_signature(file, opened, config, kind)
    return Graph(file, opened, config, kind, _processor(file, metadata), outputs)


def open_graph(
    path: str | Path,
    model_type: str = "auto",
    dtype: Any = None,
    image_size: Any = None,
    num_labels: int | None = None,
    id2label: Any = None,
    model_class: type | None = None,
    revision: str | None = None,
    device: Any = None,
) -> OnnxViT:
    """What `vit_core.load(path, backend="onnx", ...)` returns: the exported graph as a
    model (`OnnxViT`). A graph is fixed when it is exported, so the arguments that change
    a model (`image_size`, `num_labels`, `id2label`, `model_class`, a dtype other than
    float32) are refused; `model_type` must agree with what was exported."""
    if revision is not None:
        raise InputError(
            f"revision={revision!r} picks a revision of a Hugging Face cache entry; an "
            "exported graph is a local file, read as it is"
        )
    changes = {
        "image_size": image_size,
        "num_labels": num_labels,
        "id2label": id2label,
        "model_class": model_class,
    }
    asked = [f"{name}={value!r}" for name, value in changes.items() if value is not None]
    if asked:
        raise InputError(
            f"{', '.join(asked)}: an exported graph is fixed (its input size, head and "
            "class were set when it was exported); apply this to the model folder with the "
            "torch or flax backend, or export it so changed (`python -m vit_core export "
            "FOLDER --image-size N`)"
        )
    check_options(dtype)
    return OnnxViT(read_graph(path, device), model_type)


def run_onnx_file(path: Path, pixels: np.ndarray) -> Outputs:
    """Every output of the exported file at `path` on `pixels`, by name, as float32 numpy,
    run on the CPU (what `python -m vit_core export` checks against the twin)."""
    graph = read_graph(path)
    return graph.run(pixels, graph.outputs)
