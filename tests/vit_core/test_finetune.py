"""`python -m vit_core finetune` (vit_core.finetune, vit_core.imagefolder, each twin's
training.py): the recipe's parts against timm and optax, the run end to end in both
backends on real digits, an interrupted run resumed to the very same weights, and the bad
inputs, each refused with a message that names the file or flag.

The runs share `tests/conftest.py`'s `finetuned` (one run per backend of
`vit_test_support.FINETUNE_ARGS` on `digits_folder`: 48 training and 48 validation digits
of three classes, from the shipped model at 16x16).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from vit_test_support import run_finetune, tiny_config, write_folder

from vit_core import load
from vit_core.backend import BACKENDS, get_backend
from vit_core.errors import InputError
from vit_core.finetune import (
    CHECKPOINTS,
    OPTIMIZER_NAME,
    SUMMARY_NAME,
    Launch,
    ParamGroup,
    Processes,
    Recipe,
    get_training,
    learning_rates,
    parameter_groups,
)
from vit_core.imagefolder import Augmentation, epoch_order, image_rng, scan
from vit_core.layout import ModelKind

pytestmark = pytest.mark.usefixtures("torch_one_thread", "jax_compilation_cache")


# -------------------------------------------------------------------- schedule
@pytest.mark.parametrize(("total", "warmup"), [(40, 7), (12, 0), (5, 4)])
def test_learning_rates_are_timms_and_optaxs_warmup_cosine(total: int, warmup: int) -> None:
    import optax
    import torch
    from timm.scheduler import CosineLRScheduler

    peak = 3e-3
    rates = learning_rates(peak, total, warmup)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    timm = CosineLRScheduler(
        optimizer,
        t_initial=total - warmup,
        warmup_t=warmup,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        lr_min=0.0,
        t_in_epochs=False,
    )
    np.testing.assert_allclose(rates, [timm._get_lr(t)[0] for t in range(total)], atol=1e-12)
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total)
    optax_rates = [float(schedule(t)) for t in range(total)]  # computed in float32
    np.testing.assert_allclose(rates, optax_rates, rtol=0, atol=1e-6 * peak)
    assert rates.max() == pytest.approx(peak) and rates[warmup] == pytest.approx(peak)


def test_a_warmup_as_long_as_the_run_is_refused() -> None:
    with pytest.raises(InputError, match="4 warm-up steps leave none of the run's 4 steps"):
        learning_rates(1e-3, 4, 4)


# ---------------------------------------------------------------------- groups
TIMM_CASES = {  # timm name -> create_model overrides: cls token + registers, gap, distilled
    "vit-registers": ("vit_small_patch16_224", {"img_size": 32, "num_classes": 3, "reg_tokens": 2}),
    "gap-fc-norm": ("vit_base_patch16_reg4_gap_256", {"img_size": 32, "num_classes": 3}),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "num_classes": 3}),
}


@pytest.mark.parametrize("case", TIMM_CASES)
@pytest.mark.parametrize("layer_decay", [0.65, None])
def test_parameter_groups_are_timms(
    oracle: Any, tmp_path: Path, case: str, layer_decay: float | None
) -> None:
    """Every parameter's lr scale and weight decay as timm's `param_groups_layer_decay`
    (or `param_groups_weight_decay`) gives them for the same model, converted; timm's
    names are matched to the internal ones by the (perturbed, so unique) values."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
    from timm_models import HEADS, family_model, save

    from conversion import convert

    name, overrides = TIMM_CASES[case]
    timm_model = family_model(oracle, name, seed=3, **overrides)
    convert(
        save(timm_model, tmp_path / "timm.safetensors"),
        tmp_path / "out",
        overrides={"num_attention_heads": HEADS},
        progress=False,
    )
    model = load(tmp_path / "out", backend="torch")
    no_decay = timm_model.no_weight_decay()
    if layer_decay is None:
        timm_groups = param_groups_weight_decay(timm_model, 0.05, no_weight_decay_list=no_decay)
    else:
        timm_groups = param_groups_layer_decay(
            timm_model, 0.05, no_weight_decay_list=no_decay, layer_decay=layer_decay
        )
    expected = {
        id(p): ParamGroup(group.get("lr_scale", 1.0), group["weight_decay"])
        for group in timm_groups
        for p in group["params"]
    }
    ours = parameter_groups(
        {n: tuple(p.shape) for n, p in model.named_parameters()}, 0.05, layer_decay
    )
    timm_params = list(timm_model.parameters())
    for internal, p in model.named_parameters():
        (twin,) = [q for q in timm_params if q.shape == p.shape and bool((q == p).all())]
        assert ours[internal] == pytest.approx(expected[id(twin)]), internal
    assert len(ours) == len(timm_params)
    if layer_decay is not None:  # the head learns at the full rate, the stem the slowest
        assert ours["classifier.weight"].lr_scale == 1.0
        assert ours["vit.embeddings.patch_embeddings.weight"].lr_scale == min(
            g.lr_scale for g in ours.values()
        )


