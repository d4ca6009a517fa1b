"""int8 inference, `load(..., quantize="int8" | "int8-static")`: what it replaces, what
it costs in accuracy on real data, and what it refuses."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
from vit_test_support import SHIPPED, TINY_DROPOUT_CONFIG, training_digits, write_folder

import vit_core
from vit_core.cli import HELDOUT, read_heldout
from vit_core.layout import ModelKind
from vit_torch.quantization import StaticInt8ViT

CALIBRATION_DIGITS = 360  # training digits, as many as there are held-out ones


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_heldout(SHIPPED.parent / HELDOUT)
    processor = vit_core.ViTImageProcessor.from_pretrained(SHIPPED)
    return processor(list(images), return_tensors="np")["pixel_values"], labels


def _logits(model: nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(pixels)).logits.numpy()


def test_encoder_linears_become_int8_and_the_head_stays_float() -> None:
    model = vit_core.load(SHIPPED, quantize="int8")
    encoder = model.vit.encoder
    assert all(type(m) is not nn.Linear for m in encoder.modules())
    assert sum(isinstance(m, Int8Linear) for m in encoder.modules()) == 4 * len(encoder.layers)
    assert type(model.classifier) is nn.Linear and not model.training


def test_int8_built_layer_by_layer_is_quantize_dynamic_exactly(
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    """The one-Linear-at-a-time build (no float copy kept) is torch's recipe, bit for bit."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    reference = vit_core.load(SHIPPED)
    plan = {nn.Linear: per_channel_dynamic_qconfig}
    quantize_dynamic(reference.vit.encoder, plan, dtype=torch.qint8, inplace=True)
    pixels = heldout[0][:16]
    ours = _logits(vit_core.load(SHIPPED, quantize="int8"), pixels)
    np.testing.assert_array_equal(ours, _logits(reference, pixels))


def _encoder_linear_weights(model: nn.Module) -> set[str]:
    """State-dict names of the float model's encoder Linear weights (what int8 replaces)."""
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if type(module) is nn.Linear and ".encoder." in f".{name}."
    }


def _float_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every float tensor a module holds: parameters, buffers, and the weights and biases
    inside int8 Linears' packed parameters."""
    tensors = [*module.parameters(), *module.buffers()]
    for sub in module.modules():
        if isinstance(sub, Int8Linear):
            weight, bias = sub._weight_bias()
            tensors += [weight] + ([bias] if bias is not None else [])
    return [t for t in tensors if t.is_floating_point()]


def test_an_int8_model_holds_no_float_copy_of_the_weights_it_replaced() -> None:
    """Structural: the int8 model's float tensors are only what stays float (embeddings,
    norms, biases, head), and each replaced float weight was handed back for release."""
    from vit_torch.quantization import quantize_encoder

    full = vit_core.load(SHIPPED)
    replaced = _encoder_linear_weights(full)
    kept = {k: v for k, v in full.state_dict().items() if k not in replaced}
    model = vit_core.load(SHIPPED, quantize="int8")
    float_bytes = sum(t.numel() * t.element_size() for t in _float_tensors(model))
    assert float_bytes == sum(v.numel() * v.element_size() for v in kept.values())
    released: list[str] = []
    quantize_encoder(vit_core.load(SHIPPED), release=released.append)
    assert sorted(released) == sorted(replaced)


