"""Where a sweep's points run: :class:`LocalPool` (worker processes on this machine),
:class:`RayPool` (Ray tasks on a local or remote cluster) and :class:`SerialPool` (this process).

Every pool has ``room()`` (how many more points it takes now), ``submit(job)``, ``wait()`` (at
least one ``(job, record, files)`` that finished: ``files`` is the run's files for the driver to
write, or None where the worker wrote them in place) and ``close()``. What a worker does with a
job is :func:`qkov.sweep.worker.train_point`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from ..errors import QkovError
from .worker import died, ray_point, train_point

__all__ = ["LocalPool", "RayPool", "SerialPool"]

WORKER_LOCK = ".qkov-workers.lock"


class _Worker:
    """One worker process (:func:`qkov.sweep.worker.main`) and its two pipes."""

    def __init__(self, threads: int, lock: Path):
        from multiprocessing.connection import Connection

        job_r, job_w = os.pipe()
        rec_r, rec_w = os.pipe()
        entry = "import sys; from qkov.sweep.worker import main; main(sys.argv[1:])"
        cmd = [sys.executable, "-c", entry, str(job_r), str(rec_w), str(threads), str(lock), str(os.getpid())]
        self.proc = subprocess.Popen(cmd, pass_fds=(job_r, rec_w), stdin=subprocess.DEVNULL)
        os.close(job_r)
        os.close(rec_w)
        self.jobs, self.records = Connection(job_w, readable=False), Connection(rec_r, writable=False)

    def stop(self, kill: bool) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.jobs.send(None)
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.jobs.close()
        self.records.close()


class LocalPool:
    """``jobs`` worker processes on this machine, ``threads`` torch threads each; a worker that
    dies (killed, out of memory) is replaced and its point reported as failed."""

    def __init__(self, jobs: int, threads: int, out: Path):
        self.jobs, self.threads, self.lock = jobs, threads, out / WORKER_LOCK
        _wait_for_orphans(self.lock)
        self.idle: list[_Worker] = []
        self.busy: dict[_Worker, dict[str, Any]] = {}

    def room(self) -> int:
        return self.jobs - len(self.busy)

    def submit(self, job: dict[str, Any]) -> None:
        worker = self.idle.pop() if self.idle else _Worker(self.threads, self.lock)
        worker.jobs.send(job)
        self.busy[worker] = job

    def wait(self) -> list[tuple[dict[str, Any], dict[str, Any], None]]:
        from multiprocessing.connection import wait

        ready = set(wait([w.records for w in self.busy]))
        done = []
        for worker in [w for w in self.busy if w.records in ready]:
            job = self.busy.pop(worker)
            try:
                record = worker.records.recv()
                self.idle.append(worker)
            except (EOFError, OSError):              # the pipe closed: the worker is gone
                worker.stop(kill=True)
                record = died(job, f"the worker process died (exit code {worker.proc.returncode}): "
                                   f"killed, or out of memory")
            done.append((job, record, None))
        return done

    def close(self) -> None:
        for w in self.idle:
            w.stop(kill=False)
        for w in self.busy:
            w.stop(kill=True)
        self.idle, self.busy = [], {}


def _wait_for_orphans(lock: Path, timeout: float = 30.0) -> None:
    """Wait until no worker of an earlier, killed driver is left (they hold ``lock`` shared)."""
    try:
        import fcntl
    except ImportError:
        return
    deadline = time.monotonic() + timeout
    with open(lock, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise QkovError(f"workers of an earlier sweep still run in {lock.parent}; stop them, then "
                                    f"run the sweep again") from None
                time.sleep(0.1)



class SerialPool:
    """One point at a time, in this process."""

    def __init__(self, threads: int):
        self.threads, self.queue = threads, deque()

    def room(self) -> int:
        return 1 - len(self.queue)

    def submit(self, job: dict[str, Any]) -> None:
        self.queue.append(job)

    def wait(self):
        job = self.queue.popleft()
        return [(job, train_point(job), None)]

    def close(self) -> None:
        pass


class RayPool:
    """Points as Ray tasks (one CPU each) on the cluster at ``address``, or on a local one started
    here and bound to 127.0.0.1 (no dashboard, no usage reporting) when ``address`` is None; an
    already initialised Ray is used as it is. A task whose worker dies is retried by Ray
    (``retries`` times); its files come back to the driver, so nodes need no shared filesystem."""

    def __init__(self, jobs: int | None, address: str | None, retries: int, runtime_env: dict | None = None):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address is None and "ray" not in sys.modules:
            # A one-machine cluster: Ray then binds every server to 127.0.0.1, not to the address
            # other machines would reach it at (read when ray is imported).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if address is None:
            # Ray runs its workers at nice 15; on a machine that is busy with anything else that
            # starves them (measured: several times slower than the local pool's workers).
            os.environ.setdefault("RAY_worker_niceness", "0")
        try:
            import ray
        except ImportError:
            raise QkovError("--backend ray needs Ray, which is not installed; pip install 'qkov[ray]'") from None
        self.ray, self.started, self.retries = ray, False, retries
        if not ray.is_initialized():
            common = {"runtime_env": runtime_env, "log_to_driver": False, "logging_level": "warning"}
            try:
                if address:
                    ray.init(address=address, **common)
                else:
                    ray.init(num_cpus=jobs or os.cpu_count(), include_dashboard=False,
                             _node_ip_address="127.0.0.1", **common)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise QkovError(f"could not start or reach a Ray cluster at {address or 'this machine'} "
                                f"({str(e).splitlines()[0][:160]}); check --address") from None
            self.started = True
        self.jobs = jobs or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.remote = ray.remote(num_cpus=1, max_retries=retries)(ray_point)
        self.refs: dict[Any, dict[str, Any]] = {}

    def room(self) -> int:
        return self.jobs - len(self.refs)

    def submit(self, job: dict[str, Any]) -> None:
        self.refs[self.remote.remote(job)] = job

    def wait(self):
        ray = self.ray
        ready, rest = ray.wait(list(self.refs), num_returns=1)
        if rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        done = []
        for ref in ready:
            job = self.refs.pop(ref)
            try:
                record, files = ray.get(ref)
            except ray.exceptions.RayError as e:       # the worker died more often than Ray retries
                text = str(e).strip().splitlines()
                record = died({**job, "attempt": job["attempt"] + self.retries},
                               f"{type(e).__name__}: {text[0][:200] if text else 'the Ray task failed'}")
                files = None
            done.append((job, record, files))
        return done

    def close(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        if self.started:
            self.ray.shutdown()
