"""Compiled float inference: `vit_core.load(..., compile=True)`.

Why: in eager mode every library calls the same kernels (MKL / oneDNN sgemm, flash
attention), so eager speed is a tie; the lever the peers do not ship is a compiled
graph. `torch.compile` with inductor and frozen weights lets oneDNN pre-pack each weight
once and fuse the bias, and the GELU after fc1, into the GEMMs, and inductor writes one
C++ loop for each chain of element-wise work (LayerNorm, residual adds, layer scale).

Each input shape (batch size, image size) is compiled once, on its first call (tens of
seconds for a 12-layer model on two cores; inductor also caches the code on disk, so a
later process compiles faster), and is then cached in this process. The weights are
frozen into the compiled code at that call: a model whose weights change afterwards
must be loaded again. Calls that ask for more than the final outputs (attentions,
hidden states, another image size, labels) run the eager model the compiled one was
made from, which stays in `.model` (also for `save_pretrained` and training).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit_core.backend import is_given
from vit_core.errors import InputError
from vit_core.outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from vit_torch.modeling import ViTPreTrainedModel

# Input shapes one model compiles before it runs the rest eagerly (with a warning); each
# compile holds its own packed weights, so a bound keeps memory from growing unseen.
MAX_COMPILED_SHAPES = 16
# dynamo counts compiles per code object, shared by every model compiled here: its limit
# (8 by default, then a silent fall back to eager) is raised above ours.
_DYNAMO_RECOMPILE_LIMIT = 1024
_EAGER_ONLY = ("labels", "output_attentions", "output_hidden_states", "interpolate_pos_encoding")


class CompiledViT(nn.Module):
    """A float ViT whose plain calls run compiled code: called like the model it wraps."""

    def __init__(self, model: ViTPreTrainedModel) -> None:
        super().__init__()
        check_compiler("compile=True")
        self.model = model.eval()
        self.config = model.config
        self.kind = model.kind
        self._shapes: set[tuple[int, ...]] = set()
        self._compiled = torch.compile(self._final_outputs, dynamic=False)

    def _final_outputs(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        """The eager model's outputs as a dict of tensors (what a compiled graph returns)."""
        out = self.model(pixel_values)
        return {name: out[name] for name in out}

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool = True, **options: Any
    ) -> ImageClassifierOutput | BaseModelOutputWithPooling | tuple[Any, ...]:
        shape = tuple(pixel_values.shape)
        eager_only = any(is_given(options.get(name)) for name in _EAGER_ONLY)
        if eager_only or not self._compilable(shape):
            return self.model(pixel_values, return_dict=return_dict, **options)
        self.config.check_pixel_shape(shape, False)
        with torch.no_grad(), compiling():
            outputs = self._compiled(pixel_values)
        record = ImageClassifierOutput if self.kind.classifier else BaseModelOutputWithPooling
        out = record(**outputs)
        return out if return_dict else out.to_tuple()

    def _compilable(self, shape: tuple[int, ...]) -> bool:
        if shape in self._shapes or len(self._shapes) < MAX_COMPILED_SHAPES:
            self._shapes.add(shape)
            return True
        warnings.warn(
            f"this compiled model already holds code for {MAX_COMPILED_SHAPES} input "
            f"shapes; input {shape} runs eagerly (pad batches to a few fixed sizes)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False

    def save_pretrained(self, folder: str | Path) -> Path:
        """The eager model's folder (compiling changes no weight)."""
        return self.model.save_pretrained(folder)


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """Frozen weights, dynamo's recompile limit above ours, torch's notices silenced."""
    from torch._dynamo import config as dynamo_config

    with (
        frozen_weights(),
        dynamo_config.patch(recompile_limit=_DYNAMO_RECOMPILE_LIMIT),
        quiet(),
    ):
        yield


def frozen_weights() -> contextlib.AbstractContextManager[None]:
    """inductor's freezing, set while a compile runs: the weights become constants, so
    oneDNN packs them once and fuses the ops around the GEMMs (and the int8 form folds
    its quantize steps). Imported here, not at the top: inductor's import alone is about
    150 MiB of resident memory, which a model that never compiles should not pay."""
    from torch._inductor import config as inductor_config

    return inductor_config.patch(freezing=True)


def check_compiler(option: str) -> None:
    """inductor writes C++ for the CPU: fail at load, not at the first call, if it cannot."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as error:
        raise InputError(
            f"{option} compiles C++ kernels with torch.compile and found no C++ compiler "
            f"({error}); install g++ (or set CXX), or load the model without it"
        ) from None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Export, torchao and inductor's lowering warn about torch's own internals
    (deprecations, tensor copies, a missing CUDA), which are not the user's news."""
    names = ("_pytree", "cpp_extension")
    loggers = [logging.getLogger(f"torch.utils.{name}") for name in names]
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