def test_int8_agrees_with_float32_on_the_heldout_digits(
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    pixels, labels = heldout
    full = _logits(vit_core.load(SHIPPED), pixels)
    int8 = _logits(vit_core.load(SHIPPED, quantize="int8"), pixels)
    agreement = float(np.mean(full.argmax(1) == int8.argmax(1)))
    print(f"int8 vs float32, {len(labels)} held-out digits: top-1 agreement {agreement:.4f}, "
          f"max logit diff {np.abs(full - int8).max():.3g}")  # fmt: skip
    assert agreement >= 0.99
    assert np.mean(int8.argmax(1) == labels) >= np.mean(full.argmax(1) == labels) - 0.01
    assert np.abs(full - int8).max() < 0.25 * np.abs(full).max()


def test_int8_still_returns_attentions_and_hidden_states(
    heldout: tuple[np.ndarray, np.ndarray],
) -> None:
    model = vit_core.load(SHIPPED, quantize="int8")
    with torch.inference_mode():
        out = model(torch.from_numpy(heldout[0][:2]), output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(out.attentions[0].shape[:-1]))


def test_an_int8_model_is_not_saved_as_if_it_were_float(tmp_path: Path) -> None:
    model = vit_core.load(SHIPPED, quantize="int8")
    with pytest.raises(vit_core.ViTError, match="int8-quantized.*save the float32 model"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantize": "int4"}, "unknown quantize 'int4'"),
        ({"quantize": "int8", "backend": "flax"}, "runs on the torch backend"),
        ({"quantize": "int8", "dtype": "bfloat16"}, "cannot be combined with dtype"),
        ({"quantize": "int8-static"}, "needs calibration=: pixel values"),
        ({"quantize": "int8-static", "calibration": np.zeros((8, 8))}, r"shaped \(N, C, H, W\)"),
        ({"quantize": "int8-static", "calibration": np.zeros((2, 3, 9, 8))}, "calibration=: "),
        ({"quantize": "int8-static", "calibration": np.full((1, 3, 8, 8), np.nan)}, "NaN"),
        ({"quantize": "int8", "calibration": np.zeros((1, 3, 8, 8))}, "would be ignored"),
        ({"quantize": "int8-static", "backend": "flax"}, "runs on the torch backend"),
    ],
)
def test_quantize_refuses_what_it_cannot_do(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vit_core.load(SHIPPED, **kwargs)


# ------------------------------------------------------------------ int8-static
@pytest.fixture(scope="module")
def static_int8() -> StaticInt8ViT:
    calibration, _ = training_digits(CALIBRATION_DIGITS)
    return vit_core.load(SHIPPED, quantize="int8-static", calibration=calibration)


def test_int8_static_agrees_with_float32_on_the_heldout_digits(
    heldout: tuple[np.ndarray, np.ndarray], static_int8: StaticInt8ViT
) -> None:
    """Calibrated on training digits, scored on the held-out ones. This also guards the
    int16 saturation of u8 x s8 kernels on CPUs without VNNI (see `cpu_has_vnni`): with
    full-range activations this model's agreement drops to 98.1 % and logits move by 2.8."""
    pixels, labels = heldout
    full = _logits(vit_core.load(SHIPPED), pixels)
    int8 = _logits(static_int8, pixels)
    agreement = float(np.mean(full.argmax(1) == int8.argmax(1)))
    diff = float(np.abs(full - int8).max())
    print(f"int8-static vs float32, {len(labels)} held-out digits: top-1 agreement "
          f"{agreement:.4f}, max logit diff {diff:.3g}")  # fmt: skip
    assert agreement >= 0.99
    assert np.mean(int8.argmax(1) == labels) >= np.mean(full.argmax(1) == labels) - 0.01
    assert diff < 0.25 * np.abs(full).max()


def test_int8_static_quantizes_the_encoder_and_keeps_pooler_and_head_float(
    tmp_path: Path,
) -> None:
    """Inspected in the converted graph (nothing is compiled before the first call)."""
    config = dataclasses.replace(TINY_DROPOUT_CONFIG, classifier_uses_pooler=True)
    write_folder(tmp_path, config, ModelKind(classifier=True, pooler=True), seed=0)
    calibration = np.random.default_rng(0).standard_normal((4, 3, 8, 8), dtype=np.float32)
    model = vit_core.load(tmp_path, quantize="int8-static", calibration=calibration)
    float_weights, int8_weights = set(), set()
    for node in model.graph.graph.nodes:
        if node.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default):
            module = next(reversed(node.meta["nn_module_stack"].values()))[0]
            dequantized = "dequantize_per_channel" in str(node.args[1].target)
            (int8_weights if dequantized else float_weights).add(module.removeprefix("model."))
    assert float_weights == {"vit.pooler.dense", "classifier"}
    assert len(int8_weights) == 1 + 4 * config.num_hidden_layers  # patch conv + 4 per layer


