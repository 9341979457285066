"""The Ray backend on a local two-CPU cluster bound to 127.0.0.1 (no dashboard, no usage
reporting): the same weights as the local pool, bit for bit, and a worker killed mid-run retried
without a duplicate run. Skipped where Ray is not installed (the test extra installs it)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

# Read when ray is imported: a one-machine cluster on the loopback address, nothing reported.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_worker_niceness", "0")       # as the local cluster qkov starts itself
ray = pytest.importorskip("ray")

import qkov  # noqa: E402
from qkov import registry, store  # noqa: E402
from qkov.sweep import sweep  # noqa: E402

MAX4 = qkov.get_task("max", min_len=4, max_len=4)
GRID = {"steps": ["600"]}
SEEDS = [0, 1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole test session (starting one costs seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="warning")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The same points through the local pool of worker processes."""
    return sweep(MAX4, SEEDS, GRID, out=tmp_path_factory.mktemp("local") / "s", jobs=2, quiet=True)


def _same_runs(a, b) -> None:
    assert [r["name"] for r in a.rows] == [r["name"] for r in b.rows]
    for x, y in zip(a.rows, b.rows):
        assert (Path(x["path"]) / store.MODEL).read_bytes() == (Path(y["path"]) / store.MODEL).read_bytes()
        assert store.load_summary(x["path"]) == store.load_summary(y["path"])
        assert (Path(x["path"]) / store.CONFIG).read_bytes() == (Path(y["path"]) / store.CONFIG).read_bytes()


@pytest.mark.slow
def test_the_cluster_is_on_the_loopback_address(ray_cluster):
    assert {n["NodeManagerAddress"] for n in ray_cluster.nodes()} == {"127.0.0.1"}
    assert ray_cluster.cluster_resources()["CPU"] == 2


@pytest.mark.slow
def test_ray_gives_the_local_pools_weights_bit_for_bit(ray_cluster, local_reference, tmp_path):
    result = sweep(MAX4, SEEDS, GRID, out=tmp_path / "s", backend="ray", quiet=True)
    assert result.trained == 2 and all(r["status"] == "done" for r in result.rows)
    _same_runs(result, local_reference)
    again = sweep(MAX4, SEEDS, GRID, out=tmp_path / "s", backend="ray", quiet=True)
    assert (again.trained, again.skipped) == (0, 2)


def _ray_point_workers() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::ray_point"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes through /proc")
def test_a_ray_worker_killed_mid_run_is_retried_without_a_duplicate(ray_cluster, local_reference, tmp_path):
    out = tmp_path / "s"
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(result=sweep(MAX4, SEEDS, GRID, out=out, backend="ray",
                                                                      quiet=True)))
    thread.start()
    deadline, killed = time.monotonic() + 120, None
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        workers = _ray_point_workers()
        if workers:
            time.sleep(0.5)                  # mid-run, not at its first line
            os.kill(workers[0], signal.SIGKILL)
            killed = workers[0]
        time.sleep(0.05)
    thread.join(600)
    assert killed is not None, "no Ray worker was seen running a point"
    assert not thread.is_alive() and "result" in done
    result = done["result"]
    rows = registry.read_rows(out)
    assert len(rows) == len(registry.run_dirs(out)) == 2 and len({r["hash"] for r in rows}) == 2
    assert all(r["status"] == "done" and r == registry.row_from_dir(r["path"]) for r in rows)
    _same_runs(result, local_reference)
