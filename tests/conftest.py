"""Shared test helpers, offered as one fixture, `oracle` (see `_Oracle`).

`oracle.assert_close` records the largest difference seen per comparison; the table is
printed at the end of the run, so the margin under each bound stays on the record, and
`--parity-json FILE` writes it for the README's parity table (`make readme`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vit_test_support import MAX_DIFFS, FinetuneRun, load_script, record_max_diff, run_finetune

TOL = 1e-5


# Small transformers configs that together cover the axes (not their product).
CASES: dict[str, dict[str, Any]] = {
    "sq32-p8-qkvbias-gelu-eps1e-12": {
        "image_size": 32,
        "patch_size": 8,
        "qkv_bias": True,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
    },
    "32x48-p16-nobias-tanh-eps1e-6": {
        "image_size": (32, 48),
        "patch_size": 16,
        "qkv_bias": False,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    },
    "sq32-p16-nobias-gelu-eps1e-6": {
        "image_size": 32,
        "patch_size": 16,
        "qkv_bias": False,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    },
    "32x48-p8-qkvbias-tanh-eps1e-12": {
        "image_size": (32, 48),
        "patch_size": 8,
        "qkv_bias": True,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-12,
    },
}
# (head, case) pairs each twin's forward oracle test runs.
FORWARD = [
    ("classification", "sq32-p8-qkvbias-gelu-eps1e-12"),
    ("classification", "32x48-p16-nobias-tanh-eps1e-6"),
    ("classification", "sq32-p16-nobias-gelu-eps1e-6"),
    ("classification", "32x48-p8-qkvbias-tanh-eps1e-12"),
    ("pooler", "32x48-p8-qkvbias-tanh-eps1e-12"),
    ("pooler", "sq32-p16-nobias-gelu-eps1e-6"),
    ("base", "sq32-p8-qkvbias-gelu-eps1e-12"),
    ("base", "32x48-p16-nobias-tanh-eps1e-6"),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--parity-json",
        type=Path,
        metavar="FILE",
        help="write the largest max-abs difference per comparison to FILE (JSON)",
    )


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if MAX_DIFFS:
        terminalreporter.section(f"largest max-abs diff per comparison (bound {TOL:g})")
        for name, diff in sorted(MAX_DIFFS.items()):
            terminalreporter.write_line(f"{diff:10.3e}  {name}")
    target = config.getoption("parity_json")
    if target is not None:
        target.write_text(json.dumps(dict(sorted(MAX_DIFFS.items())), indent=1) + "\n")


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _perturb(rng: np.random.Generator, value: np.ndarray, fan_in: int | None, patch: bool) -> Any:
    """Add noise to one tensor so that activations stay near unit size.

    Vectors (biases, LayerNorm scales and shifts, class token, positions) get N(0, 0.1^2);
    matrices get std 1/sqrt(fan_in), the patch kernel a tenth of that: the first LayerNorm
    sees variance ~0.1, where an eps of 1e-6 instead of 1e-12 moves the first block by ~5e-5.
    """
    std = 0.1 if fan_in is None else (0.1 if patch else 1.0) / np.sqrt(fan_in)
    return (value + std * rng.standard_normal(value.shape)).astype(value.dtype)


class _Oracle:
    """transformers models as fixtures, perturbation, comparison."""

    TOL = TOL
    CASES = CASES

    def __init__(self, tmp_path: Path) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        self.tmp_path = tmp_path

    # --------------------------------------------------------------- comparison
    @staticmethod
    def assert_close(actual: Any, expected: Any, name: str, atol: float = TOL) -> float:
        a, e = to_numpy(actual), to_numpy(expected)
        assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
        diff = float(np.max(np.abs(a - e))) if a.size else 0.0
        record_max_diff(name, diff)
        assert diff <= atol, f"{name}: max abs diff {diff:.3e} > {atol:g}"
        return diff

    def assert_outputs_close(self, got: Any, want: Any, name: str) -> None:
        """Every field transformers returned: logits or last_hidden_state, pooler_output,
        each hidden state and each attention map."""
        for field in (
            "logits",
            "last_hidden_state",
            "pooler_output",
            "hidden_states",
            "attentions",
        ):
            if not hasattr(want, field):
                continue
            expected, actual = getattr(want, field), getattr(got, field, None)
            assert (actual is None) == (expected is None), f"{name}: {field} presence differs"
            if isinstance(expected, tuple):
                assert len(actual) == len(expected), f"{name}: {len(actual)} {field}"
                for a, e in zip(actual, expected, strict=True):
                    self.assert_close(a, e, f"{name}: {field}")
            elif expected is not None:
                self.assert_close(actual, expected, f"{name}: {field}")

    # -------------------------------------------------------------- perturbation
    @staticmethod
    def perturb_torch(module: Any, seed: int) -> Any:
        """Perturb every parameter of a torch module (Linear (out, in), Conv2d OIHW)."""
        import torch

        rng = np.random.default_rng(seed)
        with torch.no_grad():
            for _, p in sorted(module.named_parameters()):
                matrix = p.ndim in (2, 4)
                fan_in = int(np.prod(p.shape[1:])) if matrix else None
                p.copy_(torch.from_numpy(_perturb(rng, p.numpy(), fan_in, p.ndim == 4)))
        return module.eval()

    @staticmethod
    def perturb_flax(params: Any, seed: int) -> Any:
        """Perturb every leaf of a Flax params tree (Dense kernel (in, out), Conv HWIO)."""
        import jax.numpy as jnp
        from flax import traverse_util

        rng = np.random.default_rng(seed)
        flat = traverse_util.flatten_dict(params)
        out = {}
        for path, leaf in sorted(flat.items()):
            value = np.asarray(leaf)
            matrix = path[-1] == "kernel"
            fan_in = int(np.prod(value.shape[:-1])) if matrix else None
            out[path] = jnp.asarray(_perturb(rng, value, fan_in, value.ndim == 4))
        return traverse_util.unflatten_dict(out)

    @staticmethod
    def pixels(config: Any, seed: int = 0, size: tuple[int, int] | None = None) -> np.ndarray:
        """Unit-normal pixel values, batch 2, at the config's image size unless `size`."""
        image = config.image_size
        height, width = size or (image if isinstance(image, list | tuple) else (image, image))
        rng = np.random.default_rng(1000 + seed)
        return rng.standard_normal((2, config.num_channels, height, width)).astype(np.float32)

    # ------------------------------------------------------ transformers models
    @staticmethod
    def hf_class(head: str, flax: bool = False) -> Any:
        """head: "classification", "pooler" (ViTModel with pooler) or "base" (without)."""
        import transformers

        name = "ViTForImageClassification" if head == "classification" else "ViTModel"
        return getattr(transformers, f"Flax{name}" if flax else name)

    @staticmethod
    def hf_kwargs(head: str) -> dict[str, Any]:
        return {} if head == "classification" else {"add_pooling_layer": head == "pooler"}

    def make_hf(self, head: str, seed: int = 0, **config: Any) -> tuple[Any, Path]:
        """A seeded, perturbed transformers (PyTorch) model, and the folder it saved itself to."""
        import torch
        import transformers

        settings = {
            "hidden_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 3,
            "intermediate_size": 96,
            "num_labels": 5,
            **config,
        }
        torch.manual_seed(seed)
        model = self.hf_class(head)(transformers.ViTConfig(**settings), **self.hf_kwargs(head))
        self.perturb_torch(model, seed)
        folder = self.tmp_path / f"hf-{head}-{seed}"
        model.save_pretrained(folder)
        assert (folder / "model.safetensors").is_file()
        return model, folder

    def load_hf(self, folder: Path, head: str, flax: bool = False, **kwargs: Any) -> Any:
        """A transformers model from a folder; asserts no key was missing or left unused."""
        cls = self.hf_class(head, flax)
        if flax:
            return cls.from_pretrained(folder, from_pt=True, **self.hf_kwargs(head), **kwargs)
        model, info = cls.from_pretrained(
            folder, output_loading_info=True, **self.hf_kwargs(head), **kwargs
        )
        problems = {k: v for k, v in info.items() if v}
        assert not problems, f"transformers loading {folder}: {problems}"
        return model.eval()


