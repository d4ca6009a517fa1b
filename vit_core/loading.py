"""`load`: a canonical folder -> a ready model in the framework asked for; `save_folder` back.

The one road in: find the files and read the config (`ViTConfig.from_json_file`, the one
config reader), read and check the tensors (`vit_core.checkpoint`), check every key and
shape against the config, apply the surgery asked for (`vit_core.surgery`), rename to the
twins' internal names (`vit_core.layout`), and only then hand config and numpy tensors to
the backend (`vit_core.backend`), which builds the twin in its framework.

Two explicit changes can be asked for on the way, both done in numpy so that the PyTorch
and the Flax model come out with the same weights:

- `image_size=`: the position table is resampled to the new grid (`vit_core.resample`)
  and the config gets the new size, so the model runs at that size without
  `interpolate_pos_encoding` and `save_pretrained` writes the resized model.
- `num_labels=`: the classifier is re-initialised for a new label set, the rest kept
  (transformers' `ignore_mismatched_sizes`, but asked for by name, never silent).
- `init_decoder=True`: a fresh masked-image-modeling decoder and mask token on the
  checkpoint's encoder (`vit_core.surgery.new_decoder`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, overload

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from vit_core._io import can_write_in_place, files_in_place, staged_folder
from vit_core.backend import REGISTRY, Outputs, backend_options, get_backend
from vit_core.checkpoint import non_finite_report, release_pages
from vit_core.config import ViTConfig
from vit_core.errors import OutputExistsError, WriteError
from vit_core.hub import ModelSource, open_source
from vit_core.layout import (
    MASKED_IMAGE_MODELING,
    WEIGHTS_NAME,
    ModelKind,
    check_layout,
    model_kind,
    to_canonical,
    to_internal,
)
from vit_core.resample import DEFAULT_INTERPOLATION, check_interpolation
from vit_core.surgery import (
    check_depth,
    check_layout_with_hint,
    checked_new_head,
    new_decoder,
    resize_for_image_size,
    select_model_type,
)

ModelType = Literal["auto", "base", "classification", "masked-image-modeling"]
MODEL_TYPES: tuple[str, ...] = get_args(ModelType)


@overload
def load(
    path: str | Path | ModelSource,
    backend: Literal["torch"] = "torch",
    dtype: Any = None,
    model_type: ModelType = "auto",
    image_size: int | tuple[int, int] | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    seed: int = 0,
    model_class: type | None = None,
    revision: str | None = None,
    device: Any = None,
    init_decoder: bool = False,
    *,
    quantize: str | None = None,
    calibration: Any = None,
    compile: bool = False,
) -> Any: ...


@overload
def load(
    path: str | Path | ModelSource,
    backend: Literal["flax"],
    dtype: Any = None,
    model_type: ModelType = "auto",
    image_size: int | tuple[int, int] | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    seed: int = 0,
    model_class: type | None = None,
    revision: str | None = None,
    device: Any = None,
    init_decoder: bool = False,
) -> Any: ...


@overload
def load(
    path: str | Path | ModelSource,
    backend: str,
    dtype: Any = None,
    model_type: str = "auto",
    image_size: int | tuple[int, int] | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    seed: int = 0,
    model_class: type | None = None,
    revision: str | None = None,
    device: Any = None,
    init_decoder: bool = False,
    **options: Any,
) -> Any: ...


def load(
    path: str | Path | ModelSource,
    backend: str = "torch",
    dtype: Any = None,
    model_type: str = "auto",
    image_size: int | tuple[int, int] | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    seed: int = 0,
    model_class: type | None = None,
    revision: str | None = None,
    device: Any = None,
    init_decoder: bool = False,
    **options: Any,
) -> Any:
    """A model ready for inference from a canonical folder (or a `.safetensors` + config),
    or from a Hugging Face repo id in the local cache, at `revision` (branch, tag or commit;
    `vit_core.hub`: never a download; a repo in another layout, such as a timm one, is
    converted in memory). `path` may also be a `vit_core.hub.ModelSource` opened already.

    `model_type="auto"` builds the classification model when the file has a classifier
    head (`vit.`-prefixed keys), the masked-image-modeling model (transformers'
    `ViTForMaskedImageModeling`, SimMIM) when it has its decoder (`decoder.*`), and the
    base model otherwise; "base" takes the encoder of either. Loading is strict: every
    missing, unexpected or mis-shaped key is named in one `LayoutError`. A torch model
    comes back in eval mode; a Flax model holds its params and is called as
    `model(pixel_values)`. `dtype` (e.g. "bfloat16") casts the weights after checking.
    `model_class` builds that class (a subclass of the twin's model) instead of the
    twin's own; `from_pretrained` passes its class.

    `image_size` (int or (height, width), a multiple of the patch size) builds the model
    for that input size: the position embeddings are resampled with `interpolation`
    (see `vit_core.resample.INTERPOLATIONS`; "bicubic", the default, gives the same
    model as transformers' run-time `interpolate_pos_encoding`).

    `num_labels` (optionally with `id2label`; labels default to LABEL_i) replaces the
    classifier with a new one drawn from `seed` (same seed, same head in both backends);
    without it a checkpoint whose head disagrees with its config is a `LayoutError`.
    On a masked-image-modeling checkpoint it drops the decoder and the mask token:
    fine-tuning after SimMIM pre-training.

    `init_decoder=True` (with `model_type="masked-image-modeling"`) starts SimMIM
    pre-training from any checkpoint's encoder: a zero mask token and a decoder drawn
    from `seed`, any pooler, classifier or old decoder dropped (transformers initialises
    missing weights with a warning; here they are asked for by name, and without it a
    checkpoint lacking the decoder is a `CheckpointError` naming the missing keys).

    Devices and dtypes: `device` is where the weights go and the model runs; None is the
    framework's default (torch's default device, usually the CPU; jax's default device,
    uncommitted). The torch backend takes "cpu", "cuda", "cuda:1", "mps" or a
    `torch.device`; the Flax backend a `jax.Device`, a platform ("cpu", "gpu" or "cuda",
    "tpu": its first device) or "platform:N" (its N-th, e.g. "cpu:1"). A device this
    machine lacks is an `InputError` naming those it has, before any tensor is read.
    `dtype` is the compute dtype ("float32", the default whatever the file stores;
    "bfloat16"; "float16"): weights are cast on the host before they travel, and the
    backends' `run` sends pixels in it too; softmax and LayerNorm statistics stay in
    float32 (docs/numerics.md). Half precision on a CPU warns: it is slow there.

    Backend options go to the backend (`vit_core.backend.REGISTRY` says which takes what):
    the torch backend's `quantize="int8"` / `"int8-static"` with `calibration=` run the
    encoder as int8 matmuls (`vit_torch.quantization`: faster on CPUs, inference only);
    its `compile=True` runs plain calls through `torch.compile` with frozen weights
    (`vit_torch.compiled`: each input shape compiles once, at its first call).

    `backend="onnx"` runs an exported graph instead (`path`: a `.onnx` file written by
    `python -m vit_core export`, or a folder holding `model.onnx`; `vit_onnx.backend`):
    the same outputs, in float32, on "cpu" or "cuda"; what would change the model
    (`image_size`, `num_labels`, ...) is refused, as a graph is fixed when exported.
    """
    options = backend_options(backend, options)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {MODEL_TYPES}")
    check_interpolation(interpolation)
    if num_labels is None and id2label is not None:
        num_labels = len(id2label)
    if num_labels is not None and model_type in ("base", MASKED_IMAGE_MODELING):
        raise ValueError(f"num_labels replaces the classifier head; a {model_type} model has none")
    if init_decoder and model_type != MASKED_IMAGE_MODELING:
        raise ValueError(
            "init_decoder=True starts a masked-image-modeling decoder; pass "
            "model_type='masked-image-modeling' with it"
        )
    if init_decoder and REGISTRY[backend].exported:
        raise ValueError(
            f"init_decoder=True changes the model; a {backend} graph is fixed when exported: "
            "start the decoder from the folder it was exported from"
        )
    if REGISTRY[backend].exported:  # an exported graph (vit_onnx): the backend reads the file
        runtime: Any = get_backend(backend)
        return runtime.open_graph(
            path, model_type, dtype, image_size, num_labels, id2label, model_class, revision, device
        )
    # a folder or file as it is; a repo id from the local Hugging Face cache (vit_core.hub)
    source = open_source(path, revision)
    weights, config = source.weights, source.config
    # The framework is imported only now that the files and config are known to be good,
    # and its options are checked before any tensor is read.
    twin = get_backend(backend)
    place = twin.resolve_device(device, dtype)
    twin.check_options(dtype, place, **options)
    tensors = source.read_tensors()
    check_depth(tensors, config, weights)
    tensors, kind = select_model_type(
        tensors,
        model_kind(tensors, config),
        "auto" if num_labels is not None else model_type,
        weights,
        init_decoder,
    )
    if num_labels is not None:
        tensors, config, kind = checked_new_head(
            tensors, config, kind, num_labels, id2label, seed, str(weights)
        )
    if init_decoder:
        tensors, kind = new_decoder(tensors, config, kind, seed, str(weights))
    check_layout_with_hint(tensors, config, kind, str(weights))
    if image_size is not None:
        tensors, config = resize_for_image_size(tensors, config, kind, image_size, interpolation)
    # q/k/v pages are given back as each layer is fused: peak memory stays one model's
    internal = to_internal(tensors, kind, consumed=release_pages)
    return twin.build(config, kind, internal, dtype, model_class, place, **options)


def folder_outputs(folder: str | Path, backend: str, pixels: np.ndarray) -> Outputs:
    """A folder's outputs from one backend in float32: logits (and a distilled model's
    cls_logits and distillation_logits) if it has a classifier, reconstruction if it is
    a masked-image-modeling model, last_hidden_state, and pooler_output (if its encoder
    has one)."""
    twin = get_backend(backend)
    first = twin.run(load(folder, backend, dtype="float32"), pixels)  # the folder's own model
    if "last_hidden_state" in first:  # a base model: its outputs are the encoder's
        return first
    base = twin.run(load(folder, backend, dtype="float32", model_type="base"), pixels)
    return {**first, **base}


PROBE_SEED = 0
PROBE_BATCH = 2


def probe(config: ViTConfig) -> np.ndarray:
    """The fixed probe batch that verifications run (conversion's `--verify`, `export`):
    seeded unit-normal pixels, (PROBE_BATCH, C, H, W) float32 at the config's image size."""
    height, width = config.image_hw
    rng = np.random.default_rng(PROBE_SEED)
    shape = (PROBE_BATCH, config.num_channels, height, width)
    return rng.standard_normal(shape).astype(np.float32)


def save_folder(
    folder: str | Path, config: ViTConfig, internal: dict[str, np.ndarray], kind: ModelKind
) -> Path:
    """Write internal-name weights as a canonical folder, atomically as a whole.

    The folder is written beside `folder` and renamed into place
    (`vit_core._io.staged_folder`): a reader, or a process killed mid-write, sees the old
    folder or the complete new one, never a mix. An existing folder is replaced by the
    new one, carrying over (hard links, else copies) every file the save does not write:
    `model.safetensors` and `config.json` are new, a `preprocessor_config.json` or any
    other file already there is kept. A path that is a file is refused; a symlink to a
    folder is followed (the link keeps pointing at the new folder). Non-finite weights
    are written with a warning (a diverged model is still worth keeping), but `load`
    refuses them.
    """
    import warnings

    folder = Path(folder)
    if folder.is_symlink() and folder.is_dir():
        folder = folder.resolve()
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(
            f"{folder}: is a file, not a folder; save_pretrained writes a folder there: "
            "choose another path, or remove the file"
        )
    canonical = to_canonical(internal, kind)
    check_layout(canonical, config, kind, f"weights to save in {folder}")
    report = non_finite_report(canonical)
    if report:
        warnings.warn(
            f"saving to {folder}: {report}; saved anyway (a diverged model is worth a "
            "post-mortem), but vit_core.load refuses the folder",
            RuntimeWarning,
            stacklevel=3,
        )
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(canonical.items())}
    config = ViTConfig.from_dict(
        config.to_dict(),
        architectures=[kind.architecture],
    )

    def write(staging: Path) -> None:
        try:
            save_file(arrays, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        except (OSError, SafetensorError) as exc:
            raise WriteError(
                f"{folder}: cannot write {WEIGHTS_NAME} ({exc}); the folder is unchanged"
            ) from exc
        config.save_pretrained(staging)

    try:
        with staged_folder(folder, replace=True, keep_other_files=True) as staging:
            write(staging)
    except WriteError as exc:
        if not can_write_in_place(exc, folder):
            raise
        warnings.warn(
            f"{folder} cannot be replaced as a whole ({exc.__cause__}): it is a mount point "
            "or its parent folder is not writable; its files were replaced one by one "
            "instead (each atomically, not the pair). Save into a subfolder to get the "
            "all-or-nothing write.",
            RuntimeWarning,
            stacklevel=3,
        )
        with files_in_place(folder) as staging:
            write(staging)
    return folder
