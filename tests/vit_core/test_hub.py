"""Hugging Face repo ids from the local cache (`vit_core.hub`), offline.

Each test builds a cache folder in huggingface_hub's real layout (`models--org--name/`
with `blobs/` named by each file's hash, `snapshots/<commit>/` of relative symlinks into
them, `refs/<branch or tag>` holding the commit; checked by huggingface_hub's own
`scan_cache_dir`), points HF_HUB_CACHE at it, and fills it with models written by the
real libraries, tiny, seeded and perturbed: a transformers ViT (`save_pretrained`, two
revisions: main, and a tag also reached by its bare commit hash), a timm model as
`timm.models.save_for_hf` writes it, the weights alone of a `timm/` repo (what
`timm.create_model(pretrained=True)` caches), and a transformers DINOv2. Each loads to the
reference model's outputs within 1e-5, and to the same numbers as converting the repo
with `python -m conversion NAME -o DIR`. Sockets refuse to connect for every test: any
network call fails it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub.file_download import repo_folder_name
from PIL import Image
from safetensors.torch import save_file
from timm_models import family_model

from conversion.cli import main as convert_main
from vit_core import CheckpointError, ConfigError, NotCachedError, ViTImageProcessor, load
from vit_core.backend import get_backend
from vit_core.cli import main
from vit_core.hub import identity, open_source
from vit_flax import FlaxViTForImageClassification
from vit_torch import ViTForImageClassification

ROOT = Path(__file__).resolve().parents[2]
VIT = "acme/vit-tiny"
DINOV2 = "acme/dinov2-tiny"
TIMM = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"
# timm's test model: 2 heads at width 64 (no standard size), registers, mean pooling,
# LayerScale: only its name says so, its weights alone do not.
TIMM_WEIGHTS_ONLY = "timm/test_vit2.r160_in1k"
TEST_VIT2 = {"depth": 8, "embed_dim": 64, "num_heads": 2}
# Files the Hub stores in LFS: their blobs are named by sha256, the others by git's sha1.
LFS_SUFFIXES = (".safetensors", ".bin", ".msgpack")


def commit(name: str) -> str:
    """A 40-hex commit hash, as the Hub's are."""
    return hashlib.sha1(name.encode()).hexdigest()


