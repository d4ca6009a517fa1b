"""The torch twin keeps every tensor on the input's device and in the compute dtype.

Device: each family is built on the meta device and run on meta pixels under a dispatch
mode that sees every aten op, so a tensor made anywhere else (a host constant left on
the CPU, as `positions_for` once made its resampling matrices) is named by the op that
made it. Plain meta tensors would not show it: `einsum` and `matmul` mix a CPU and a meta
operand without complaint.

Dtype: in bfloat16 every module's output is bfloat16, the only float32 tensors are the
softmax's (and the fused kernel's log-sum-exp), and the outputs stay within the bound of
docs/numerics.md of the float32 model's. The reductions inside torch's LayerNorm and
attention kernels are measured here, not assumed: in half precision they round once,
at the end, as a float32 computation would.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from vit_test_support import FAMILIES, record_max_diff, tiny_config, write_folder

import vit_core
from vit_core.errors import InputError
from vit_core.layout import ModelKind
from vit_torch import backend
from vit_torch.modeling import ViTForImageClassification, ViTModel

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CUDA = torch.cuda.is_available()
ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
OTHER_SIZE = (12, 16)  # not the configs' 8x8: the position table is resampled at run time
# bfloat16 against float32, per output: docs/numerics.md's bound for twin against twin,
# 16 roundings of bfloat16 at the output's scale (each twin alone is measured there too).
BF16_RTOL = 2.0**-3
# float16 has 3 more mantissa bits: the same 16 roundings of 2^-10 each.
F16_RTOL = 2.0**-6
# The ops that may give a float32 tensor in a bfloat16 forward: host constants before
# their cast, the casts, the softmax computed in float32, and the log-sum-exp the fused
# attention kernel returns beside its (bfloat16) output.
FLOAT32_OPS = {
    "aten.lift_fresh.default",
    "aten._to_copy.default",
    "aten._softmax.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
}


class OpRecorder(TorchDispatchMode):
    """Every aten op run under it, with the devices and dtypes of what it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[str, torch.device, torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.outputs.append((str(func), tensor.device, tensor.dtype))
        return out

    def off_device(self, device: str) -> set[str]:
        """The ops that made a tensor elsewhere than on `device`. `lift_fresh` is left
        out: it wraps host data (numpy, a Python list), which must travel to be used,
        so a constant moved to the device shows no op and one that stays shows the next."""
        return {
            op
            for op, where, _ in self.outputs
            if where.type != device and op != "aten.lift_fresh.default"
        }

    def not_in(self, dtype: torch.dtype) -> set[str]:
        """The ops that made a floating-point tensor of another dtype."""
        return {op for op, _, kind in self.outputs if kind.is_floating_point and kind != dtype}


def build_on_meta(fields: dict[str, Any], kind: ModelKind) -> ViTModel | ViTForImageClassification:
    config = tiny_config(**fields)
    with torch.device("meta"):
        if kind.classifier:
            return ViTForImageClassification(config).eval()
        return ViTModel(config, add_pooling_layer=kind.pooler).eval()


def every_forward(
    model: ViTModel | ViTForImageClassification, pixels: torch.Tensor
) -> Iterator[Any]:
    """Each way through the model: fused and explicit attention, run-time resampling
    (both interpolations), hidden states, the loss, and the intermediate layers."""
    yield model(pixels)
    yield model(pixels, output_attentions=True, output_hidden_states=True)
    resized = pixels.new_empty((*pixels.shape[:2], *OTHER_SIZE))
    yield model(resized, interpolate_pos_encoding=True, output_attentions=True)
    yield model(resized, interpolate_pos_encoding="bicubic_antialias")
    if isinstance(model, ViTForImageClassification):
        labels = torch.zeros(len(pixels), dtype=torch.long, device=pixels.device)
        yield model(pixels, labels=labels)
    yield model.forward_intermediates(
        resized, indices=[0, 1], return_prefix_tokens=True, norm=True, interpolate_pos_encoding=True
    )
    yield model.forward_intermediates(pixels, indices=1, output_fmt="NLC", stop_early=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_forward_makes_every_tensor_on_the_inputs_device(family: str) -> None:
    fields, kind = FAMILIES[family]
    model = build_on_meta(fields, kind)
    pixels = torch.empty(2, 3, 8, 8, device="meta")
    with OpRecorder() as ops:
        outputs = list(every_forward(model, pixels))
    assert ops.off_device("meta") == set(), f"{family}: tensors made off the input's device"
    assert {t.device.type for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)} == {"meta"}


def test_the_device_check_sees_a_host_constant_left_behind() -> None:
    """What the check above is for: a constant made from numpy without `device=` is
    named, although the op that mixes it in raises nothing on meta tensors."""
    table = torch.empty(4, 3, device="meta")
    with OpRecorder() as ops:
        mixed = torch.einsum("ah,hd->ad", torch.tensor(np.eye(4), dtype=table.dtype), table)
    assert mixed.device.type == "meta"  # no error from torch itself
    assert "aten._to_copy.default" in ops.off_device("meta")


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-weight folder per family, 32 wide (bfloat16 bounds hold from 16 on)."""
    root = tmp_path_factory.mktemp("families")
    folders = {}
    for family, (fields, kind) in FAMILIES.items():
        config = tiny_config(hidden_size=32, intermediate_size=64, **fields)
        folders[family] = root / family
        folders[family].mkdir()
        write_folder(folders[family], config, kind, seed=len(folders))
    return folders


def _activations(model: torch.nn.Module) -> tuple[list[Any], list[Any]]:
    """Hooks that collect every module's output tensors; (outputs, handles)."""
    seen: list[Any] = []
    handles = [
        module.register_forward_hook(lambda m, i, out: seen.append((type(m).__name__, out)))
        for module in model.modules()
    ]
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_keeps_every_activation_bfloat16(
    family: str, family_folders: dict[str, Path]
) -> None:
    model = vit_core.load(family_folders[family], dtype="bfloat16")
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 12, 16))).float()
    seen, handles = _activations(model)
    with OpRecorder() as ops, torch.no_grad():
        model(pixels, output_attentions=True, interpolate_pos_encoding=True)
        model(pixels, interpolate_pos_encoding=True)
    for handle in handles:
        handle.remove()
    for name, out in seen:
        dtypes = {t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        assert dtypes <= {torch.bfloat16}, f"{family}: {name} returned {dtypes}"
    assert ops.not_in(torch.bfloat16) <= FLOAT32_OPS, family


def _assert_close_to_float32(
    folder: Path, dtype: str, rtol: float, name: str, pixels: np.ndarray
) -> None:
    flags = {"output_hidden_states": True, "output_attentions": True}
    want = backend.run(vit_core.load(folder), pixels, **flags)
    got = backend.run(vit_core.load(folder, dtype=dtype), pixels, **flags)
    assert want.keys() == got.keys()
    for field, expected in want.items():
        for e, a in zip(tree_leaves(expected), tree_leaves(got[field]), strict=True):
            scale = max(1.0, float(np.abs(e).max()))
            diff = float(np.abs(a - e).max())
            record_max_diff(f"torch {dtype} vs float32, every output / scale", diff / scale)
            assert diff <= rtol * scale, f"{name} {field}: {diff:.3g} > {rtol * scale:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_outputs_are_within_the_stated_bound_of_float32(
    family: str, family_folders: dict[str, Path]
) -> None:
    pixels = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    _assert_close_to_float32(family_folders[family], "bfloat16", BF16_RTOL, family, pixels)


