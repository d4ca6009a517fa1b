"""`load(device=, dtype=)` and the command lines' `--device` / `--dtype`, for both backends:
a device this machine lacks is refused before any tensor is read, naming those it has;
half precision on a CPU warns; the commands print one `error:` line and exit 2.

What each twin does with its device is tested beside it (tests/vit_torch/test_devices.py,
tests/vit_flax/test_devices.py); on a GPU, tests/parity/test_gpu.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from PIL import Image

import vit_core
from vit_core.backend import BACKENDS, DTYPES, HALF_PRECISION
from vit_core.cli import HELDOUT, SHIPPED_MODEL, asset, build_parser, main, read_heldout
from vit_core.errors import InputError

# A device no machine has, per backend: the CPU is one device to torch; a CPU-only jax
# has one unless XLA is told otherwise.
ABSENT = {"torch": ("cpu:1", "torch sees 1 cpu device"), "flax": ("cpu:9", "jax has ")}
MODEL_COMMANDS = ("predict", "embed", "explain")


def _cuda_in_torch() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture
def unreadable_weights(tmp_path: Path) -> Path:
    """A folder whose config is good and whose weights file is not a safetensors file:
    an error about the device, not the file, shows the device was checked first."""
    with asset(SHIPPED_MODEL) as shipped:
        (tmp_path / "config.json").write_bytes((shipped / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    return tmp_path


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_device_is_refused_before_any_tensor_is_read(
    backend: str, unreadable_weights: Path
) -> None:
    device, message = ABSENT[backend]
    with pytest.raises(InputError, match=rf"device='{device}': {message}.*numbered from 0"):
        vit_core.load(unreadable_weights, backend=backend, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_PRECISION)
def test_half_precision_on_the_cpu_warns_that_it_is_slow(backend: str, dtype: str) -> None:
    with asset(SHIPPED_MODEL) as folder, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = vit_core.load(folder, backend=backend, dtype=dtype, device="cpu")
        vit_core.load(folder, backend=backend)  # float32: no warning
    assert model.config.num_labels == 10
    (warning,) = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert f"dtype='{dtype}' on the CPU" in str(warning.message)
    assert "is slow" in str(warning.message)
    assert warning.filename == __file__  # it points at the caller's load


def test_the_dtypes_offered_are_those_both_backends_run() -> None:
    assert DTYPES == ("float32", "bfloat16", "float16")


# -------------------------------------------------------------------- command lines
@pytest.fixture(scope="module")
def digit_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with asset(HELDOUT) as heldout:
        images, _ = read_heldout(heldout)
    path = tmp_path_factory.mktemp("digits") / "digit.png"
    Image.fromarray(images[0]).save(path)
    return path


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_command_that_runs_a_model_takes_device_and_dtype(command: str) -> None:
    extra = {"predict": ["x.png"], "embed": ["x.png", "-o", "e.npy"], "explain": ["x.png"]}
    args = build_parser().parse_args(
        [command, *extra[command], "--device", "cuda:1", "--dtype", "bfloat16"]
    )
    assert (args.device, args.dtype) == ("cuda:1", "bfloat16")
    default = build_parser().parse_args([command, *extra[command]])
    assert (default.device, default.dtype) == (None, None)


@pytest.mark.skipif(_cuda_in_torch(), reason="this machine has CUDA")
def test_predict_on_cuda_without_it_is_one_error_line(
    digit_png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", str(digit_png), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device='cuda': ") and err.count("\n") == 1, err
    assert "available here: cpu" in err


def test_embed_on_a_missing_jax_platform_is_one_error_line(
    digit_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("jax has an accelerator here")
    out = tmp_path / "e.npy"
    code = main(["embed", str(digit_png), "--backend", "flax", "--device", "tpu", "-o", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device='tpu': jax sees no TPU; available here: cpu:0")
    assert err.count("\n") == 1, err
    assert not out.exists()


def test_predict_in_bfloat16_on_the_cpu_warns_and_runs(
    digit_png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.warns(RuntimeWarning, match=r"dtype='bfloat16' on the CPU \(torch, .* is slow"):
        assert main(["predict", str(digit_png), "--dtype", "bfloat16", "--top-k", "1"]) == 0
    assert f"{digit_png}:\n  1." in capsys.readouterr().out


def test_an_unknown_dtype_is_a_usage_error(
    digit_png: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["predict", str(digit_png), "--dtype", "int8"])
    assert exited.value.code == 2
    assert "--dtype: invalid choice: 'int8'" in capsys.readouterr().err
