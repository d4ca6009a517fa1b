"""Stochastic depth in both twins (once per `backend`): `drop_path_rate` sets timm's linear
per-block schedule, each residual branch (after its layer scale) is dropped per sample at
its block's rate and kept ones are scaled by 1 / (1 - rate), and nothing of it acts in
inference or at rate 0.

Each twin's forward is traced block by block (`Twin.drop_path_traces`: the input and output
of every block and of each of its two drop paths) in training mode on a batch of many
samples, so the statistics are read from the blocks themselves. Each twin's schedule is the
config's one (`ViTConfig.drop_path_rates`, so the twins' are equal) and timm's.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from twin_adapters import BlockTrace, Twin
from vit_test_support import tiny_config

# Four blocks at rates 0, 0.2, 0.4, 0.6; LayerScale on, so each drop path follows one.
CONFIG = tiny_config(num_hidden_layers=4, layerscale_value=0.3, drop_path_rate=0.6)
SAMPLES = 4000
SIGMAS = 4.5  # the binomial bound: a fraction within 4.5 standard deviations of its rate


def pixels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


def within_binomial_bound(count: int, samples: int, p: float) -> bool:
    return abs(count / samples - p) <= SIGMAS * math.sqrt(p * (1 - p) / samples)


@pytest.fixture
def traces(backend: Twin) -> list[BlockTrace]:
    return backend.drop_path_traces(backend.build(CONFIG, seed=1), pixels(SAMPLES), draw=5)


def test_each_branch_drops_whole_samples_at_its_blocks_rate(traces: list[BlockTrace]) -> None:
    assert len(traces) == CONFIG.num_hidden_layers
    for block, (trace, rate) in enumerate(zip(traces, CONFIG.drop_path_rates, strict=True)):
        dropped = []
        for branch, (_, before, after) in zip(("attention", "mlp"), trace.branches, strict=True):
            where = f"block {block} {branch}"
            zero = np.all(after == 0, axis=(1, 2))
            dropped.append(zero)
            # per sample: all of the branch or none of it, the kept ones scaled by 1 / (1 - rate)
            np.testing.assert_allclose(after[~zero], before[~zero] / (1 - rate), rtol=1e-6)
            assert np.all(before[zero] != 0), where  # zeroed by the drop, not by the branch
            assert within_binomial_bound(int(zero.sum()), SAMPLES, rate), (where, zero.mean())
        # the two branches draw their own masks: both go together at rate squared
        both = int((dropped[0] & dropped[1]).sum())
        assert within_binomial_bound(both, SAMPLES, rate**2), (block, both / SAMPLES)


def test_the_branches_are_what_each_block_adds_to_its_input(traces: list[BlockTrace]) -> None:
    """x + drop_path(attention branch) + drop_path(MLP branch): the drop paths sit on the
    residual branches, never on the residual stream itself."""
    for trace in traces:
        (_, _, attention), (_, _, mlp) = trace.branches
        np.testing.assert_allclose(trace.output, trace.input + attention + mlp, atol=1e-6)


def test_the_schedule_is_the_configs_linear_one_and_timms(
    backend: Twin, traces: list[BlockTrace]
) -> None:
    """Each twin's rates are `ViTConfig.drop_path_rates` exactly (so the twins' are equal),
    and timm's `VisionTransformer(drop_path_rate=...)`'s, which it draws with float32
    `torch.linspace`, to float32 rounding."""
    from timm.models.vision_transformer import VisionTransformer

    rates = [[rate for rate, _, _ in trace.branches] for trace in traces]
    assert rates == [[rate, rate] for rate in CONFIG.drop_path_rates], backend.name
    assert CONFIG.drop_path_rates == pytest.approx((0.0, 0.2, 0.4, 0.6), abs=1e-15)
    timm_model = VisionTransformer(
        img_size=8,
        patch_size=4,
        embed_dim=16,
        depth=CONFIG.num_hidden_layers,
        num_heads=2,
        drop_path_rate=CONFIG.drop_path_rate,
    )
    # timm leaves a rate-0 branch an nn.Identity
    timm_rates = [
        [getattr(getattr(block, name), "drop_prob", 0.0) for name in ("drop_path1", "drop_path2")]
        for block in timm_model.blocks
    ]
    assert np.allclose(rates, timm_rates, rtol=1e-6, atol=0), (rates, timm_rates)


def test_inference_and_rate_zero_are_untouched(backend: Twin) -> None:
    """Eval outputs are the same at any rate; at rate 0 training computes the inference
    function (no rng needed); above 0 training draws, and the draw decides."""
    dropping = dataclasses.replace(CONFIG, num_hidden_layers=2)  # rates 0 and 0.6
    base = backend.build(dataclasses.replace(dropping, drop_path_rate=0.0), seed=2)
    batch = pixels(8, seed=3)
    reference = backend.run(base, batch).logits
    np.testing.assert_array_equal(backend.run(base, batch, train=True).logits, reference)
    model = backend.with_config(base, dropping)
    np.testing.assert_array_equal(backend.run(model, batch).logits, reference)
    first = backend.run(model, batch, train=True, draw=0).logits
    assert not np.array_equal(first, reference)
    np.testing.assert_array_equal(backend.run(model, batch, train=True, draw=0).logits, first)
    assert not np.array_equal(backend.run(model, batch, train=True, draw=1).logits, first)
