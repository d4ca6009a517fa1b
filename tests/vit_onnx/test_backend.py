"""The onnx backend as a user meets it: `vit_core.load(path, backend="onnx")`, `predict` and
`embed --backend onnx`, and every file or option it must refuse, clearly and without
touching anything.

Two exports are made once for the module from perturbed tiny folders: a classifier
(with a preprocessor that is not the default, so the one carried in the file can be told
from others) and an encoder with a pooling layer narrower than its width.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from vit_test_support import record_max_diff, tiny_config, write_folder, write_photos

import vit_core
from vit_core import CheckpointError, ConfigError, InputError, LayoutError
from vit_core.backend import get_backend
from vit_core.cli import main
from vit_core.config import CONFIG_NAME
from vit_core.layout import ONNX_NAME, ModelKind
from vit_core.outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from vit_core.processing import PROCESSOR_NAME, ViTImageProcessor, processor_for

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from vit_onnx.backend import OnnxViT, cores  # noqa: E402
from vit_torch.export import write_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TOL = 1e-5
CONFIG = {"hidden_size": 32, "intermediate_size": 64, "image_size": 32, "patch_size": 8}
PROCESSOR = ViTImageProcessor(
    size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]
)


def export_folder(folder: Path, fields: dict[str, Any], kind: ModelKind) -> Path:
    """A perturbed folder (with `PROCESSOR`), and `model.onnx` exported into it."""
    folder.mkdir()
    write_folder(folder, tiny_config(**CONFIG, **fields), kind, seed=7)
    PROCESSOR.save_pretrained(folder)
    model = vit_core.load(folder, backend="torch")
    metadata = {
        CONFIG_NAME: model.config.to_json_string(),
        PROCESSOR_NAME: processor_for(folder, model.config).to_json_string(),
    }
    write_onnx(model, folder / ONNX_NAME, model.config.image_hw, metadata)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    return {
        "classifier": export_folder(
            root / "classifier", {"num_labels": 4}, ModelKind(classifier=True, pooler=False)
        ),
        "encoder": export_folder(
            root / "encoder", {"pooler_output_size": 12}, ModelKind(classifier=False, pooler=True)
        ),
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    return write_photos(
        root,
        {"cat.png": ("chelsea", (40, 30)), "coffee.jpg": ("coffee", (48, 48))},
        {"broken.jpg": "cut"},
    )


def pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def assert_close(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    assert list(got) == list(want), what
    for name, value in want.items():
        diff = float(np.abs(np.asarray(got[name]) - value).max())
        record_max_diff(f"onnx backend vs torch twin, float32: {name}", diff)
        assert diff <= TOL, f"{what}: {name} differs by {diff}"


# ----------------------------------------------------------------- load
@pytest.mark.parametrize("case", ["classifier", "encoder"])
@pytest.mark.parametrize("given", ["file", "folder"])
def test_load_gives_the_twins_outputs(folders: dict[str, Path], case: str, given: str) -> None:
    folder = folders[case]
    model = vit_core.load(folder / ONNX_NAME if given == "file" else folder, backend="onnx")
    twin = vit_core.load(folder, backend="torch")
    assert isinstance(model, OnnxViT)
    assert model.config.to_dict() == twin.config.to_dict()
    assert model.kind == twin.kind
    x = pixels(3)
    record = model(x)
    assert isinstance(
        record, ImageClassifierOutput if case == "classifier" else BaseModelOutputWithPooling
    )
    assert_close(get_backend("onnx").run(model, x), get_backend("torch").run(twin, x), case)


def test_the_encoder_view_and_the_classifier_view_must_match_the_export(
    folders: dict[str, Path],
) -> None:
    with pytest.raises(LayoutError, match="an exported classifier computes logits only"):
        vit_core.load(folders["classifier"], backend="onnx", model_type="base")
    with pytest.raises(LayoutError, match="an exported encoder .* has no classifier head"):
        vit_core.load(folders["encoder"], backend="onnx", model_type="classification")
    assert vit_core.load(folders["encoder"], backend="onnx", model_type="base").kind.pooler


def test_the_session_runs_as_documented(folders: dict[str, Path]) -> None:
    """Optimisations on, one thread per core, no spinning, the CPU provider."""
    model = vit_core.load(folders["classifier"], backend="onnx")
    session = model.graph.session
    options = session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == cores()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session.get_providers()[0] == "CPUExecutionProvider"
    _, how = get_backend("onnx").batch_runner(model, 2)
    assert how.startswith(f"onnxruntime {ort.__version__} on CPUExecutionProvider")


def test_parameter_count_is_the_twins(folders: dict[str, Path]) -> None:
    for folder in folders.values():
        twin = vit_core.load(folder, backend="torch")
        model = vit_core.load(folder, backend="onnx")
        counts = (get_backend(b).parameter_count(m) for b, m in [("onnx", model), ("torch", twin)])
        assert len(set(counts)) == 1


def test_the_processor_carried_in_the_file_comes_first(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(folders["classifier"] / ONNX_NAME, moved / "vit.onnx")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(moved)  # not this one
    model = vit_core.load(moved / "vit.onnx", backend="onnx")
    assert model.processor == PROCESSOR


REFUSED = {
    "image_size": ({"image_size": 64}, InputError, "an exported graph is fixed"),
    "num_labels": ({"num_labels": 7}, InputError, "an exported graph is fixed"),
    "bfloat16": ({"dtype": "bfloat16"}, InputError, "computes in float32"),
    "int8": ({"quantize": "int8"}, InputError, "quantize='int8' runs on the torch backend"),
    "revision": ({"revision": "main"}, InputError, "an exported graph is a local file"),
    "tpu": ({"device": "tpu"}, InputError, "runs on 'cpu' or 'cuda'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_a_graph_cannot_do_is_refused_at_load(folders: dict[str, Path], case: str) -> None:
    options, error, message = REFUSED[case]
    with pytest.raises(error, match=message):
        vit_core.load(folders["classifier"], backend="onnx", **options)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is there"
)
def test_cuda_without_its_provider_says_what_to_install(folders: dict[str, Path]) -> None:
    with pytest.raises(InputError, match="has no CUDA provider .* install onnxruntime-gpu"):
        vit_core.load(folders["classifier"], backend="onnx", device="cuda")


def test_what_a_graph_cannot_compute_is_refused_at_run(folders: dict[str, Path]) -> None:
    model = vit_core.load(folders["encoder"], backend="onnx")
    backend = get_backend("onnx")
    with pytest.raises(InputError, match="output_attentions=True: an exported graph"):
        backend.run(model, pixels(1), output_attentions=True)
    with pytest.raises(InputError, match="interpolate_pos_encoding=True"):
        backend.run(model, pixels(1), interpolate_pos_encoding=True)
    with pytest.raises(InputError, match="computes its final outputs only, not the blocks'"):
        backend.intermediates(model, pixels(1), [0], norm=True)
    with pytest.raises(InputError, match="does not match the model's 32x32"):
        model(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(InputError, match="builds no model from a checkpoint"):
        backend.build(model.config, model.kind, {})


# ------------------------------------------------------------ bad files
def corrupt(file: Path, how: str) -> bytes:
    """Spoil an exported file in place; its new bytes."""
    data = file.read_bytes()
    spoilt = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "text": b"not an onnx model\n",
        "flipped": data[:64] + bytes(b ^ 0xFF for b in data[64:4096]) + data[4096:],
    }[how]
    file.write_bytes(spoilt)
    return spoilt


@pytest.mark.parametrize("how", ["truncated", "empty", "text", "flipped"])
def test_a_corrupt_file_is_named_and_left_alone(
    folders: dict[str, Path], tmp_path: Path, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "model.onnx"
    shutil.copy(folders["classifier"] / ONNX_NAME, file)
    spoilt = corrupt(file, how)
    with pytest.raises(CheckpointError, match=f"{file}: not a readable ONNX model"):
        vit_core.load(file, backend="onnx")
    image = tmp_path / "x.png"
    write_photos(tmp_path, {"x.png": ("coffee", (32, 32))})
    assert main(["predict", str(image), "--model", str(file), "--backend", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {file}: not a readable ONNX model") and err.count("\n") == 1
    assert file.read_bytes() == spoilt


def rewrite_metadata(source: Path, target: Path, change: dict[str, str | None]) -> Path:
    """`source` saved as `target` with metadata entries changed (None: removed)."""
    proto = onnx.load(str(source))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(change)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {k: v for k, v in props.items() if v is not None})
    onnx.save_model(proto, str(target))
    return target


METADATA = {
    "no-config": ({CONFIG_NAME: None}, CheckpointError, "no config.json in its metadata"),
    "bad-json": ({CONFIG_NAME: "{"}, ConfigError, "'config.json' is not valid JSON"),
    "bad-config": (
        {CONFIG_NAME: json.dumps({"hidden_size": "32"})},
        ConfigError,
        "config.json in its metadata: ViTConfig.hidden_size must be",
    ),
    "no-kind": ({"model_kind": None}, CheckpointError, "'model_kind' is missing"),
    "other-size": (
        {CONFIG_NAME: tiny_config(**{**CONFIG, "image_size": 64}).to_json_string()},
        LayoutError,
        r"an export of its config takes one input pixel_values tensor\(float\) \[batch, 3, 64",
    ),
}


@pytest.mark.parametrize("case", METADATA)
def test_a_file_whose_metadata_does_not_describe_it_is_refused(
    folders: dict[str, Path], tmp_path: Path, case: str
) -> None:
    change, error, message = METADATA[case]
    file = rewrite_metadata(folders["classifier"] / ONNX_NAME, tmp_path / "m.onnx", change)
    with pytest.raises(error, match=message) as raised:
        vit_core.load(file, backend="onnx")
    assert str(file) in str(raised.value)


def test_what_is_not_an_exported_graph_says_how_to_make_one(tmp_path: Path) -> None:
    folder = tmp_path / "vit"
    folder.mkdir()
    write_folder(folder, tiny_config(), ModelKind(classifier=True, pooler=False), seed=0)
    command = f"python -m vit_core export {folder} --format onnx -o {folder / ONNX_NAME}"
    with pytest.raises(CheckpointError, match=f"no model.onnx in this folder .* `{command}`"):
        vit_core.load(folder, backend="onnx")
    with pytest.raises(CheckpointError, match="runs an exported .onnx file"):
        vit_core.load(folder / "model.safetensors", backend="onnx")
    graph = tmp_path / "x.onnx"
    graph.touch()
    with pytest.raises(CheckpointError, match="an exported graph, which the twins do not read"):
        vit_core.load(graph, backend="torch")


# ----------------------------------------------------------------- CLI
def test_predict_with_onnx_gives_the_twins_probabilities(
    folders: dict[str, Path], photos: Path, tmp_path: Path
) -> None:
    results = {}
    for backend, model in [
        ("onnx", folders["classifier"] / ONNX_NAME),
        ("torch", folders["classifier"]),
    ]:
        out = tmp_path / f"{backend}.json"
        args = ["predict", str(photos), "--model", str(model), "--backend", backend]
        assert main([*args, "--skip-errors", "--workers", "0", "-o", str(out)]) == 1
        results[backend] = json.loads(out.read_text())
    assert [r["path"] for r in results["onnx"]] == [r["path"] for r in results["torch"]]
    for ours, theirs in zip(results["onnx"], results["torch"], strict=True):
        assert [t["label"] for t in ours["top_k"]] == [t["label"] for t in theirs["top_k"]]
        got = np.array([t["probability"] for t in ours["top_k"]])
        want = np.array([t["probability"] for t in theirs["top_k"]])
        assert np.abs(got - want).max() <= TOL


def test_embed_with_onnx_gives_the_twins_embeddings(
    folders: dict[str, Path], photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vectors = {}
    for backend, model in [("onnx", folders["encoder"] / ONNX_NAME), ("torch", folders["encoder"])]:
        out = tmp_path / f"{backend}.npy"
        args = ["embed", str(photos), "--model", str(model), "--backend", backend]
        assert main([*args, "--workers", "0", "-o", str(out)]) == 0
        vectors[backend] = np.load(out)
    assert "12 floats per image, the model's pooler_output" in capsys.readouterr().out
    assert vectors["onnx"].shape == (3, 12)  # two photos and the broken one (NaN)
    assert np.array_equal(np.isnan(vectors["onnx"]), np.isnan(vectors["torch"]))
    assert np.nanmax(np.abs(vectors["onnx"] - vectors["torch"])) <= TOL


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        ("encoder", ["--layer", "0"], "computes its final outputs only, not the blocks'"),
        ("classifier", [], "an exported classifier computes logits only"),
    ],
)
def test_embed_refuses_what_the_graph_does_not_compute(
    folders: dict[str, Path],
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    extra: list[str],
    message: str,
) -> None:
    out = tmp_path / "e.npy"
    args = ["embed", str(photos), "--model", str(folders[case]), "--backend", "onnx"]
    assert main([*args, *extra, "--workers", "0", "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())