def test_int8_static_holds_no_float_copy_and_folds_as_torchao_does(tmp_path: Path) -> None:
    """The converted graph keeps no float form of a weight it quantized, each one was
    handed back for release, and the graph (run eagerly, before any compile) is exactly
    torchao's own: calibrated by a plain call, folded by convert_pt2e."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from vit_torch.quantization import _Outputs, _x86_quantizer, quantize_static

    write_folder(tmp_path, TINY_DROPOUT_CONFIG, ModelKind(classifier=True, pooler=False), seed=0)
    calibration = np.random.default_rng(0).standard_normal((12, 3, 8, 8), dtype=np.float32)
    full = vit_core.load(tmp_path)
    released: list[str] = []
    model = quantize_static(vit_core.load(tmp_path), calibration, release=released.append)
    quantized = _encoder_linear_weights(full) | {"vit.embeddings.patch_embeddings.weight"}
    assert quantized <= set(released)
    names = {name.removeprefix("model.") for name, _ in model.graph.named_parameters()}
    names |= {name.removeprefix("model.") for name, _ in model.graph.named_buffers()}
    assert not names & quantized
    # its float matrices are the float model's unquantized ones (scales are vectors)
    held = [t for t in _float_tensors(model.graph) if t.ndim > 1]
    kept = [v for k, v in full.state_dict().items() if k not in quantized and v.ndim > 1]
    assert sorted(t.numel() for t in held) == sorted(v.numel() for v in kept)

    pixels = torch.from_numpy(calibration)
    example = torch.zeros((2, 3, 8, 8))
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        exported = torch.export.export(_Outputs(full), (example,), dynamic_shapes=({0: batch},))
        prepared = prepare_pt2e(exported.module(), _x86_quantizer())
        prepared(pixels[:8])
        prepared(pixels[8:])
        reference = convert_pt2e(prepared)
        torch.testing.assert_close(model.graph(pixels), reference(pixels), rtol=0, atol=0)


def test_int8_static_runs_any_batch_size_with_the_same_rows(
    heldout: tuple[np.ndarray, np.ndarray], static_int8: StaticInt8ViT
) -> None:
    """Activation scales are fixed, so an image's logits do not depend on its batch."""
    pixels = heldout[0][:8]
    whole = _logits(static_int8, pixels)
    for rows in (slice(0, 1), slice(3, 8)):
        np.testing.assert_allclose(_logits(static_int8, pixels[rows]), whole[rows], atol=1e-4)
    assert type(static_int8(torch.from_numpy(pixels), return_dict=False)[0]) is torch.Tensor


def test_int8_static_base_model_returns_hidden_state_and_pooler() -> None:
    calibration, _ = training_digits(16)
    model = vit_core.load(
        SHIPPED, model_type="base", quantize="int8-static", calibration=calibration
    )
    full = vit_core.load(SHIPPED, model_type="base")
    with torch.inference_mode():
        out, ref = model(torch.from_numpy(calibration)), full(torch.from_numpy(calibration))
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert (out.pooler_output is None) == (ref.pooler_output is None)
    scale = ref.last_hidden_state.abs().max()
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() < 0.25 * scale


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_attentions": True}, "computes only the final outputs"),
        ({"output_hidden_states": True}, "computes only the final outputs"),
    ],
)
def test_int8_static_refuses_outputs_its_graph_does_not_compute(
    static_int8: StaticInt8ViT, kwargs: dict[str, bool], message: str
) -> None:
    with pytest.raises(vit_core.ViTError, match=message):
        static_int8(torch.zeros(1, 3, 8, 8), **kwargs)


def test_int8_static_checks_the_input_shape_before_compiling(static_int8: StaticInt8ViT) -> None:
    with pytest.raises(vit_core.ViTError, match="does not match the model's 8x8"):
        static_int8(torch.zeros(1, 3, 16, 16))


def test_an_int8_static_model_is_not_saved(tmp_path: Path, static_int8: StaticInt8ViT) -> None:
    with pytest.raises(vit_core.ViTError, match="int8-static.*save the float32 model"):
        static_int8.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_int8_static_without_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantizer", None)
    with pytest.raises(vit_core.ViTError, match=r"needs torchao: pip install 'vit-twin\[int8\]'"):
        vit_core.load(SHIPPED, quantize="int8-static", calibration=np.zeros((1, 3, 8, 8)))


def test_int8_static_without_a_compiler_says_so_before_compiling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch._inductor import cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no g++ on PATH")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(vit_core.ViTError, match="found no C\\+\\+ compiler .no g\\+\\+ on PATH"):
        vit_core.load(SHIPPED, quantize="int8-static", calibration=np.zeros((1, 3, 8, 8)))
