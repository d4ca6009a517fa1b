"""`vit_core.distributed` on a local Ray cluster that the module starts (2 CPUs) and stops.

Real photos with broken files mixed in, the shipped digits model. The single-process
`embed` and `predict` are the references: a Ray output must hold the same rows (sorted by
path, since Ray writes blocks in no set order), none lost or doubled, the same errors.
Two Ray jobs, since each starts its actors afresh (seconds each, on two cores): `embed
--ray` from the command line, and `ray_predict` with one actor killed mid-run, which Ray
must restart with the job still complete.

Marked `ray` (`pytest -m "not ray"` skips them); the checks that need no cluster are not.
"""

from __future__ import annotations

import csv
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from vit_test_support import SHIPPED, write_photos

from vit_core.cli import main
from vit_core.errors import InputError, OutputExistsError

BATCH = 2  # 12 images in 6 batches over 2 actors
TOLERANCE = 1e-6  # Ray's numbers against the single-process run's
BROKEN = {
    "c/cut.jpg": "truncated or corrupt",
    "c/empty.jpg": "not an image format PIL can read",
    "c/notes.png": "not an image format PIL can read",
}
# Ray Data's own DataContext warns about its own deprecated fields when it is set up.
RAY_WARNINGS = "ignore::DeprecationWarning:ray.data"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's photos, small, as PNG and JPEG in three folders, and three broken
    files: empty, text named .png, a JPEG cut in half."""
    photos = {
        f"{folder}/{name}{'.jpg' if folder == 'b' else '.png'}": (name, size)
        for folder, size in zip("abc", [(48, 32), (24, 24), (30, 20)], strict=True)
        for name in ("chelsea", "astronaut", "coffee")
    }
    broken = {"c/empty.jpg": "empty", "c/notes.png": "text", "c/cut.jpg": "cut"}
    return write_photos(tmp_path_factory.mktemp("job") / "photos", photos, broken)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A fresh local Ray instance with 2 CPUs, whatever RAY_ADDRESS says."""
    ray = pytest.importorskip("ray")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def read_rows(path: Path) -> tuple[Any, list[dict[str, Any]]]:
    """(schema, rows sorted by path) of a Parquet file or folder."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.schema, sorted(table.to_pylist(), key=lambda row: row["path"])


def single_process(out: Path, *args: str | Path) -> None:
    """`embed` or `predict` as a user runs it, in batches of BATCH."""
    options = ["--model", SHIPPED, "--batch-size", BATCH, "--workers", 0, "-o", out]
    status = main([str(a) for a in [*args, *options]])
    assert status == (0 if args[0] == "embed" else 1)  # predict: 1 when it skipped images


def assert_the_broken_files_failed(rows: list[dict[str, Any]], photos: str) -> None:
    failed = {r["path"].removeprefix(f"{photos}/"): r["error"] for r in rows if r["error"]}
    assert failed.keys() == BROKEN.keys()
    assert all(BROKEN[name] in error for name, error in failed.items())


# ---------------------------------------------------------------- on the cluster
@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.ray
@pytest.mark.filterwarnings(RAY_WARNINGS)
def test_embed_on_ray_from_the_command_line_equals_the_single_process_run(
    ray_cluster: Any,
    photos: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Relative paths, as typed: the actors read them from the caller's folder, and the
    rows and errors name them as the single-process run does."""
    monkeypatch.chdir(photos.parent)
    single_process(Path("embed.parquet"), "embed", "photos")
    capsys.readouterr()
    command = ["embed", "photos", "--model", str(SHIPPED), "--batch-size", str(BATCH)]
    assert main([*command, "-o", "ray.parquet", "--ray"]) == 0
    assert capsys.readouterr().out == (
        "9 images embedded, 3 could not be read (listed in ray.parquet); wrote ray.parquet on "
        "Ray: a folder of Parquet files (backend torch)\n"
    )
    got_schema, got = read_rows(Path("ray.parquet"))
    want_schema, want = read_rows(Path("embed.parquet"))
    assert Path("ray.parquet").is_dir() and got_schema.equals(want_schema, check_metadata=False)
    assert [r["path"] for r in got] == [r["path"] for r in want]
    assert len({r["path"] for r in got}) == len(got) == 12  # none lost, none twice
    assert [r["error"] for r in got] == [r["error"] for r in want]
    for ray_row, row in zip(got, want, strict=True):
        if row["embedding"] is None:
            assert ray_row["embedding"] is None
        else:
            diff = np.abs(np.subtract(ray_row["embedding"], row["embedding"])).max()
            assert diff <= TOLERANCE, ray_row["path"]
    assert_the_broken_files_failed(got, "photos")
    assert sorted(p.name for p in photos.parent.iterdir()) == [
        "embed.parquet",
        "photos",
        "ray.parquet",
    ]  # no temp folder left beside it


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.ray
@pytest.mark.filterwarnings(RAY_WARNINGS)
def test_ray_predict_equals_predicts_top_k_with_an_actor_killed_mid_run(
    ray_cluster: Any, photos: Path, tmp_path: Path
) -> None:
    """One actor kills its own process on its second batch; Ray restarts it and runs the
    batch again, and every row is there once, as `predict` ranks it."""
    from vit_core.distributed import PredictActor, ray_predict

    marker, evidence = tmp_path / "kill-one-actor", tmp_path / "killed"
    marker.touch()

    class DiesOnce(PredictActor):
        """The first actor to delete the marker on its second batch dies, so one dies in
        all: 6 batches over 2 actors, so one of them gets a second batch."""

        calls = 0

        def __call__(self, batch: Any) -> Any:
            self.calls += 1
            if self.calls == 2:
                try:
                    marker.unlink()
                except FileNotFoundError:
                    pass
                else:
                    evidence.write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().__call__(batch)

    single_process(tmp_path / "predict.csv", "predict", photos, "--top-k", 3, "--skip-errors")
    with (tmp_path / "predict.csv").open(newline="") as file:
        expected = sorted(csv.DictReader(file), key=lambda row: row["path"])
    out = tmp_path / "ray.parquet"
    out.mkdir()
    (out / "stale.parquet").write_text("replaced")
    with pytest.raises(OutputExistsError, match=f"{out}: already exists"):
        ray_predict(photos, SHIPPED, out)
    ray_predict(photos, SHIPPED, out, top_k=3, batch_size=BATCH, force=True, actor_class=DiesOnce)
    assert evidence.exists() and not marker.exists()  # an actor did die
    schema, rows = read_rows(out)
    assert schema.names == [*expected[0].keys(), "error"]
    assert len({r["path"] for r in rows}) == len(rows) == 12  # none lost, none twice
    good = [r for r in rows if r["error"] is None]
    assert [r["path"] for r in good] == [r["path"] for r in expected]
    for got, row in zip(good, expected, strict=True):
        for rank in (1, 2, 3):
            assert got[f"label_{rank}"] == row[f"label_{rank}"]
            probability = float(row[f"probability_{rank}"])
            assert abs(got[f"probability_{rank}"] - probability) <= TOLERANCE
    assert_the_broken_files_failed(rows, str(photos))
    assert all(r["label_1"] is None and r["probability_3"] is None for r in rows if r["error"])
    assert "stale.parquet" not in {p.name for p in out.iterdir()}


