"""Memory and speed of one training step, with and without gradient checkpointing: our twins
against timm's and transformers' training step on the same model.

    python benchmarks/training.py [--rounds 3] [--steps 2] [--out DIR]   # part of `make bench`
    python benchmarks/training.py --quick   # a 2-block Ti/16 at 32 px: checks the script only

A step is forward, backward and an AdamW update of ViT-B/16 at 384 px, batch 8, 1000
classes, float32 on the CPU. Every implementation builds the same architecture (ours and
transformers' from one random-weight folder, timm's `VisionTransformer` of the same sizes
with its own random weights: neither memory nor speed depends on the values). Gradient
checkpointing is each library's own switch: our `gradient_checkpointing_enable()` (torch:
non-reentrant `torch.utils.checkpoint`; Flax: a checkpointed `lax.scan` over the blocks), timm's
`set_grad_checkpointing()`, transformers' `gradient_checkpointing_enable()` (asked for
non-reentrant, like ours). transformers' Flax ViT has no checkpointing, so it has no row.

Memory: every run is a fresh process. Its model-only baseline is its RSS once the model,
the optimizer state (torch's AdamW makes it on a first step over zero gradients), the batch
and, for Flax, the compiled step are built, before any step; a warm-up step follows, the
peak RSS is reset (/proc/self/clear_refs: loading's transient peak is no part of it), and
the peak over the timed steps less the baseline is the step's own memory: the activations
kept for the backward pass (what checkpointing saves), the gradients (one model's worth,
given in the report) and the temporaries.

Speed: seconds per step, the median of a run's timed steps. Rounds are interleaved (each
round runs every row once, in a rotating order) and every ratio is paired by round, as in
benchmarks/run.py: the median of the per-round ratios, with their min and max.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from benchmarks.run import Ratio, machine, proc_status_mib, write_random_folder  # noqa: E402
from vit_core import ViTConfig  # noqa: E402
from vit_core.layout import ModelKind, expected_shapes  # noqa: E402

LR = 1e-4
Step = Callable[[], None]


@dataclass(frozen=True)
class Case:
    """The model a report measures: `benchmarks.run.config_for(model, size, **fields)`."""

    model: str
    size: int
    batch: int
    fields: dict[str, Any] = field(default_factory=dict)


CASE = Case("B/16", 384, 8)
QUICK_CASE = Case("Ti/16", 32, 2, {"num_hidden_layers": 2})


# ----------------------------------------------------------------- training steps
def random_batch(config: ViTConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (batch, config.num_channels, *config.image_hw)
    return rng.standard_normal(shape, dtype=np.float32), rng.integers(0, config.num_labels, batch)


def torch_step(model: Any, loss: Callable[[Any], Any]) -> Step:
    """One AdamW step of a torch `model` in training mode, `loss(model)` its loss.

    AdamW makes its state on its first step: here, on zero gradients, so that the
    baseline holds it (as it holds Flax's, which `optax` makes up front)."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        loss(model).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _ours_torch(folder: Path, batch: int, checkpointing: bool) -> Step:
    import torch

    import vit_core

    model = vit_core.load(folder, backend="torch")
    if checkpointing:
        model.gradient_checkpointing_enable()
    pixels, labels = map(torch.from_numpy, random_batch(model.config, batch))
    return torch_step(model, lambda m: m(pixels, labels=labels).loss)


def _timm(folder: Path, batch: int, checkpointing: bool) -> Step:
    import torch
    import torch.nn.functional as F
    from timm.models.vision_transformer import VisionTransformer

    config = ViTConfig.from_json_file(folder / "config.json")
    model = VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        num_classes=config.num_labels,
    )
    model.set_grad_checkpointing(checkpointing)
    pixels, labels = map(torch.from_numpy, random_batch(config, batch))
    return torch_step(model, lambda m: F.cross_entropy(m(pixels), labels))


def _hf_torch(folder: Path, batch: int, checkpointing: bool) -> Step:
    import torch
    import transformers

    model = transformers.ViTForImageClassification.from_pretrained(
        folder, attn_implementation="sdpa"
    )
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = ViTConfig.from_json_file(folder / "config.json")
    pixels, labels = map(torch.from_numpy, random_batch(config, batch))
    return torch_step(model, lambda m: m(pixel_values=pixels, labels=labels).loss)


def _ours_flax(folder: Path, batch: int, checkpointing: bool) -> Step:
    import jax
    import optax

    import vit_core

    model = vit_core.load(folder, backend="flax")
    if checkpointing:
        model.gradient_checkpointing_enable()
    pixels, labels = map(jax.device_put, random_batch(model.config, batch))
    optimizer = optax.adamw(LR)
    # One copy of the params: the step donates its inputs, as a training loop does.
    params, model.params = jax.device_put(model.params), None
    state = [params, optimizer.init(params)]

    def update(params: Any, opt_state: Any, pixels: Any, labels: Any) -> tuple[Any, Any]:
        def loss(p: Any) -> Any:
            return model(pixels, labels=labels, params=p, train=True).loss

        updates, opt_state = optimizer.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # Compiled before the baseline is read: the compiled step stays resident between steps,
    # like the model, and its compilation's own memory is no part of a step's.
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(*state, pixels, labels).compile()
    jax.block_until_ready(state)

    def step() -> None:
        state[:] = compiled(*state, pixels, labels)
        jax.block_until_ready(state)

    return step


# Each implementation's training step: (folder, batch, checkpointing) -> step, made in the
# process that measures it.
TRAINERS: dict[str, Callable[[Path, int, bool], Step]] = {
    "ours-torch": _ours_torch,
    "ours-flax": _ours_flax,
    "timm": _timm,
    "hf-torch": _hf_torch,
}
PEERS = ("timm", "hf-torch")
RUNS = tuple((impl, checkpointing) for impl in TRAINERS for checkpointing in (False, True))