# ------------------------------------------------------------------------ the cache
class Cache:
    """A Hugging Face hub cache folder, written as `hf_hub_download` writes one."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def repo(self, repo_id: str) -> Path:
        return self.root / repo_folder_name(repo_id=repo_id, repo_type="model")

    def add(self, repo_id: str, files: Path, revision: str, refs: tuple[str, ...]) -> Path:
        """Every file of `files` as snapshot `revision` of `repo_id`; each ref points at it."""
        repo = self.repo(repo_id)
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        for file in sorted(files.iterdir()):
            data = file.read_bytes()
            if file.suffix in LFS_SUFFIXES:
                etag = hashlib.sha256(data).hexdigest()
            else:  # a git blob's id
                etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            blob = repo / "blobs" / etag
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():  # revisions share the blobs of identical files
                blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
        for ref in refs:
            (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
            (repo / "refs" / ref).write_text(revision)  # no newline, as huggingface_hub writes
        return snapshot

    def files(self) -> dict[str, bytes]:
        """Every path under the cache and its bytes (links as their targets' names)."""
        entries = sorted(p for p in self.root.rglob("*") if p.is_file() or p.is_symlink())
        return {
            str(p.relative_to(self.root)): os.readlink(p).encode()
            if p.is_symlink()
            else p.read_bytes()
            for p in entries
        }


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every socket connection refused (and recorded, in case a library swallows the
    error) for the whole test."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise AssertionError(f"a network connection was attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert not attempts, f"network connections attempted: {attempts}"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cache:
    """An empty cache that huggingface_hub uses: HF_HOME and HF_HUB_CACHE point at it, and,
    as huggingface_hub read those when this process first imported it, its constant too
    (a fresh process reads the variables: `test_hf_home_in_a_new_process`)."""
    root = tmp_path / "hf-home" / "hub"
    root.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(root.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return Cache(root)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------- the models
def vit_repo(oracle: Any, seed: int) -> tuple[Any, Path]:
    """A transformers ViT classifier with its image processor, as save_pretrained writes."""
    import transformers

    model, folder = oracle.make_hf("classification", seed, image_size=32, patch_size=8)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model, folder


def timm_repo(oracle: Any, folder: Path) -> Any:
    """A timm ViT as `save_for_hf` writes it for the Hub: timm's config.json + safetensors."""
    from timm.models import save_for_hf

    model = family_model(oracle, TIMM.split("/")[1], 0, img_size=32, patch_size=8, num_classes=5)
    save_for_hf(model, str(folder), safe_serialization=True)
    return model


def dinov2_repo(oracle: Any, folder: Path) -> Any:
    import transformers

    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
        patch_size=14, mlp_ratio=3, layerscale_value=0.3, layer_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(0)
    model = oracle.perturb_torch(transformers.Dinov2Model(config), 0)
    model.save_pretrained(folder)
    return model


def probe(size: int) -> np.ndarray:
    """Two seeded unit-normal RGB images of `size` x `size`."""
    return np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)


def run(model: Any, backend: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    return get_backend(backend).run(model, pixels)


# ------------------------------------------------------------------------ the tests
def test_a_transformers_vit_loads_as_it_is_at_each_revision(oracle: Any, cache: Cache) -> None:
    main_model, main_files = vit_repo(oracle, seed=0)
    tag_model, tag_files = vit_repo(oracle, seed=1)
    cache.add(VIT, main_files, commit("main"), refs=("main",))
    cache.add(VIT, tag_files, commit("v1"), refs=("v1.0",))
    scanned = huggingface_hub.scan_cache_dir(cache.root)
    assert not scanned.warnings  # huggingface_hub reads the cache as its own
    [repo] = scanned.repos
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {
        commit("main"): {"main"},
        commit("v1"): {"v1.0"},
    }
    pixels = oracle.pixels(main_model.config)
    with torch.no_grad():
        want = {
            commit("main"): main_model(torch.from_numpy(pixels)).logits,
            commit("v1"): tag_model(torch.from_numpy(pixels)).logits,
        }
    for revision, expected in [
        (None, commit("main")), ("main", commit("main")),
        ("v1.0", commit("v1")), (commit("v1"), commit("v1")),
    ]:  # fmt: skip
        source = open_source(VIT, revision)
        assert source.snapshot is not None and source.snapshot.commit == expected
        assert source.tensors is None  # canonical already: the cached file is read as it is
        got = run(load(VIT, revision=revision), "torch", pixels)["logits"]
        oracle.assert_close(got, want[expected], f"hub {VIT}@{revision} (torch) vs transformers")
    flax = FlaxViTForImageClassification.from_pretrained(VIT, revision="v1.0")
    oracle.assert_close(
        run(flax, "flax", pixels)["logits"], want[commit("v1")], f"hub {VIT} (flax) vs transformers"
    )
    torch_twin = ViTForImageClassification.from_pretrained(VIT, revision=commit("v1"))
    assert isinstance(torch_twin, ViTForImageClassification)
    processor = open_source(VIT).processor()
    assert processor == ViTImageProcessor.from_pretrained(main_files)
    # what `embed` records to resume by: the revision pinned
    assert identity(VIT, "v1.0") == f"{VIT}@{commit('v1')}"
    assert identity(main_files) == str(main_files.resolve())


def test_a_timm_repo_is_converted_in_memory(oracle: Any, cache: Cache, tmp_path: Path) -> None:
    reference = timm_repo(oracle, tmp_path / "timm")
    cache.add(TIMM, tmp_path / "timm", commit("timm"), refs=("main",))
    before = cache.files()
    pixels = probe(32)
    with torch.no_grad():
        want = reference(torch.from_numpy(pixels))
    got = run(load(TIMM), "torch", pixels)["logits"]
    oracle.assert_close(got, want, f"hub {TIMM} vs timm")
    assert cache.files() == before  # nothing written into the cache
    # The same model as `python -m conversion NAME -o DIR` writes, and the same processor.
    assert convert_main([TIMM, "-o", str(tmp_path / "converted"), "--quiet"]) == 0
    converted = load(tmp_path / "converted")
    oracle.assert_close(
        run(load(TIMM), "torch", pixels)["logits"],
        run(converted, "torch", pixels)["logits"],
        f"hub {TIMM} vs its converted folder",
        atol=0.0,
    )
    processor = open_source(TIMM).processor()
    assert processor == ViTImageProcessor.from_pretrained(tmp_path / "converted")
    assert processor.size == {"height": 32, "width": 32} and processor.resample == 3  # bicubic


def test_a_timm_repo_of_weights_alone_takes_its_name(
    oracle: Any, cache: Cache, tmp_path: Path
) -> None:
    """timm's own download caches model.safetensors alone: the repo name says the rest."""
    name = TIMM_WEIGHTS_ONLY.split("/")[1]
    reference = family_model(oracle, name, 0, **TEST_VIT2)
    (tmp_path / "weights").mkdir()
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()},
        tmp_path / "weights" / "model.safetensors",
    )
    cache.add(TIMM_WEIGHTS_ONLY, tmp_path / "weights", commit("tiny"), refs=("main",))
    pixels = probe(160)
    with torch.no_grad():
        want = reference(torch.from_numpy(pixels))
    model = ViTForImageClassification.from_pretrained(TIMM_WEIGHTS_ONLY)
    config = model.config
    assert config.num_attention_heads == 2 and config.num_register_tokens == 1
    assert config.pooling_type == "mean" and config.layerscale_value is not None
    oracle.assert_close(run(model, "torch", pixels)["logits"], want, f"hub {name} vs timm")