# ------------------------------------------------------------ without a cluster
def test_refusals_come_before_ray_starts(photos: Path, tmp_path: Path) -> None:
    from vit_core.distributed import ray_embed, ray_predict

    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="pass --force to replace it"):
        ray_embed(photos, SHIPPED, tmp_path / "out")
    with pytest.raises(InputError, match="reserves GPUs for actors whose torch model would run"):
        ray_embed(photos, SHIPPED, tmp_path / "new", num_gpus_per_actor=1)
    with pytest.raises(InputError, match="top_k=0: needs at least 1"):
        ray_predict(photos, SHIPPED, tmp_path / "new", top_k=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_ray_the_error_names_the_extra(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vit_core.distributed import ray_embed

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    with pytest.raises(ImportError, match=r"pip install 'vit-twin\[ray\]'"):
        ray_embed(photos, SHIPPED, tmp_path / "out")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-o", "e.npy", "--ray"), "e.npy: --ray writes a folder of Parquet files"),
        (("-o", "e.parquet", "--ray", "auto", "--resume"), "--resume is not available"),
    ],
    ids=["npy", "resume"],
)
def test_embed_ray_refusals_on_the_command_line(
    photos: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    assert main(["embed", str(photos), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def fake_cluster(cpus: int, gpus: int = 0, nodes: int = 1) -> Any:
    """What `actor_pool` asks of `ray`: the cluster's resources, and its nodes'."""
    per_node = {"CPU": cpus // nodes, "GPU": gpus // nodes}
    return SimpleNamespace(
        cluster_resources=lambda: {"CPU": float(cpus), "GPU": float(gpus)},
        nodes=lambda: [{"Alive": True, "Resources": per_node}] * nodes,
    )


def test_the_pool_fits_the_cluster() -> None:
    from vit_core.distributed import actor_pool

    assert actor_pool(fake_cluster(16), None, 0, batches=100) == (16, 1)  # one per CPU
    assert actor_pool(fake_cluster(16), None, 0, batches=3) == (3, 5)  # one per batch
    assert actor_pool(fake_cluster(16), 2, 0, batches=100) == (2, 8)
    assert actor_pool(fake_cluster(16, nodes=4), 1, 0, batches=100) == (1, 4)  # one node's
    assert actor_pool(fake_cluster(16, gpus=4, nodes=2), None, 1, batches=100) == (4, 4)
    assert actor_pool(fake_cluster(16, gpus=4, nodes=2), None, 0.5, batches=100) == (8, 2)
    with pytest.raises(InputError, match="num_actors=3 needs 1 CPU each; the Ray cluster has 2"):
        actor_pool(fake_cluster(2), 3, 0, batches=100)
    with pytest.raises(InputError, match="needs 1 GPU.s. each; the Ray cluster has 0 GPU"):
        actor_pool(fake_cluster(2), None, 1, batches=100)
