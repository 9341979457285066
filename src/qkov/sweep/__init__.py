"""Many runs: the grid of seeds and settings, trained and analysed, in a directory that survives crashes.

``sweep(task, seeds, grid, out=DIR)`` trains one run per point of the cartesian product of
``seeds`` and the ``grid``'s value lists (``{"lr": ["1e-3", "3e-3"]}``, as ``qkov sweep --set
lr=1e-3,3e-3`` passes them), each into ``DIR/<name>`` exactly as ``qkov train`` writes a run
(``qkov.train(task, out=...)``) under a name such as ``seed0007-max_len=4-min_len=4-<hash>``;
then analyses it (``summary.json``, as ``qkov analyze --json`` prints it), certifies it where
``qkov.certify`` applies, and records it (``sweep.json``, and its row in ``DIR/qkov.db``: see
:mod:`qkov.registry`). Only this process, the driver, writes the registry.

Backends (:mod:`.pools`): ``local`` (default), worker processes with one torch thread each;
``ray``, Ray tasks on a local or remote cluster (``pip install 'qkov[ray]'``); ``serial``, one
point after another in this process. A point already done (its ``sweep.json`` says so, for the
same config hash) is skipped, so a sweep killed at any moment is finished by running it again,
and a third run trains nothing. A point that fails is recorded with its one-line error and tried
again up to ``retries`` more times; the others go on.

>>> import qkov, tempfile
>>> task = qkov.get_task("max", min_len=4, max_len=4)
>>> result = sweep(task, seeds=[0, 1], grid={"steps": ["30"]}, out=tempfile.mkdtemp() + "/s",
...                backend="serial", quiet=True)
>>> [(r["seed"], r["status"]) for r in result.rows], result.trained
([(0, 'done'), (1, 'done')], 2)
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import registry, store
from ..errors import QkovError
from ..tasks import Task, get_task
from .grid import Point, check_sweep_dir, parse_grid, parse_seeds, plan, run_name
from .pools import LocalPool, RayPool, SerialPool
from .worker import train_point

__all__ = ["BACKENDS", "Point", "SweepResult", "check_sweep_dir", "parse_grid", "parse_seeds", "plan", "run_name",
           "sweep", "train_point"]

BACKENDS = ("local", "ray", "serial")


@dataclass
class SweepResult:
    """What a sweep did: ``rows`` (the registry rows of its points, in grid order), how many
    points it ``trained`` now and ``skipped`` (already done), and ``failed`` (name -> error)."""

    out: Path
    rows: list[dict[str, Any]]
    trained: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def text(self) -> str:
        """The end-of-sweep summary in words."""
        done = sum(r["status"] == "done" for r in self.rows)
        lines = [f"{done} of {len(self.rows)} runs done in {self.out} ({self.trained} trained now, "
                 f"{self.skipped} already done; {self.elapsed_s:.1f} s)"]
        if self.failed:
            lines.append(f"{len(self.failed)} failed:")
            lines += [f"  {name}: {error}" for name, error in self.failed.items()]
        return "\n".join(lines)


def _job(p: Point, out: Path, attempt: int, threads: int) -> dict[str, Any]:
    d = p.rc.to_dict()
    return {"task": d["task"], "model": d["model"], "train": d["train"], "seed": p.seed, "hash": p.hash,
            "path": str(out / p.name), "attempt": attempt, "threads": threads}


def _row_without_dir(p: Point, out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The row of a point that failed before its run directory existed."""
    return {"name": p.name, "path": str(out / p.name), "hash": p.hash, "task": p.rc.task.name, "seed": p.seed,
            "settings": registry.settings_of(p.rc), "status": "failed", "error": record.get("error"),
            "attempts": record.get("attempt"), "finished": record.get("finished")}