def test_a_dinov2_repo_is_converted_in_memory(oracle: Any, cache: Cache, tmp_path: Path) -> None:
    reference = dinov2_repo(oracle, tmp_path / "dinov2")
    cache.add(DINOV2, tmp_path / "dinov2", commit("dinov2"), refs=("main",))
    pixels = oracle.pixels(reference.config)
    with torch.no_grad():
        want = reference(torch.from_numpy(pixels))
    got = run(load(DINOV2, "torch"), "torch", pixels)
    oracle.assert_close(got["last_hidden_state"], want.last_hidden_state, f"hub {DINOV2}")
    oracle.assert_close(got["pooler_output"], want.pooler_output, f"hub {DINOV2}: pooler")
    assert convert_main([DINOV2, "-o", str(tmp_path / "converted"), "--quiet"]) == 0
    converted = run(load(tmp_path / "converted"), "torch", pixels)
    for key in ("last_hidden_state", "pooler_output"):
        np.testing.assert_array_equal(got[key], converted[key])


def test_predict_takes_a_repo_id(
    oracle: Any, cache: Cache, tmp_path: Path, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    timm_repo(oracle, tmp_path / "timm")
    cache.add(TIMM, tmp_path / "timm", commit("timm"), refs=("main",))
    _, files = vit_repo(oracle, seed=0)
    cache.add(VIT, files, commit("main"), refs=("main",))
    assert convert_main([TIMM, "-o", str(tmp_path / "converted"), "--quiet"]) == 0
    common = ["predict", str(photo), "--workers", "0", "--top-k", "3"]
    assert main([*common, "--model", TIMM, "-o", str(tmp_path / "by-name.json")]) == 0
    assert (
        main(
            [
                *common,
                "--model",
                str(tmp_path / "converted"),
                "-o",
                str(tmp_path / "by-folder.json"),
            ]
        )
        == 0
    )
    [by_name] = json.loads((tmp_path / "by-name.json").read_text())
    [by_folder] = json.loads((tmp_path / "by-folder.json").read_text())
    # the same preprocessing and model, converted in memory (float32: BLAS may round apart)
    assert [p["label"] for p in by_name["top_k"]] == [p["label"] for p in by_folder["top_k"]]
    np.testing.assert_allclose(
        [p["probability"] for p in by_name["top_k"]],
        [p["probability"] for p in by_folder["top_k"]],
        atol=1e-6,
    )
    capsys.readouterr()
    assert main([*common, "--model", VIT, "--revision", commit("main"), "--backend", "flax"]) == 0
    assert f"{photo}:" in capsys.readouterr().out


def test_a_name_not_in_the_cache_says_where_it_looked(
    oracle: Any,
    cache: Cache,
    photo: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    absent = cache.repo("acme/absent")
    said = (
        f"acme/absent: no local folder {Path('acme/absent').absolute()}, and not in the local "
        f"Hugging Face cache (looked in {absent})"
    )
    with pytest.raises(NotCachedError, match=re.escape(said) + ".*`hf download acme/absent`"):
        load("acme/absent")
    assert main(["predict", str(photo), "--model", "acme/absent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {said}; this package never downloads")
    assert err.count("\n") == 1  # one line, no traceback
    _, files = vit_repo(oracle, seed=0)
    cache.add(VIT, files, commit("main"), refs=("main",))
    with pytest.raises(NotCachedError, match=f"revision 'v9' is not in .*main -> {commit('main')}"):
        load(VIT, revision="v9")
    with pytest.raises(
        ConfigError, match="a local path; revision='v1' applies to a Hugging Face repo id"
    ):
        load(files, revision="v1")
    for path in ("./models/x", "x/y/z", "/no/such/model"):  # paths, not repo ids
        with pytest.raises(CheckpointError, match=f"{path}: no such file or folder") as raised:
            load(path)
        assert not isinstance(raised.value, NotCachedError)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(CheckpointError, match="huggingface_hub, which reads repo ids .* not inst"):
        load("acme/absent")


def test_hf_home_in_a_new_process(oracle: Any, tmp_path: Path, photo: Path) -> None:
    """A new process reads HF_HOME (no HF_HUB_CACHE) as huggingface_hub does, with every
    socket refused there too."""
    home = tmp_path / "home"
    _, files = vit_repo(oracle, seed=0)
    Cache(home / "hub").add(VIT, files, commit("main"), refs=("main",))
    script = (
        "import socket, sys\n"
        "def refuse(self, address): raise AssertionError(f'network: {address!r}')\n"
        "socket.socket.connect = socket.socket.connect_ex = refuse\n"
        "from vit_core.cli import main\n"
        f"sys.exit(main(['predict', {str(photo)!r}, '--model', {VIT!r}, '--workers', '0']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{photo}:\n  1. ")