def test_float16_runs_on_the_cpu(family_folders: dict[str, Path]) -> None:
    """torch's CPU kernels take float16 (since 2.1): it is allowed there, with the warning."""
    pixels = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    model = vit_core.load(family_folders["vit"], dtype="float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    _assert_close_to_float32(family_folders["vit"], "float16", F16_RTOL, "vit", pixels)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_norm_and_attention_kernels_reduce_in_float32(
    dtype: torch.dtype, device: str
) -> None:
    """In half precision torch's LayerNorm and SDPA kernels (the CPU's; CUDA's: flash
    attention) are as far from the float32 result as rounding it once is (statistics
    in half precision: ~3x as far)."""
    generator = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 50, 768, generator=generator) + 5).to(device, dtype)  # off-centre
    weight, bias = (torch.randn(768, generator=generator).to(device, dtype) for _ in range(2))
    exact = F.layer_norm(x.float(), (768,), weight.float(), bias.float(), 1e-6)
    rounding = (exact.to(dtype).float() - exact).abs().max()
    kernel = (F.layer_norm(x, (768,), weight, bias, 1e-6).float() - exact).abs().max()
    mean = x.mean(-1, keepdim=True)
    half_stats = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + 1e-6)
    naive = ((half_stats * weight + bias).float() - exact).abs().max()
    assert kernel <= 1.5 * rounding < naive

    q, k, v = (torch.randn(2, 4, 197, 64, generator=generator).to(device, dtype) for _ in range(3))
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rounding = (exact.to(dtype).float() - exact).abs().max()
    kernel = (F.scaled_dot_product_attention(q, k, v).float() - exact).abs().max()
    half_softmax = torch.softmax((q @ k.transpose(-2, -1)) * 64**-0.5, dim=-1) @ v
    assert kernel <= 1.5 * rounding < (half_softmax.float() - exact).abs().max()


