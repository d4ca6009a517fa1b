"""Both twins on a CUDA GPU (`pytest -m gpu`; skipped where torch sees no GPU).

- torch on the GPU against torch on the CPU, and against Flax on the GPU, in float32 with
  TF32 off on both sides (torch's matmul and cuDNN flags; jax's matmul precision
  "highest"): within FLOAT32_ATOL. Kernels differ (cuBLAS, cuDNN, XLA's GPU fusions), so
  the bound is 1e-4, not the CPU's 1e-5.
- torch against Flax on the GPU in bfloat16: within BF16_RTOL of each output's scale, the
  bound docs/numerics.md states for bfloat16 on the CPU (16 roundings of bfloat16).

Every case also runs at another input size, resampling the position table at run time:
its matrices once stayed on the CPU and failed on CUDA. The Flax side needs a CUDA build
of jax (`pip install 'jax[cuda12]'`); without one those tests skip, saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from vit_test_support import FAMILIES, record_max_diff, tiny_config, write_folder

import vit_core
from vit_core.backend import get_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)"),
]

FLOAT32_ATOL = 1e-4
BF16_RTOL = 2.0**-3  # docs/numerics.md, "bfloat16 parity"
CHECKED = ("vit", "deit-distilled", "dinov2-registers", "siglip-map", "gap-fc-norm")
SIZES = ((32, 32), (48, 64))  # the config's, and one resampled at run time
FLAGS = {"output_hidden_states": True, "output_attentions": True}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-weight folder per family: 64 wide, 4 heads, 32 px in patches of 8."""
    root = tmp_path_factory.mktemp("gpu")
    found = {}
    for seed, family in enumerate(CHECKED):
        fields, kind = FAMILIES[family]
        config = tiny_config(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            **fields,
        )
        found[family] = root / family
        found[family].mkdir()
        write_folder(found[family], config, kind, seed)
    return found


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """float32 matmuls and convolutions in full float32 on the GPU, in both frameworks."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def jax_gpu() -> Any:
    """jax's first GPU, or a skip saying why there is none."""
    import jax

    try:
        return jax.local_devices(backend="gpu")[0]
    except RuntimeError:
        pytest.skip("jax has no CUDA here (a CPU-only jaxlib): pip install 'jax[cuda12]'")


def outputs(backend: str, folder: Path, size: tuple[int, int], **load: Any) -> dict[str, Any]:
    """Every output of `folder` on seeded pixels of `size`, through the backend's `run`."""
    pixels = np.random.default_rng(0).standard_normal((4, 3, *size)).astype(np.float32)
    model = vit_core.load(folder, backend=backend, **load)
    return get_backend(backend).run(model, pixels, interpolate_pos_encoding=True, **FLAGS)


def tensors(value: Any) -> tuple[Any, ...]:
    """An output's tensors: itself, or each of a tuple's (hidden states, attentions)."""
    return value if isinstance(value, tuple) else (value,)


def largest(got: dict[str, Any], want: dict[str, Any], relative: bool) -> float:
    """The largest difference over every output (as a share of its scale if `relative`)."""
    assert got.keys() == want.keys()
    worst = 0.0
    for name, expected in want.items():
        for e, a in zip(tensors(expected), tensors(got[name]), strict=True):
            assert a.shape == e.shape and np.isfinite(a).all(), name
            scale = max(1.0, float(np.abs(e).max())) if relative else 1.0
            worst = max(worst, float(np.abs(a - e).max()) / scale)
    return worst


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", CHECKED)
def test_torch_on_cuda_gives_the_cpus_numbers_in_float32(
    family: str, size: tuple[int, int], folders: dict[str, Path]
) -> None:
    cpu = outputs("torch", folders[family], size)
    cuda = outputs("torch", folders[family], size, device="cuda")
    diff = largest(cuda, cpu, relative=False)
    record_max_diff("torch cuda vs cpu, float32, TF32 off (bound 1e-4)", diff)
    assert diff <= FLOAT32_ATOL, f"{family} at {size}: {diff:.3g}"


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", CHECKED)
def test_the_twins_agree_on_the_gpu_in_float32(
    family: str, size: tuple[int, int], folders: dict[str, Path]
) -> None:
    import jax

    device = jax_gpu()
    with jax.default_matmul_precision("highest"):  # jax's GPU default is TF32-like passes
        flax = outputs("flax", folders[family], size, device=device)
    torch_out = outputs("torch", folders[family], size, device="cuda")
    diff = largest(flax, torch_out, relative=False)
    record_max_diff("twins on cuda, float32, TF32 off (bound 1e-4)", diff)
    assert diff <= FLOAT32_ATOL, f"{family} at {size}: {diff:.3g}"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", CHECKED)
def test_the_twins_agree_on_the_gpu_in_bfloat16(
    family: str, size: tuple[int, int], folders: dict[str, Path]
) -> None:
    device = jax_gpu()
    flax = outputs("flax", folders[family], size, device=device, dtype="bfloat16")
    torch_out = outputs("torch", folders[family], size, device="cuda", dtype="bfloat16")
    share = largest(flax, torch_out, relative=True)
    record_max_diff("twins on cuda, bfloat16, share of scale (bound 2^-3)", share)
    assert share <= BF16_RTOL, f"{family} at {size}: {share:.3g} of scale"


def test_a_cuda_model_keeps_its_outputs_on_the_gpu(folders: dict[str, Path]) -> None:
    model = vit_core.load(folders["dinov2-registers"], device="cuda", dtype="bfloat16")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    pixels = torch.randn(2, 3, 48, 64, device="cuda")
    with torch.inference_mode():
        out = model(pixels, interpolate_pos_encoding=True, **FLAGS)
        taken = model.forward_intermediates(
            pixels, intermediates_only=True, interpolate_pos_encoding=True
        )
    made = [t for value in [*out.to_tuple(), *taken] for t in tensors(value)]
    assert {(t.device.type, t.dtype) for t in made} == {("cuda", torch.bfloat16)}
