"""The Flax twin on the device asked for: params committed there, pixels sent there, every
output made there, and the same numbers as on another device.

A second device comes from XLA itself (`--xla_force_host_platform_device_count=2`), which
must be set before jax starts, so those checks run in a subprocess (`CHILD`, which prints
what it found as JSON). In half precision Flax's LayerNorm takes its statistics in
float32 (flax's `force_float32_reductions`, on by default), as the torch kernels do:
measured here, not assumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vit_test_support import FAMILIES, tiny_config, write_folder

from vit_core.errors import InputError
from vit_flax import backend
from vit_flax.modeling import _layer_norm

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240  # seconds; the child compiles a few tiny models (~15 s on an idle 2-core machine)
CHECKED = ("deit-distilled", "siglip-map")  # prefix tokens and their split; the MAP head

CHILD = """
import json, sys
import jax, numpy as np
import vit_core
from vit_core.intermediates import BACKEND_OPTIONS
from vit_flax import backend

first, second = jax.devices()
report = {"devices": len(jax.devices())}
pixels = np.random.default_rng(0).standard_normal((3, 3, 12, 16)).astype(np.float32)
flags = {"output_attentions": True, "output_hidden_states": True, "interpolate_pos_encoding": True}

def where(tree):
    return sorted({str(d) for leaf in jax.tree_util.tree_leaves(tree) for d in leaf.devices()})

def largest_difference(a, b):
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in pairs)

for folder in sys.argv[1:]:
    row = report[folder] = {}
    pinned = vit_core.load(folder, backend="flax", device="cpu:1")
    on_first = vit_core.load(folder, backend="flax", device="cpu")
    default = vit_core.load(folder, backend="flax")
    row["params"] = where(pinned.params)
    row["params_by_object"] = where(vit_core.load(folder, backend="flax", device=second).params)
    row["params_first"] = where(on_first.params)
    row["committed"] = [backend.committed_device(m.params) is not None for m in (pinned, default)]
    placed = backend.as_input(pinned, pixels)
    row["placed_pixels"] = where(placed)
    row["outputs"] = where(pinned(placed, **flags))
    options = {**BACKEND_OPTIONS, "norm": True, "interpolate_pos_encoding": True}
    row["intermediates"] = where(pinned.forward_intermediates(placed, [0, -1], **options))
    row["max_diff"] = largest_difference(
        backend.run(pinned, pixels, **flags), backend.run(on_first, pixels, **flags)
    )
    row["intermediates_diff"] = largest_difference(
        *(backend.intermediates(m, pixels, [0, -1], True, True) for m in (pinned, on_first))
    )
    if folder != sys.argv[1]:
        continue  # predict's runners: one family is enough
    runner, how = backend.batch_runner(pinned, 1)
    shared, shared_how = backend.batch_runner(default, 1)
    report["runners"] = [how, shared_how]
    plain = pixels[..., :8, :8]  # predict's size: the model's; 3 images, padded to 4
    report["runner_diff"] = largest_difference(runner(plain), shared(plain))
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """What the child found, per family folder, with two CPU devices."""
    root = tmp_path_factory.mktemp("flax-devices")
    folders = []
    for seed, family in enumerate(CHECKED):
        fields, kind = FAMILIES[family]
        folder = root / family
        folder.mkdir()
        write_folder(folder, tiny_config(**fields), kind, seed)
        folders.append(str(folder))
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *folders],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("devices") == 2
    runners = {name: report.pop(name) for name in ("runners", "runner_diff")}
    return {**{Path(folder).name: row for folder, row in report.items()}, "predict": runners}


@pytest.mark.parametrize("family", CHECKED)
def test_params_outputs_and_intermediates_live_on_the_device_asked_for(
    family: str, two_devices: dict[str, dict]
) -> None:
    row = two_devices[family]
    second = ["cpu:1"]
    assert row["params"] == row["params_by_object"] == row["placed_pixels"] == second
    assert row["outputs"] == row["intermediates"] == second
    assert row["params_first"] == ["cpu:0"]
    assert row["committed"] == [True, False]  # the default stays jax's to place


@pytest.mark.parametrize("family", CHECKED)
def test_the_second_device_gives_the_first_ones_numbers(
    family: str, two_devices: dict[str, dict]
) -> None:
    """The same XLA CPU code on either device: the same bits, every output."""
    row = two_devices[family]
    assert row["max_diff"] == row["intermediates_diff"] == 0.0


def test_predict_runs_a_pinned_model_on_its_device_and_shards_the_default(
    two_devices: dict[str, dict],
) -> None:
    """`predict`'s runner: a model loaded on a device alone there, the default over both
    devices (3 images, padded to 4): the same numbers."""
    how, shared = two_devices["predict"]["runners"]
    assert how.endswith("sharded over 1 cpu device")
    assert shared.endswith("sharded over 2 cpu devices")
    assert two_devices["predict"]["runner_diff"] == 0.0


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", r"device='gpu': jax sees no GPU .*; available here: cpu:0"),
        ("cuda:1", r"device='cuda:1': jax sees no GPU"),
        ("tpu", r"device='tpu': jax sees no TPU; available here: cpu:0"),
        ("mps", r"device='mps': not a jax platform \(cpu, gpu, cuda, rocm, tpu\)"),
        ("cpu:1", r"device='cpu:1': jax has 1 cpu device here \(cpu:0\), numbered from 0"),
        ("cpu:one", r"device='cpu:one': a device number follows the colon"),
        (7, r"device=7 is not a jax device; jax takes 'cpu', 'gpu'"),
    ],
)
def test_a_device_that_is_not_here_is_refused_naming_those_that_are(
    device: object, message: str
) -> None:
    if jax.default_backend() != "cpu" or len(jax.devices()) > 1:
        pytest.skip("the messages are those of a one-device CPU machine")
    with pytest.raises(InputError, match=message):
        backend.resolve_device(device, None)


def test_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(InputError, match=r"dtype='int8' is not a floating-point jax dtype"):
        backend.resolve_device(None, "int8")
    with pytest.raises(InputError, match=r"dtype='brain' is not a floating-point jax dtype"):
        backend.compute_dtype("brain")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
def test_layer_norm_takes_its_statistics_in_float32(dtype: type) -> None:
    """The twin's LayerNorm in half precision is as far from the float32 result as
    rounding it once is (statistics in half precision: ~3x as far, as torch's test shows)."""
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((4, 50, 768)) + 5).astype(np.float32)
    scale, bias = rng.standard_normal(768), rng.standard_normal(768)
    config = tiny_config(hidden_size=768, num_attention_heads=12, layer_norm_eps=1e-6)
    params = {"params": {"scale": jnp.asarray(scale, dtype), "bias": jnp.asarray(bias, dtype)}}
    half = jnp.asarray(x, dtype)
    exact = jnp.asarray(
        _layer_norm(config, jnp.float32, "norm").apply(
            jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params),
            half.astype(jnp.float32),
        )
    )
    out = jnp.asarray(_layer_norm(config, dtype, "norm").apply(params, half))
    assert out.dtype == dtype
    rounding = np.abs(np.asarray(exact.astype(dtype), np.float32) - exact).max()
    assert np.abs(np.asarray(out, np.float32) - exact).max() <= 1.5 * rounding
