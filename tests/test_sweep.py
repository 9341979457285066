"""qkov sweep: the grid, runs written as qkov train writes them, skipping what is done, failures
recorded and retried, bad input refused before anything is written, and (slow) a driver or a
worker SIGKILLed mid-sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qkov
from qkov import registry, store
from qkov.cli import main
from qkov.store import RunConfig
from qkov.sweep import parse_grid, parse_seeds, plan, sweep
from qkov.tasks import configure

MAX4 = qkov.get_task("max", min_len=4, max_len=4)


def test_seeds_and_grid_parse():
    assert parse_seeds("0:151") == list(range(151))
    assert parse_seeds("3") == [3] and parse_seeds("0:2,7") == [0, 1, 7]
    assert parse_grid(["lr=1e-3,3e-3", "betas=[0.9,0.98],(0.9,0.999)"]) == {
        "lr": ["1e-3", "3e-3"], "betas": ["[0.9,0.98]", "(0.9,0.999)"]}
    points = plan("max", [0, 1], parse_grid(["lr=1e-3,3e-3", "betas=[0.9,0.98],(0.9,0.999)"]))
    assert len(points) == 8 and len({p.hash for p in points}) == 8
    assert {p.rc.train.betas for p in points} == {(0.9, 0.98), (0.9, 0.999)}
    # Two spellings of one value are one point; the name is a function of the config alone.
    assert [p.name for p in plan("max", [0], {"lr": ["3e-3", "0.003"]})] == [plan("max", [0], {"lr": ["3e-3"]})[0].name]
    assert plan(MAX4, [5], None)[0].name.startswith("seed0005-max_len=4-min_len=4-")


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "5:5"], "--seeds 5:5 is an empty range; expected A:B with B > A"),
    (["--seeds", "a:b"], "--seeds 'a:b' does not parse"),
    (["--seeds", "0:2", "--set", "foo=1,2"], "unknown key 'foo' for task 'max'"),
    (["--seeds", "0:2", "--set", "lr=1e-3,fast"], "lr='fast' is not a number"),
    (["--seeds", "0:2", "--set", "lr=1e-3,"], "has an empty value"),
    (["--seeds", "0:2", "--set", "steps=10,2.5"], "steps='2.5' is not an integer"),
    (["--seeds", "0:2", "--address", "auto"], "--address is for --backend ray"),
])
def test_bad_input_one_line_exit_2_nothing_written(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "max", "--out", "s", "--backend", "serial", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qkov: ") and err.count("\n") == 1, err
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_directory_of_another_task_is_refused(capsys, tmp_path):
    other = tmp_path / "s" / "seed0000-add"
    task, m, t = configure("add", {})
    store.write_config(other, RunConfig(task, m, t, 0))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(["sweep", "max", "--seeds", "0:2", "--out", str(tmp_path / "s"), "--backend", "serial"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds runs of task 'add' (seed0000-add), not 'max'" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """Two learning rates of a 30-step max-of-4 run, one seed, trained in this process."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    return sweep(MAX4, seeds=[0], grid={"lr": ["3e-3", "3e-2"], "steps": ["30"]}, out=out, backend="serial",
                 quiet=True)


def test_runs_are_written_as_qkov_train_writes_them(small_sweep, tmp_path):
    assert small_sweep.trained == 2 and not small_sweep.failed
    row = small_sweep.rows[0]
    assert row["status"] == "done" and row["settings"] == {"min_len": 4, "max_len": 4, "steps": 30, "lr": 0.003}
    path = Path(row["path"])
    task, m, t = configure(MAX4, {"lr": "3e-3", "steps": "30"})
    ref = qkov.train(task, out=tmp_path / "ref", seed=0, model_config=m, train_config=t, quiet=True)
    assert (path / store.MODEL).read_bytes() == (ref.path / store.MODEL).read_bytes()
    assert json.loads((path / store.CONFIG).read_text()) == json.loads((ref.path / store.CONFIG).read_text())
    summary = store.load_summary(path)
    assert summary == qkov.analyze(store.load(path), task).to_dict()
    assert row["accuracy"] == summary["eval"]["accuracy"]
    assert row["copying_score"] == summary["heads"][0]["copying_score"]
    assert row["top_key_is_max"] == summary["attention"]["top_key_is_max"]