def reset_peak_rss() -> None:
    """Start the peak-RSS count (VmHWM) again from the RSS now (Linux's clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_run(impl: str, checkpointing: bool, folder: Path, batch: int, steps: int) -> dict:
    """One run in this process: the baseline, a warm-up step, then `steps` timed ones."""
    step = TRAINERS[impl](folder, batch, checkpointing)
    gc.collect()
    baseline = proc_status_mib("VmRSS")
    step()
    reset_peak_rss()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return {"baseline_mib": baseline, "peak_mib": proc_status_mib("VmHWM"), "seconds": seconds}


def measure_in_subprocess(
    impl: str, checkpointing: bool, folder: Path, batch: int, steps: int
) -> dict[str, Any]:
    """`measure_run` in a fresh interpreter, so that no other run's memory is in its peak."""
    command = [sys.executable, __file__, "--run", impl, "--folder", str(folder)]
    command += ["--batch", str(batch), "--steps", str(steps)]
    command += ["--checkpointing"] if checkpointing else []
    done = subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------------ results
@dataclass
class Row:
    """One implementation with checkpointing on or off: one entry per round in each list."""

    impl: str
    checkpointing: bool
    seconds: list[float] = field(default_factory=list)  # the median step of that round
    baseline_mib: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)

    @property
    def step_mib(self) -> list[float]:
        """Per round: the peak RSS of the timed steps above the model-only baseline."""
        return [p - b for p, b in zip(self.peak_mib, self.baseline_mib, strict=True)]

    def add(self, run: dict[str, Any]) -> None:
        self.seconds.append(statistics.median(run["seconds"]))
        self.baseline_mib.append(run["baseline_mib"])
        self.peak_mib.append(run["peak_mib"])


def measure(case: Case, rounds: int, steps: int) -> dict[str, Any]:
    rows = {run: Row(*run) for run in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        config = write_random_folder(case.model, Path(tmp), case.size, **case.fields)
        for r in range(rounds):
            for impl, checkpointing in RUNS[r % len(RUNS) :] + RUNS[: r % len(RUNS)]:
                run = measure_in_subprocess(impl, checkpointing, Path(tmp), case.batch, steps)
                rows[impl, checkpointing].add(run)
                print(
                    f"  round {r + 1} {impl:10s} checkpointing {'on ' if checkpointing else 'off'}"
                    f" {statistics.median(run['seconds']):7.2f} s/step, "
                    f"{run['peak_mib'] - run['baseline_mib']:7.0f} MiB above the baseline",
                    flush=True,
                )
    kind = ModelKind(classifier=True, pooler=config.classifier_uses_pooler)
    parameters = sum(int(np.prod(shape)) for shape in expected_shapes(config, kind).values())
    return {
        "machine": machine(),
        "case": asdict(case),
        "params_mib": 4 * parameters / 2**20,
        "rounds": rounds,
        "steps": steps,
        "rows": [asdict(row) for row in rows.values()],
    }


def render(payload: dict[str, Any]) -> str:
    """The report: one line per implementation and setting, every ratio paired by round."""
    rows = {(r["impl"], r["checkpointing"]): Row(**r) for r in payload["rows"]}
    case, m = payload["case"], payload["machine"]
    lines = [
        f"One training step (forward, backward, AdamW) of {case['model']} at {case['size']} px, "
        f"batch {case['batch']}, float32 on {m['cpu']}, {m['threads']} torch threads, torch "
        f"{m['torch']}, jax {m['jax']}; {payload['rounds']} rounds of {payload['steps']} timed "
        f"steps, each run a fresh process. Step memory: peak RSS of the steps above the "
        f"model-only baseline (activations, gradients of {payload['params_mib']:.0f} MiB, "
        "temporaries). A ratio is the median of the per-round ratios (min-max); > 1: the row "
        'needs less (memory) or is faster (speed); "x without": against the same '
        "implementation without checkpointing.",
        "",
        "| impl | checkpointing | s/step | baseline MiB | step memory MiB | memory x without "
        "| speed x without | " + " | ".join(f"speed x {p} | memory x {p}" for p in PEERS) + " |",
        "|---|---|---|---|---|---|---|" + "---|---|" * len(PEERS),
    ]
    for (impl, checkpointing), row in rows.items():
        cells = [
            impl,
            "on" if checkpointing else "off",
            f"{statistics.median(row.seconds):.2f}",
            f"{statistics.median(row.baseline_mib):.0f}",
            f"{statistics.median(row.step_mib):.0f}",
        ]
        without = rows[impl, False]
        cells += (
            [
                str(Ratio.of(row.step_mib, without.step_mib)),
                str(Ratio.of(row.seconds, without.seconds)),
            ]
            if checkpointing
            else ["", ""]
        )
        for peer in (rows[p, checkpointing] for p in PEERS):
            same = peer.impl == impl
            cells += [
                "" if same else str(Ratio.of(row.seconds, peer.seconds)),
                "" if same else str(Ratio.of(row.step_mib, peer.step_mib)),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model, 1 round of 1 step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--out", type=Path, default=None, help="write training.json and .md")
    # one run in this process (how `measure` runs each in a fresh interpreter)
    parser.add_argument("--run", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run is not None:
        run = measure_run(args.run, args.checkpointing, args.folder, args.batch, args.steps)
        print(json.dumps(run))
        return 0
    if args.quick:
        payload = measure(QUICK_CASE, rounds=1, steps=1)
    else:
        payload = measure(CASE, args.rounds, args.steps)
    report = render(payload)
    print(report)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "training.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "training.md").write_text(report + "\n")
        print(f"wrote {args.out}/training.json, training.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