# -------------------------------------------------------------- data, transforms
def test_epoch_order_and_crops_are_drawn_from_the_seed() -> None:
    np.testing.assert_array_equal(epoch_order(50, 0, 3), epoch_order(50, 0, 3))
    assert not np.array_equal(epoch_order(50, 0, 3), epoch_order(50, 0, 4))
    assert sorted(epoch_order(50, 1, 0).tolist()) == list(range(50))
    augment = Augmentation(scale=(0.25, 1.0))
    boxes = [augment.crop_box(40, 30, image_rng(0, 0, i)) for i in range(200)]
    assert boxes == [augment.crop_box(40, 30, image_rng(0, 0, i)) for i in range(200)]
    for left, top, right, bottom in boxes:
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        assert 0.2 <= w * h / 1200 <= 1.0 and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
    # no crop of at least 90 % of a 100x10 strip has an aspect in [3/4, 4/3]: the central fallback
    wide = Augmentation(scale=(0.9, 1.0)).crop_box(100, 10, image_rng(0, 0, 0))
    assert wide == (43, 0, 56, 10)


# ------------------------------------------------------------------ end to end
@pytest.mark.parametrize("backend", BACKENDS)
def test_finetune_learns_real_digits(finetuned: Any, backend: str) -> None:
    """Loss down, validation top-1 far above chance; OUT is a model folder with the
    labels, the size and a processor; every epoch left a checkpoint that loads."""
    run = finetuned(backend)
    summary = json.loads((run.out / SUMMARY_NAME).read_text())
    history = summary["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"], history
    correct, total = history[-1]["val_top1"]
    assert total == 48 and correct / total > 0.8  # chance: 1/3
    assert (
        "epoch 3/3: loss" in run.stdout and f"val top-1 {100 * correct / total:.2f} %" in run.stdout
    )
    model = load(run.out, backend=backend)
    assert model.config.id2label == {0: "0", 1: "1", 2: "2"}
    assert model.config.image_hw == (16, 16)
    assert json.loads((run.out / "preprocessor_config.json").read_text())["size"] == {
        "height": 16,
        "width": 16,
    }
    epochs = sorted(p.name for p in (run.out / CHECKPOINTS).iterdir())
    assert epochs == ["epoch-001", "epoch-002", "epoch-003"]
    last = load(run.out / CHECKPOINTS / "epoch-003", backend=backend)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    twin = get_backend(backend)
    np.testing.assert_array_equal(
        twin.run(last, pixels)["logits"], twin.run(model, pixels)["logits"]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_interrupted_run_resumes_to_the_same_weights(
    finetuned: Any, digits_folder: Path, tmp_path: Path, monkeypatch: Any, backend: str
) -> None:
    """Stopped by a KeyboardInterrupt in epoch 2 (after epoch 1's checkpoint), resumed
    with --resume: the weights and AdamW's moments end bit for bit as the run that was
    never stopped (the schedule, data order and crops continue where they were)."""
    training: Any = get_training(backend)
    take_step = training.Trainer.step

    def interrupted(self: Any, pixels: Any, labels: Any, lr: float, step: int) -> float:
        if step == 4:  # epoch 2's second step
            raise KeyboardInterrupt
        return take_step(self, pixels, labels, lr, step)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(training.Trainer, "step", interrupted)
        stopped = run_finetune(digits_folder, out, "--backend", backend)
    assert stopped.code == 130
    assert "the last checkpoint is" in stopped.stderr and "--resume" in stopped.stderr
    assert sorted(p.name for p in (out / CHECKPOINTS).iterdir()) == ["epoch-001"]
    assert not (out / "model.safetensors").exists()
    resumed = run_finetune(digits_folder, out, "--backend", backend, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert "resuming after epoch 1 of 3" in resumed.stdout
    reference = finetuned(backend).out
    for name in ("model.safetensors", f"{CHECKPOINTS}/epoch-003/{OPTIMIZER_NAME}"):
        want, got = load_file(reference / name), load_file(out / name)
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
    history = json.loads((out / SUMMARY_NAME).read_text())["history"]
    expected = json.loads((reference / SUMMARY_NAME).read_text())["history"]
    assert [h["loss"] for h in history] == [h["loss"] for h in expected]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_is_drawn_from_seed_and_step_and_checkpointing_changes_nothing(
    backend: str,
) -> None:
    """Trainers of one model (drop path on) take the same step to the same weights, and
    with gradient checkpointing to the same weights too (the key biases aside,
    `vit_test_support.KEY_BIAS`); another step number draws other masks. "The same" to
    float32 rounding of the gradients, which AdamW's first step, lr * g / (|g| + eps),
    magnifies where a gradient is near 0 (the Flax twin's checkpointed blocks run in a
    loop, fused otherwise): within 1e-3 of the step's lr."""
    training = get_training(backend)
    config = tiny_config(num_labels=3)
    pixels = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    labels = np.arange(8) % 3
    lr = 1e-2
    after = []
    for step, checkpointing in ((5, False), (5, False), (6, False), (5, True)):
        recipe = Recipe(
            groups=lambda shapes: parameter_groups(shapes, 0.05, 0.8),
            label_smoothing=0.1,
            seed=0,
            drop_path_rate=0.5,
            grad_checkpointing=checkpointing,
        )
        model = get_backend(backend).build(config, ModelKind(True, False), _weights(config))
        trainer = training.trainer(model, recipe, Processes(0, 1, "one process"))
        trainer.step(pixels, labels, lr, step)
        after.append(trainer.weights())
    first, again, other, checkpointed = after
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)
    width = config.hidden_size
    for k in first:  # the key biases aside: vit_test_support.KEY_BIAS says why
        keep = np.ones(first[k].shape, bool)
        if k.endswith("attention.qkv.bias"):
            keep[width : 2 * width] = False
        np.testing.assert_allclose(
            checkpointed[k][keep], first[k][keep], rtol=0, atol=1e-3 * lr, err_msg=k
        )


def _weights(config: Any) -> dict[str, np.ndarray]:
    from vit_core.initialization import initial_weights

    return initial_weights(config, ModelKind(True, False), 0)


# ------------------------------------------------------------------ bad input
def _png(path: Path, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), 128, np.uint8)).save(path)