def test_the_certified_bound_is_in_the_row_where_certify_applies(small_sweep):
    certify = pytest.importorskip("qkov.certify")
    row = small_sweep.rows[0]
    cert = certify.certify(store.load(row["path"]), store.read_config(row["path"]).task, exact_limit=0).to_dict()
    assert row["certified_bound"] == max(cert["lengths"]["4"]["bounds"].values())
    assert row["certify_s"] > 0


def test_a_second_start_trains_nothing(small_sweep):
    mtimes = {r["name"]: (Path(r["path"]) / store.MODEL).stat().st_mtime_ns for r in small_sweep.rows}
    again = sweep(MAX4, seeds=[0], grid={"lr": ["3e-3", "3e-2"], "steps": ["30"]}, out=small_sweep.out,
                  backend="serial", quiet=True)
    assert (again.trained, again.skipped) == (0, 2)
    assert mtimes == {r["name"]: (Path(r["path"]) / store.MODEL).stat().st_mtime_ns for r in again.rows}
    assert again.rows == small_sweep.rows


def test_a_failing_run_is_recorded_retried_and_the_others_go_on(tmp_path, capsys):
    result = sweep(MAX4, seeds=[0], grid={"lr": ["1e-2", "1e9"], "steps": ["5"]}, out=tmp_path / "s",
                   backend="serial", retries=1, quiet=True)
    ok, bad = result.rows
    assert ok["status"] == "done" and bad["status"] == "failed" and bad["attempts"] == 2
    assert bad["error"].startswith("the training loss became NaN at step") and "\n" not in bad["error"]
    assert result.failed == {bad["name"]: bad["error"]} and "1 failed:" in result.text()
    assert store.load_sweep_record(bad["path"])["status"] == "failed"
    code = main(["sweep", "max", "--seeds", "0", "--set", "min_len=4", "--set", "max_len=4", "--set", "lr=1e-2,1e9",
                 "--set", "steps=5", "--out", str(tmp_path / "s"), "--backend", "serial", "--retries", "0", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "1 of 2 runs done" in out and "(0 trained now, 1 already done" in out and "NaN" in out


def test_sweep_page(small_sweep, capsys):
    assert main(["report", str(small_sweep.out)]) == 0
    page = (small_sweep.out / "report.html").read_text()
    assert "2 of 2 runs are done." in page and 'id="runs"' in page and "fig-accuracy" in page
    assert small_sweep.rows[0]["name"] in page
    code = main(["report", str(small_sweep.out), "--png", str(small_sweep.out / "png")])
    assert code == 2 and "--png draws one run's figures" in capsys.readouterr().err


# ----------------------------------------------------------------------- kill tests (real processes)
def _qkov(*argv: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from qkov.cli import main; sys.exit(main())", *argv]


KILL_ARGS = ("sweep", "max", "--seeds", "0:6", "--set", "min_len=4", "--set", "max_len=4", "--set", "steps=300",
             "--jobs", "2", "--quiet")


def _done_rows(out: Path) -> int:
    return sum(r["status"] == "done" for r in registry.read_rows(out)) if (out / registry.DB).is_file() else 0


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _check_every_point_once(out: Path, n: int) -> list[dict]:
    rows = registry.read_rows(out)
    dirs = registry.run_dirs(out)
    assert len(rows) == len(dirs) == n and len({r["hash"] for r in rows}) == n
    assert all(r["status"] == "done" for r in rows)
    for r in rows:          # each registry row agrees with its run directory
        assert r == registry.row_from_dir(r["path"])
    return rows


@pytest.mark.slow
def test_sigkill_of_the_driver_then_rerun_finishes_every_point_exactly_once(tmp_path):
    out = tmp_path / "s"
    driver = subprocess.Popen(_qkov(*KILL_ARGS, "--out", str(out)))
    try:
        _wait(lambda: _done_rows(out) >= 2 or driver.poll() is not None, 300, "two finished runs")
        assert driver.poll() is None, "the sweep finished before it could be killed; give it more steps"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert 2 <= _done_rows(out) < 6
    second = subprocess.run(_qkov(*KILL_ARGS, "--out", str(out)), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    rows = _check_every_point_once(out, 6)
    mtimes = {r["name"]: (Path(r["path"]) / store.MODEL).stat().st_mtime_ns for r in rows}
    third = subprocess.run(_qkov(*KILL_ARGS, "--out", str(out)), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "(0 trained now, 6 already done" in third.stdout, third.stdout + third.stderr
    assert mtimes == {r["name"]: (Path(r["path"]) / store.MODEL).stat().st_mtime_ns for r in rows}


def _workers_of(pid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and "qkov.sweep.worker" in (proc / "cmdline").read_text() and \
                    int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_a_worker_killed_mid_run_is_retried_without_a_duplicate(tmp_path):
    out = tmp_path / "s"
    args = ["sweep", "max", "--seeds", "0:3", "--set", "min_len=4", "--set", "max_len=4", "--jobs", "2", "--quiet"]
    driver = subprocess.Popen(_qkov(*args, "--out", str(out)), stdout=subprocess.PIPE, text=True)
    try:
        _wait(lambda: len(registry.run_dirs(out)) >= 1 and _workers_of(driver.pid), 120, "a worker training")
        os.kill(_workers_of(driver.pid)[0], signal.SIGKILL)
        stdout, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stdout
    rows = _check_every_point_once(out, 3)
    assert max(r["attempts"] for r in rows) == 2


SERIAL_ARGS = ("sweep", "max", "--seeds", "0:3", "--set", "min_len=4", "--set", "max_len=4", "--set", "steps=200",
               "--backend", "serial", "--quiet")


def _holds_writer_lock(out: Path) -> bool:
    """Whether a driver holds the sweep's writer lock (it has checked its input and is at work)."""
    import fcntl

    if not (out / registry.LOCK).is_file():
        return False
    with open(out / registry.LOCK) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.mark.slow
def test_the_serial_driver_sigkilled_at_random_moments_then_rerun_loses_nothing(tmp_path):
    """With ``--backend serial`` the driver trains, analyses and writes every file itself; killed at
    random moments (at most four times), a rerun finishes every point once, the registry passes
    SQLite's integrity check, no temporary is left, and each model is the uninterrupted sweep's."""
    import random
    import sqlite3

    whole, out = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_qkov(*SERIAL_ARGS, "--out", str(whole)), check=True, capture_output=True, timeout=600)
    rng, kills = random.Random(17), 0
    for _ in range(4):                       # bounded: four kills at most, each wait with a deadline
        driver = subprocess.Popen(_qkov(*SERIAL_ARGS, "--out", str(out)), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            _wait(lambda d=driver: _holds_writer_lock(out) or d.poll() is not None, 120, "the driver to start")
            time.sleep(rng.uniform(0.0, 4.0))    # a random moment: training, analysing or writing a point
            if driver.poll() is not None:
                break                        # it finished first: nothing left to kill
            os.kill(driver.pid, signal.SIGKILL)
            kills += 1
        finally:
            if driver.poll() is None:
                driver.kill()
            driver.wait(10)
    assert kills >= 1, "the sweep finished before it could be killed; give it more steps"
    final = subprocess.run(_qkov(*SERIAL_ARGS, "--out", str(out)), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    rows = _check_every_point_once(out, 3)
    con = sqlite3.connect(f"file:{out / registry.DB}?mode=ro", uri=True)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    assert not list(out.rglob("*.tmp")), sorted(out.rglob("*.tmp"))
    for r in rows:
        assert (Path(r["path"]) / store.MODEL).read_bytes() == (whole / r["name"] / store.MODEL).read_bytes()


def test_a_killed_writers_temporaries_are_swept_when_the_point_is_rerun(tmp_path):
    """A point cut short mid-write (its hidden ``.tmp`` files left, no record): the rerun trains it
    again under the run directory's lock, which sweeps them."""
    out = tmp_path / "s"
    first = sweep(MAX4, seeds=[0], grid={"steps": ["10"]}, out=out, backend="serial", quiet=True)
    path = Path(first.rows[0]["path"])
    (path / store.SWEEP_RECORD).unlink()
    (path / store.MODEL).unlink()
    left = [path / ".model.safetensors.k1ll3d.tmp", path / store.CHECKPOINTS / ".step_10.safetensors.k1ll3d.tmp"]
    for f in left:
        f.write_bytes(b"half")
    again = sweep(MAX4, seeds=[0], grid={"steps": ["10"]}, out=out, backend="serial", quiet=True)
    assert (again.trained, again.rows[0]["status"]) == (1, "done")
    assert not any(f.exists() for f in left) and not list(out.rglob("*.tmp"))
