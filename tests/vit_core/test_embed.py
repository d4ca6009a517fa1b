"""`python -m vit_core embed`: one embedding per image, real photos with broken files mixed
in, into Parquet or .npy + CSV, written atomically and resumable after a kill.

Most runs are in-process (`main([...])`), so the model calls can be counted and a kill
injected; the `.npy` run is a subprocess with DataLoader workers and the progress bar, as
a user starts it. Every embedding is compared with the model's own outputs computed
directly (`Backend.run`, `Backend.intermediates`) on the same images.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file
from vit_test_support import SHIPPED, tiny_config, write_folder, write_photos

import vit_core
from vit_core import cli
from vit_core.backend import BACKENDS, get_backend
from vit_core.batching import expand_inputs
from vit_core.cli import main, processor_for
from vit_core.embedding import EmbedSpec, embed_pixels, l2_normalize
from vit_core.errors import InputError
from vit_core.layout import ModelKind
from vit_core.processing import open_image

ROOT = Path(__file__).resolve().parents[2]
BATCH = 2  # the photos folder in batches of 2: [ok ok] [broken broken] [ok ok] [ok ok]
BROKEN = {"3-notes.png": "not an image format PIL can read", "4-cut.jpg": "truncated or corrupt"}
TOLERANCE = 1e-6  # against the model's own output, computed in one batch
PARITY = 1e-5  # torch against flax


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's photos at small sizes as PNG and JPEG (three in a subfolder), and two
    broken files between them: a text file named .png, and a JPEG cut in half."""
    photos = {
        "1-chelsea.png": ("chelsea", (48, 32)),
        "2-astronaut.jpg": ("astronaut", (40, 40)),
        "5-coffee.png": ("coffee", (60, 40)),
        "more/6-chelsea.jpg": ("chelsea", (24, 16)),
        "more/7-astronaut.png": ("astronaut", (32, 32)),
        "more/8-coffee.jpg": ("coffee", (30, 20)),
    }
    broken = {"3-notes.png": "text", "4-cut.jpg": "cut"}
    return write_photos(tmp_path_factory.mktemp("photos"), photos, broken)


def readable(folder: Path) -> list[Path]:
    return [p for p in expand_inputs([folder]) if p.name not in BROKEN]


def direct_outputs(backend: str, model_folder: Path, paths: list[Path]) -> dict[str, Any]:
    """The encoder's outputs on `paths`, without `embed`, in batches of `BATCH` as `embed`
    runs the readable photos (the broken files fill a batch of their own): jit compiles
    per batch shape, and another shape may round differently (~1e-6)."""
    model = vit_core.load(model_folder, backend=backend, model_type="base")
    processor = processor_for(model_folder, model.config)
    twin = get_backend(backend)
    outs = [
        twin.run(model, processor([open_image(p) for p in paths[i : i + BATCH]])["pixel_values"])
        for i in range(0, len(paths), BATCH)
    ]
    return {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}


def read_parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(path)


def embed(*args: str | Path) -> int:
    return main(["embed", *map(str, args), "--batch-size", str(BATCH), "--workers", "0"])


@pytest.fixture(scope="module")
def parquet_runs(
    photos: Path, tmp_path_factory: pytest.TempPathFactory, torch_one_thread: None
) -> dict[str, Path]:
    """`embed photos/ -o BACKEND.parquet` with each backend, uninterrupted."""
    pytest.importorskip("pyarrow")
    out = tmp_path_factory.mktemp("runs")
    for backend in BACKENDS:
        assert embed(photos, "--backend", backend, "-o", out / f"{backend}.parquet") == 0
    return {backend: out / f"{backend}.parquet" for backend in BACKENDS}


