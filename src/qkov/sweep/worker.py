"""One point of a sweep, as a worker runs it: :func:`train_point` trains, analyses and certifies
it into its run directory and returns its record; :func:`main` is the local pool's worker
process (jobs in, records out, over two pipes); :func:`ray_point` is the Ray task.

A worker process is a fresh ``sys.executable`` that imports this module, never a re-run of the user's
``__main__`` (as multiprocessing's spawn would), so a script that calls ``qkov.sweep`` needs no
``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import store
from ..analyze import analyze
from ..config import ModelConfig, TrainConfig
from ..errors import QkovError
from ..tasks import task_from_dict
from ..train import train

try:  # the certify room may not exist yet: certify where it does and applies
    from ..certify import certify as _certify
except Exception:  # noqa: BLE001 (ImportError, or a room still being built)
    _certify = None

__all__ = ["died", "ray_point", "train_point"]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(e, QkovError) else f"{type(e).__name__}: {msg}"


def _certified(model, task) -> tuple[float | None, dict[str, Any] | None]:
    """``qkov.certify``'s proofs of ``model`` where they apply (no brute force: the proofs are the
    cheap part, ~0.3 s for max-of-4): the best bound at the worst length, and per length each
    proof's bound and seconds. (None, None) where certify is missing or does not apply."""
    if _certify is None:
        return None, None
    try:
        try:
            cert = _certify(model, task, exact_limit=0)
        except TypeError:            # another signature: the defaults
            cert = _certify(model, task)
    except QkovError:                # a model or task the proofs do not fit
        return None, None
    d = cert.to_dict() if hasattr(cert, "to_dict") else dict(cert)
    lengths = {n: {k: v for k, v in one.items() if k in ("bounds", "exact", "seconds")}
               for n, one in (d.get("lengths") or {}).items()}
    best = [max(b for b in one.get("bounds", {}).values() if b is not None)
            for one in lengths.values() if any(b is not None for b in one.get("bounds", {}).values())]
    return (min(best) if best else None), {"lengths": lengths}


def train_point(job: dict[str, Any]) -> dict[str, Any]:
    """Train, analyse and certify one point into ``job["path"]``; returns its sweep record (also
    saved as the run's ``sweep.json`` once the run directory exists). Never raises for the run's
    own failure: the record says ``failed`` with the one-line error."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(job["threads"])
    try:
        return _train_point(job)
    finally:
        torch.set_num_threads(threads)     # the serial pool runs points in the caller's process


def _train_point(job: dict[str, Any]) -> dict[str, Any]:
    path = Path(job["path"])
    record: dict[str, Any] = {"hash": job["hash"], "seed": job["seed"], "attempt": job["attempt"],
                              "host": socket.gethostname(), "status": "failed"}
    # The run directory's lock, as qkov train takes it: it sweeps the temporaries a killed
    # worker (or a killed serial driver) left mid-write, and keeps the point to one writer.
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(store.run_lock(path))
            t0 = time.perf_counter()
            train(task_from_dict(job["task"]), out=path, seed=job["seed"],
                  model_config=ModelConfig.from_dict(job["model"]), train_config=TrainConfig.from_dict(job["train"]),
                  quiet=True)
            t1 = time.perf_counter()
            run = store.load_run(path)
            store.save_summary(path, analyze(run.model, run.task, checkpoints=run.checkpoints()).to_dict())
            t2 = time.perf_counter()
            bound, cert = _certified(run.model, run.task)
            record.update(status="done", train_s=round(t1 - t0, 3), analyze_s=round(t2 - t1, 3),
                          certify_s=round(time.perf_counter() - t2, 3) if cert is not None else None,
                          certified_bound=bound, certify=cert)
        except Exception as e:  # noqa: BLE001 (a run's failure is data: recorded, retried, reported)
            record["error"] = _one_line(e)
        record["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        if store.is_run_dir(path):
            store.save_sweep_record(path, record)
    return record


def ray_point(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A Ray task: the point trained in a temporary directory on whatever node runs it, and the
    run's files returned for the driver to write (no shared filesystem needed)."""
    with tempfile.TemporaryDirectory(prefix="qkov-ray-") as tmp:
        record = train_point({**job, "path": str(Path(tmp) / "run")})
        run = Path(tmp) / "run"
        return record, store.run_files(run) if store.is_run_dir(run) else {}


# ----------------------------------------------------------------------- the local pool
def died(job: dict[str, Any], error: str) -> dict[str, Any]:
    """The record of a point whose worker died before it could send one."""
    return {"hash": job["hash"], "seed": job["seed"], "attempt": job["attempt"], "status": "failed", "error": error,
            "died": True, "finished": datetime.now(UTC).isoformat(timespec="seconds")}


def _die_with_parent(parent: int) -> None:
    """Exit when the driver dies, even by SIGKILL: Linux's parent-death signal, and a watchdog
    thread elsewhere, so no orphan keeps writing into the sweep directory."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str]) -> None:
    """The local pool's worker: ``READ_FD WRITE_FD THREADS LOCK PARENT_PID``. Reads pickled jobs
    from READ_FD until EOF or None, writes each point's record to WRITE_FD; holds LOCK shared
    while it lives, so a new driver can wait until no worker of a killed one is left."""
    from multiprocessing.connection import Connection

    read_fd, write_fd, threads, lock_path, parent = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the driver decides what Ctrl-C stops
    _die_with_parent(int(parent))
    import torch

    torch.set_num_threads(int(threads))
    jobs, records = Connection(int(read_fd), writable=False), Connection(int(write_fd), readable=False)
    with open(lock_path, "a") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_SH)
        except ImportError:
            pass
        while True:
            try:
                job = jobs.recv()
            except (EOFError, OSError):
                return
            if job is None:
                return
            records.send(train_point(job))