@pytest.fixture
def oracle(tmp_path: Path) -> _Oracle:
    return _Oracle(tmp_path)


@pytest.fixture(params=FORWARD, ids=[f"{head}-{case}" for head, case in FORWARD])
def forward_case(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(head, case name) of one forward comparison against transformers."""
    return request.param


@pytest.fixture(scope="module")
def torch_one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on a busy CPU every op then waits
    for a descheduled worker (~8 ms an op on a loaded 2-core machine instead of ~10 us)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def jax_compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """JAX's persistent compilation cache in a folder of this session: a program that
    several tests compile anew (each fine-tuning run jits its own train step) is compiled
    once. The compiled code is the same; only the compile time is saved."""
    import jax

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    yield
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ImageFolder of real digits (scripts/digits_imagefolder.py): the classes
    0, 1, 2, 16 training and 16 validation 16x16 PNGs each."""
    out = tmp_path_factory.mktemp("digits") / "digits"
    load_script("digits_imagefolder").write_digits(out, 16, per_class=16, classes=(0, 1, 2))
    return out


@pytest.fixture(scope="session")
def finetuned(
    digits_folder: Path, tmp_path_factory: pytest.TempPathFactory, jax_compilation_cache: None
) -> Any:
    """`finetune` run once per backend on `digits_folder` (`FINETUNE_ARGS`), from the
    shipped model: backend -> the run (its OUT and what it printed)."""
    runs: dict[str, FinetuneRun] = {}

    def run(backend: str) -> FinetuneRun:
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"finetuned-{backend}") / "out"
            runs[backend] = run_finetune(digits_folder, out, "--backend", backend)
            assert runs[backend].code == 0, runs[backend].stderr
        return runs[backend]

    return run