# ------------------------------------------------------------------ the files
@pytest.mark.parametrize("backend", BACKENDS)
def test_parquet_holds_one_row_per_image_in_order_with_the_errors(
    photos: Path, parquet_runs: dict[str, Path], backend: str
) -> None:
    table = read_parquet(parquet_runs[backend])
    assert table.schema.names == ["path", "embedding", "error"]
    column = table.schema.field("embedding").type  # fixed_size_list<float32, 64>
    assert (column.list_size, str(column.value_type)) == (64, "float")
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == [str(p) for p in expand_inputs([photos])]
    for row in rows:
        name = Path(row["path"]).name
        if name in BROKEN:
            assert row["embedding"] is None and BROKEN[name] in row["error"]
        else:
            assert row["error"] is None
    good = readable(photos)
    got = np.stack([r["embedding"] for r in rows if r["error"] is None])
    expected = direct_outputs(backend, SHIPPED, good)["last_hidden_state"][:, 0]  # auto: cls
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOLERANCE)
    assert sorted(p.name for p in parquet_runs[backend].parent.iterdir()) == [
        "flax.parquet",
        "torch.parquet",
    ]  # no partial store, no temp file left


def test_torch_and_flax_embeddings_agree(parquet_runs: dict[str, Path]) -> None:
    torch_rows, flax_rows = (read_parquet(parquet_runs[b]).to_pylist() for b in BACKENDS)
    assert [r["error"] for r in torch_rows] == [r["error"] for r in flax_rows]
    both = [(t["embedding"], f["embedding"]) for t, f in zip(torch_rows, flax_rows, strict=True)]
    torch_vectors, flax_vectors = (np.array([pair[i] for pair in both if pair[0]]) for i in (0, 1))
    np.testing.assert_allclose(torch_vectors, flax_vectors, rtol=0, atol=PARITY)


def test_npy_and_csv_from_dataloader_workers_with_a_progress_bar(
    photos: Path, tmp_path: Path
) -> None:
    """A user's run: a subprocess, torch DataLoader workers decoding, mean pooling, L2."""
    out = tmp_path / "embeddings.npy"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "vit_core", "embed", str(photos), "-o", str(out), "--pool", "mean",
         "--normalize", "--batch-size", str(BATCH), "--workers", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "img/s" in result.stderr and "warning: could not read" in result.stderr
    listing = tmp_path / "embeddings.csv"
    assert result.stdout.startswith(
        f"6 images embedded, 2 could not be read (listed in {listing}); wrote {out} + {listing}"
    )
    array = np.load(out)
    assert array.dtype == np.float32 and array.shape == (8, 64)
    with listing.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["index"] for r in rows] == [str(i) for i in range(8)]
    assert [r["path"] for r in rows] == [str(p) for p in expand_inputs([photos])]
    broken = [i for i, r in enumerate(rows) if r["error"]]
    assert broken == [2, 3] and np.isnan(array[broken]).all()
    good = np.delete(array, broken, axis=0)
    tokens = direct_outputs("torch", SHIPPED, readable(photos))["last_hidden_state"]
    np.testing.assert_allclose(good, l2_normalize(tokens[:, 1:].mean(axis=1)), atol=TOLERANCE)
    np.testing.assert_allclose(np.linalg.norm(good, axis=1), 1.0, rtol=0, atol=1e-6)


def test_an_existing_output_is_replaced_only_with_force(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "e.npy"
    (tmp_path / "e.csv").write_text("mine")  # the listing of an .npy counts too
    assert embed(photos, "-o", out) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'e.csv'}: already exists; choose another output file, or pass "
        "--force to replace it\n"
    )
    assert not out.exists() and (tmp_path / "e.csv").read_text() == "mine"
    assert embed(photos, "-o", out, "--force") == 0
    assert np.load(out).shape == (8, 64) and "index,path,error" in (tmp_path / "e.csv").read_text()