# ------------------------------------------------------------------ devices asked for
def test_weights_and_pixels_go_to_the_device_asked_for(family_folders: dict[str, Path]) -> None:
    model = vit_core.load(family_folders["vit"], device=torch.device("cpu"))
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert backend.placement(model) == (torch.device("cpu"), torch.float32)
    pixels = np.zeros((1, 3, 8, 8), np.float32)
    assert backend.as_input(model, pixels).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        half = vit_core.load(family_folders["vit"], device="cpu", dtype=torch.bfloat16)
    assert backend.as_input(half, pixels).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("device", "message"),
    [
        pytest.param(
            "cuda",
            r"device='cuda': torch sees no CUDA GPU .*; available here: cpu",
            marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA"),
        ),
        pytest.param(
            "cuda:3",
            r"device='cuda:3': torch sees (no CUDA GPU|\d cuda devices? here)",
            marks=pytest.mark.skipif(torch.cuda.device_count() > 3, reason="4 GPUs here"),
        ),
        pytest.param(
            "mps",
            r"device='mps': MPS needs macOS on Apple silicon",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS here"),
        ),
        ("gpu", r"device='gpu' is not a torch device \(torch calls NVIDIA GPUs 'cuda'\)"),
        ("tpu0", r"device='tpu0' is not a torch device; torch takes 'cpu', 'cuda'"),
        ("cpu:1", r"device='cpu:1': torch sees 1 cpu device here \(cpu"),
    ],
)
def test_a_device_that_is_not_here_is_refused_naming_those_that_are(
    device: str, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        backend.resolve_device(device, None)


def test_int8_refuses_a_device_other_than_the_cpu() -> None:
    with pytest.raises(InputError, match=r"quantize='int8' runs .* CPU code; .*device='cuda:0'"):
        backend.check_options(None, torch.device("cuda:0"), quantize="int8")


def test_an_unknown_dtype_is_refused_before_any_tensor_is_read() -> None:
    with pytest.raises(InputError, match=r"dtype='int8' is not a floating-point torch dtype"):
        backend.resolve_device(None, "int8")
    assert backend.torch_dtype(np.float16) is torch.float16  # numpy's names work too
    assert backend.torch_dtype("torch.bfloat16") is torch.bfloat16