def test_layout_mistakes_are_refused_naming_the_folder(tmp_path: Path) -> None:
    _png(tmp_path / "one" / "a" / "x.png")
    with pytest.raises(InputError, match=r"only one class folder \(a\)"):
        scan(tmp_path / "one", 0.1, 0)
    (tmp_path / "one" / "b").mkdir()
    with pytest.raises(InputError, match=r"one/b: class folder without image files"):
        scan(tmp_path / "one", 0.1, 0)
    _png(tmp_path / "loose" / "x.png")
    with pytest.raises(InputError, match=r"loose: holds image files directly \(x.png\)"):
        scan(tmp_path / "loose", 0.1, 0)
    _png(tmp_path / "split" / "train" / "a" / "x.png")
    with pytest.raises(InputError, match="has train/ but not .*val; give both"):
        scan(tmp_path / "split", 0.1, 0)
    _png(tmp_path / "split" / "train" / "b" / "x.png")
    _png(tmp_path / "split" / "val" / "c" / "x.png")
    with pytest.raises(InputError, match=r"val: class folders c are not in .*train"):
        scan(tmp_path / "split", 0.1, 0)
    with pytest.raises(InputError, match="no such folder"):
        scan(tmp_path / "missing", 0.1, 0)


def test_a_pool_is_split_by_class_and_unreadable_images_are_left_out(tmp_path: Path) -> None:
    for label in "ab":
        for i in range(10):
            _png(tmp_path / label / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_text("not an image")
    data = scan(tmp_path, 0.2, 2)
    assert data.classes == ["a", "b"]
    assert [p.name for p, _ in data.skipped] == ["broken.png"]
    assert "not an image format PIL can read" in data.skipped[0][1]
    assert sorted(e.label for e in data.val) == [0, 0, 1, 1]  # 20 % of each class
    assert len(data.train) == 16
    assert "holding out 20 % of each class" in data.split
    assert data.fingerprint() == scan(tmp_path, 0.2, 0).fingerprint()


def test_unreadable_images_are_listed_and_counted(digits_folder: Path, tmp_path: Path) -> None:
    """Named on stderr one by one, then counted (here before a refusal: a batch larger
    than the data set, so no training runs)."""
    data = tmp_path / "data"
    shutil.copytree(digits_folder, data)
    (data / "train" / "1" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (data / "val" / "2" / "text.png").write_text("not an image")
    run = run_finetune(data, tmp_path / "out", "--batch-size", "1000")
    assert run.code == 2
    lines = run.stderr.splitlines()
    assert any(line.startswith("warning: skipped ") and "cut.png" in line for line in lines)
    assert any(line.startswith("warning: skipped ") and "text.png" in line for line in lines)
    assert "warning: skipped 2 unreadable image(s)" in lines
    assert "error: --batch-size 1000 is more than the 48 training images" in run.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_is_never_replaced_unasked(finetuned: Any, digits_folder: Path) -> None:
    out = finetuned("torch").out
    before = (out / "model.safetensors").read_bytes()
    run = run_finetune(digits_folder, out)
    assert run.code == 2 and "already exists; pass --resume" in run.stderr
    # --force, but the run cannot start (a bad setting): the old OUT is kept
    run = run_finetune(digits_folder, out, "--force", "--batch-size", "1000")
    assert run.code == 2 and (out / "model.safetensors").read_bytes() == before


def test_resume_refuses_another_model_or_settings(
    finetuned: Any, digits_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(finetuned("torch").out, out)
    run = run_finetune(digits_folder, out, "--resume", "--lr", "1e-3", "--seed", "1")
    assert run.code == 2
    assert f"{out}/{CHECKPOINTS}/epoch-003/trainer_state.json: --resume continues" in run.stderr
    assert "lr 0.002 -> 0.001" in run.stderr and "seed 0 -> 1" in run.stderr
    other = tmp_path / "other-model"
    other.mkdir()
    write_folder(other, tiny_config(image_size=16, patch_size=4), ModelKind(True, False), 0)
    run = run_finetune(digits_folder, out, "--resume", "--model", str(other))
    assert run.code == 2 and f"-> {other} (sha256" in run.stderr
    run = run_finetune(digits_folder, out, "--resume", "--backend", "flax")
    assert run.code == 2 and "backend 'torch' -> 'flax'" in run.stderr
    not_a_run = tmp_path / "not-a-run"
    _png(not_a_run / "x.png")
    run = run_finetune(digits_folder, not_a_run, "--resume")
    assert run.code == 2 and "holds no checkpoint to resume" in run.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--lr", "-1"), "lr must be a positive number; got -1.0"),
        (("--hflip", "2"), "hflip must be a probability in [0, 1]; got 2.0"),
        (("--warmup-steps", "9"), "9 warm-up steps leave none of the run's 9 steps"),
        (("--coordinator", "localhost:1234"), "start JAX processes; the torch backend"),
        (
            ("--backend", "flax", "--coordinator", "localhost:1234"),
            "JAX processes need all three of --coordinator, --num-processes",
        ),
    ],
)
def test_bad_settings_are_refused(
    digits_folder: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    run = run_finetune(digits_folder, tmp_path / "out", *args)
    assert run.code == 2 and message in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


def test_launch_reads_torchruns_environment() -> None:
    assert Launch.detect("torch", environ={"WORLD_SIZE": "4", "RANK": "2"}) == Launch(4, 2)
    assert Launch.detect("torch", environ={}) == Launch()
    assert Launch.detect("flax", "h:1", 2, 1, environ={}) == Launch(2, 1, "h:1")
    with pytest.raises(InputError, match="--process-id 2 is not in 0..1"):
        Launch.detect("flax", "h:1", 2, 2, environ={})
    with pytest.raises(InputError, match="does not read torchrun's environment"):
        Launch.detect("flax", environ={"WORLD_SIZE": "2", "RANK": "0"})