# ------------------------------------------------------------------- resuming
def test_a_killed_run_resumes_to_the_same_file_without_redoing_images(
    photos: Path,
    parquet_runs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    embedded: list[int] = []  # images per model call
    kill_at_call = 3

    def counted(*args: Any) -> np.ndarray:
        embedded.append(len(args[3]))
        if len(embedded) == kill_at_call:
            raise KeyboardInterrupt  # as Ctrl-C or a kill would, in the middle of a batch
        return embed_pixels(*args)

    monkeypatch.setattr(cli, "embed_pixels", counted)
    out = tmp_path / "e.parquet"
    assert embed(photos, "-o", out) == 130
    store = tmp_path / "e.parquet.partial"
    assert capsys.readouterr().err.endswith(
        f"interrupted: 6 of 8 images are saved in {store}; run the same command with "
        "--resume to finish\n"
    )  # batches [1 2] [3 4: both broken, no model call] [5 6] done; [7 8] lost
    assert not out.exists() and len(list(store.glob("batch-*.npz"))) == 3

    assert embed(photos, "-o", out) == 2  # without --resume: refused, store kept
    assert "pass --resume to finish it, or --force to start over" in capsys.readouterr().err
    assert embed(photos, "-o", out, "--resume", "--pool", "mean") == 2
    assert "was started with pool='auto'; this run has pool='mean'" in capsys.readouterr().err

    embedded.clear()
    assert embed(photos, "-o", out, "--resume") == 0
    assert embedded == [2]  # only the lost batch ran again
    assert capsys.readouterr().out.startswith(
        f"6 images embedded, 2 could not be read (listed in {out}); resumed with 6 of 8 already "
        f"done; wrote {out}: 64 floats per image, class token of the last block (backend torch)"
    )
    assert read_parquet(out).equals(read_parquet(parquet_runs["torch"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.parquet"]


def test_force_starts_over_from_a_partial_store(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "e.npy"
    store = tmp_path / "e.npy.partial"
    store.mkdir()
    (store / "batch-000000.npz").write_bytes(b"left by another run")
    assert embed(photos, "-o", out, "--force") == 0
    assert not store.exists() and np.load(out).shape == (8, 64)


# ---------------------------------------------------------------- pooling
@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ViT with a pooling layer (narrower than the encoder), one without a class token
    (its embedding the patch mean), and one with register tokens."""
    root = tmp_path_factory.mktemp("tiny")
    cases = {
        "pooler": (tiny_config(pooler_output_size=12), True),
        "gap": (tiny_config(use_class_token=False, pooling_type="mean"), False),
        "registers": (tiny_config(num_register_tokens=2), False),
    }
    for name, (config, pooler) in cases.items():
        (root / name).mkdir()
        write_folder(root / name, config, ModelKind(classifier=False, pooler=pooler), seed=3)
    return {name: root / name for name in cases}


# Tokens before the patches, which "mean" leaves out: class token, registers.
PREFIX_TOKENS = {"shipped": 1, "pooler": 1, "gap": 0, "registers": 3}


def pool_case(backend: str, folder: Path) -> tuple[Any, Any, np.ndarray, dict[str, Any]]:
    model = vit_core.load(folder, backend=backend, model_type="base")
    pixels = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    return model, get_backend(backend), pixels, get_backend(backend).run(model, pixels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_pool_is_the_models_own_output(
    backend: str, tiny_folders: dict[str, Path], torch_one_thread: None
) -> None:
    for name, folder in {"shipped": SHIPPED, **tiny_folders}.items():
        model, twin, pixels, out = pool_case(backend, folder)
        config, kind = model.config, model.kind
        tokens, pooled = out["last_hidden_state"], out.get("pooler_output")
        expected = {
            "cls": tokens[:, 0],
            "mean": tokens[:, PREFIX_TOKENS[name] :].mean(axis=1),
            "pooler": pooled,
        }
        # a transformers ViT without a pooling layer returns no pooler_output; the others do
        auto = "cls" if name == "shipped" else "pooler"
        assert EmbedSpec().resolved_pool(config, kind) == auto
        expected["auto"] = expected[auto]
        for pool, vectors in expected.items():
            spec = EmbedSpec(pool)
            if vectors is None or (pool == "cls" and name == "gap"):
                with pytest.raises(InputError, match=re.escape(f"{folder}: pool='{pool}' needs")):
                    spec.check(config, kind, str(folder))
                continue
            spec.check(config, kind, str(folder))
            got = embed_pixels(twin, model, config, pixels, spec)
            assert got.dtype == np.float32 and got.shape == (3, spec.width(config, kind))
            np.testing.assert_allclose(got, vectors, rtol=0, atol=TOLERANCE, err_msg=pool)


def test_no_pooling_layer_names_the_family_and_pool_choices() -> None:
    config = vit_core.ViTConfig.from_json_file(SHIPPED / "config.json")
    kind = ModelKind(classifier=False, pooler=False)
    with pytest.raises(InputError, match="this ViT model has no pooling layer; use 'cls' or"):
        EmbedSpec("pooler").check(config, kind, "digits")
    with pytest.raises(InputError, match="layer=3 is out of range: .* 3 blocks, 0..2"):
        EmbedSpec(layer=3).check(config, kind)
    with pytest.raises(InputError, match="with layer=1 choose 'cls', 'mean' or 'auto'"):
        EmbedSpec("pooler", layer=1)
    with pytest.raises(InputError, match="unknown pool 'max'"):
        EmbedSpec("max")


def test_normalize_gives_unit_vectors_and_leaves_zero_as_zero() -> None:
    vectors = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalize(vectors), [[0.6, 0.8], [0, 0], [1e-18, 0]])


# ------------------------------------------------------------------ layers
def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layer_is_that_blocks_tokens_with_the_final_norm(
    backend: str, photos: Path, torch_one_thread: None
) -> None:
    model = vit_core.load(SHIPPED, backend=backend, model_type="base")
    twin, config = get_backend(backend), model.config
    images = [open_image(p) for p in readable(photos)]
    pixels = processor_for(SHIPPED, config)(images)["pixel_values"]
    out = twin.run(model, pixels, output_hidden_states=True)
    weights = load_file(SHIPPED / "model.safetensors")
    norm = weights["vit.layernorm.weight"], weights["vit.layernorm.bias"], config.layer_norm_eps
    for layer in (0, 1, -1):
        after_block = out["hidden_states"][layer + 1 if layer >= 0 else layer]
        tokens = layer_norm(after_block, *norm)
        for pool, vectors in [("cls", tokens[:, 0]), ("mean", tokens[:, 1:].mean(axis=1))]:
            got = embed_pixels(twin, model, config, pixels, EmbedSpec(pool, layer=layer))
            np.testing.assert_allclose(got, vectors, rtol=0, atol=1e-5, err_msg=f"{layer} {pool}")
    last = embed_pixels(twin, model, config, pixels, EmbedSpec("cls", layer=-1))
    np.testing.assert_allclose(last, out["last_hidden_state"][:, 0], rtol=0, atol=TOLERANCE)
    (direct,) = twin.intermediates(model, pixels, [1], norm=True)
    got = embed_pixels(twin, model, config, pixels, EmbedSpec(layer=1, normalize=True))
    np.testing.assert_allclose(got, l2_normalize(direct[:, 0]), rtol=0, atol=TOLERANCE)


def test_layer_on_the_command_line(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], torch_one_thread: None
) -> None:
    out = tmp_path / "e.npy"
    assert embed(photos, "-o", out, "--layer", "-2", "--pool", "mean", "--backend", "flax") == 0
    assert "mean of the patch tokens of block -2 (final norm applied)" in capsys.readouterr().out
    model = vit_core.load(SHIPPED, backend="torch", model_type="base")
    pixels = processor_for(SHIPPED, model.config)([open_image(p) for p in readable(photos)])
    (tokens,) = get_backend("torch").intermediates(model, pixels["pixel_values"], [-2], norm=True)
    got = np.delete(np.load(out), [2, 3], axis=0)
    np.testing.assert_allclose(got, tokens[:, 1:].mean(axis=1), rtol=0, atol=PARITY)


# ------------------------------------------------------------------ the CLI
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-o", "e.txt"), "e.txt: embeddings are written as .parquet or .npy"),
        (("-o", "e.npy", "--pool", "pooler"), "has no pooling layer"),
        (("-o", "e.npy", "--layer", "5"), "layer=5 is out of range"),
    ],
    ids=["suffix", "no-pooler", "layer"],
)
def test_refusals_are_one_line_before_any_image_is_read(
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    message: str,
) -> None:
    args = tuple(str(tmp_path / a) if a.startswith("e.") else a for a in args)
    assert embed(photos, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_parquet_without_pyarrow_names_the_extra(
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now fails
    assert embed(photos, "-o", tmp_path / "e.parquet") == 2
    assert "pip install 'vit-twin[parquet]'" in capsys.readouterr().err