def _pool(backend: str, jobs: int | None, out: Path, address: str | None, retries: int, runtime_env):
    if backend == "ray":
        return RayPool(jobs, address, retries, runtime_env)
    if backend == "serial":
        return SerialPool(1)      # as one worker: a second thread only waits on a busy machine
    cores = os.cpu_count() or 1
    jobs = jobs or cores
    return LocalPool(jobs, max(1, cores // jobs), out)


def _record(out: Path, reg: registry.Registry, p: Point, record: dict[str, Any], files) -> dict[str, Any]:
    """Write what a finished point's worker sent (Ray: its files) and upsert its row."""
    path = out / p.name
    if files:
        store.write_run_files(path, files)
    elif record.get("died") and store.is_run_dir(path):
        store.save_sweep_record(path, record)      # a worker that died wrote no record
    row = registry.row_from_dir(path) or _row_without_dir(p, out, record)
    reg.upsert(row)
    return row


def _drive(pool, todo: list[Point], out: Path, reg: registry.Registry, retries: int, threads: int,
           say: Callable[[str], None]) -> dict[str, str]:
    """Run ``todo`` on ``pool``, retrying failures; returns the points that failed for good."""
    by_hash = {p.hash: p for p in todo}
    queue, inflight, finished, failed = deque((p, 1) for p in todo), 0, 0, {}
    while queue or inflight:
        while queue and pool.room() > 0:
            p, attempt = queue.popleft()
            pool.submit(_job(p, out, attempt, threads))
            inflight += 1
        for job, record, files in pool.wait():
            inflight -= 1
            p = by_hash[job["hash"]]
            row = _record(out, reg, p, record, files)
            if row["status"] == "done":
                finished += 1
                failed.pop(p.name, None)
                acc = f"accuracy {row['accuracy']:.2%}, " if "accuracy" in row else ""
                say(f"[{finished}/{len(todo)}] {p.name}: {acc}train {row.get('train_s') or 0:.1f} s")
            elif record.get("attempt", 1) <= retries:
                say(f"{p.name} failed (attempt {record.get('attempt')}; trying again): {record.get('error')}")
                queue.append((p, job["attempt"] + 1))
            else:
                failed[p.name] = record.get("error") or "failed"
                say(f"{p.name} failed after {record.get('attempt')} attempts: {failed[p.name]}")
    return failed


def sweep(
    task: Task | str,
    seeds: Iterable[int],
    grid: dict[str, list[Any]] | None = None,
    out: str | Path | None = None,
    jobs: int | None = None,
    backend: str = "local",
    address: str | None = None,
    retries: int = 2,
    quiet: bool = False,
    runtime_env: dict[str, Any] | None = None,
) -> SweepResult:
    """Train, analyse and record every point of ``seeds`` x ``grid`` into ``out`` (default
    ``sweeps/<task>``), skipping the points already done; returns a :class:`SweepResult`.

    ``jobs``: workers (local: the machine's cores, one torch thread each; ray: the cluster's
    CPUs). ``address``: a Ray cluster (``ray://host:10001``, ``auto``); ``runtime_env``: Ray's
    runtime environment for the tasks (e.g. ``{"pip": ["qkov"]}``). Bad input (no seeds, an
    unknown key, a value that does not parse, a directory of another task's runs) is a QkovError
    before anything is written.
    """
    started = time.perf_counter()
    if backend not in BACKENDS:
        raise QkovError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if not isinstance(retries, int) or retries < 0:
        raise QkovError(f"retries={retries!r} must be an integer >= 0")
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise QkovError(f"jobs={jobs!r} must be a positive integer")
    if address is not None and backend != "ray":
        raise QkovError("--address is for --backend ray; drop it, or pass --backend ray")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise QkovError("--backend ray needs Ray, which is not installed; pip install 'qkov[ray]'")
    base = get_task(task) if isinstance(task, str) else task
    points = plan(base, list(seeds), grid)
    out = Path(out) if out is not None else Path("sweeps") / base.name
    check_sweep_dir(out, base.name)
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    store.ensure_dir(out)                   # an OS failure is store's one line, naming the path
    with registry.writer_lock(out):
        reg = registry.Registry(out, write=True)
        try:
            status = {r["hash"]: r["status"] for r in reg.sync()}
            todo = [p for p in points if status.get(p.hash) != "done"]
            failed: dict[str, str] = {}
            if todo:
                pool = _pool(backend, jobs, out, address, retries, runtime_env)
                try:
                    threads = getattr(pool, "threads", 1)
                    failed = _drive(pool, todo, out, reg, retries, threads, say)
                finally:
                    pool.close()
            rows = {r["hash"]: r for r in reg.rows()}
        finally:
            reg.close()
    return SweepResult(out, [rows[p.hash] for p in points], len(todo) - len(failed), len(points) - len(todo), failed,
                       round(time.perf_counter() - started, 3))
