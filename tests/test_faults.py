"""Faults lose nothing: a full disk during training leaves every earlier file loadable and says
what failed; SIGKILL at a random moment of ``qkov train`` followed by ``--resume`` (or a rerun)
ends in the same weights as an uninterrupted run; two ``qkov train`` aimed at one ``--out``
cannot interleave (the second refuses with one line); ``qkov certify`` killed mid-way leaves the run
as it was and no half-printed JSON. (SIGKILL of ``qkov sweep``: tests/test_sweep.py.)"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from test_hostile import assert_clean, cli

from qkov import store

QKOV = [sys.executable, "-m", "qkov"]


@contextlib.contextmanager
def small_disk(size: int, mount: bool = True):
    """A folder on a file system of ``size`` bytes: a tmpfs the test mounts (as root, where
    permitted), otherwise a fault-injecting writer that fails with ENOSPC past ``size`` bytes."""
    root = Path(tempfile.mkdtemp(prefix="qkov-disk-"))
    mounted = mount and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)], capture_output=True).returncode == 0
    if mounted:
        try:
            yield root
        finally:
            subprocess.run(["umount", str(root)], check=False)
            root.rmdir()
        return
    used = [0]
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            used[0] += len(data)
            if used[0] > size:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    store.os.fdopen = lambda fd, *a, **k: Full(real(fd, *a, **k))
    try:
        yield root
    finally:
        store.os.fdopen = real


def loadable_everything(run: Path) -> list[str]:
    """Load every file of ``run``; returns what was loaded (raises on anything damaged)."""
    rc = store.read_config(run)
    seen = ["config.json"]
    for step, f in store.checkpoint_paths(run):
        store.load_checkpoint(f, rc.model)
        seen.append(f"step_{step}")
    if (run / store.TRAIN_STATE).is_file():
        store.load_train_state(run, rc.model)
        seen.append("train_state")
    store.read_metrics(run)
    return seen


@pytest.mark.parametrize("mount", [True, False], ids=["tmpfs", "injected"])
def test_full_disk_during_checkpoints_keeps_earlier_files(mount):
    with small_disk(400_000, mount) as disk:
        run = disk / "run"
        code, _, err = cli(["train", "max", "--out", str(run), "--steps", "200", "--quiet",
                            "--set", "checkpoint_every=2", "--set", "eval_every=2", "--set", "batch_size=16"])
        assert code == 2 and ("disk is full" in err or "No space" in err), err
        assert_clean(code, err, run)
        seen = loadable_everything(run)
        assert "step_0" in seen and len(seen) >= 3, seen


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return store.model_tensors(store.load_run(run).model)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_then_resume_gives_the_same_weights(tmp_path, seed):
    args = ["max", "--steps", "1000", "--quiet", "--set", "threads=1", "--set", "batch_size=64",
            "--set", "checkpoint_every=5", "--set", "eval_every=5"]
    subprocess.run([*QKOV, "train", *args, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen([*QKOV, "train", *args, "--out", str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while not (run / store.TRAIN_STATE).exists() and proc.poll() is None and time.monotonic() - start < 120:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 1.0))  # a random moment of the training loop
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not store.is_finished(run)  # killed mid-run (1000 steps take longer than the wait)
    loadable_everything(run)  # a killed writer may leave its hidden temporary; loads ignore it
    if not store.is_finished(run):
        again = [*QKOV, "train", "--resume", str(run), "--quiet"] if (run / store.TRAIN_STATE).is_file() \
            else [*QKOV, "train", *args, "--out", str(run)]
        done = subprocess.run(again, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert not list(run.rglob("*.tmp")), sorted(run.rglob("*"))  # the next writer swept them
    a, b = _weights(tmp_path / "whole"), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_trainers_on_one_out_cannot_interleave(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([*QKOV, "train", "max", "--steps", "100000", "--quiet", "--out", str(run)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start = time.monotonic()
        while not (run / store.CONFIG).exists() and time.monotonic() - start < 120:
            time.sleep(0.05)
        second = subprocess.run([*QKOV, "train", "max", "--steps", "10", "--out", str(run)],
                                capture_output=True, text=True)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "another qkov process is writing" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


@pytest.mark.parametrize("mount", [True, False], ids=["tmpfs", "injected"])
def test_full_disk_keeps_the_earlier_file(mount):
    """A report, summary or config rewritten on a full disk: one line, the old file as it was."""
    with small_disk(200_000, mount) as disk:
        page = disk / "report.html"
        store.atomic_write_bytes(page, b"old" * 20_000)
        with pytest.raises(store.QkovError, match=r"cannot write .*report.html .*the disk is full"):
            store.atomic_write_bytes(page, b"new" * 60_000)
        assert page.read_bytes() == b"old" * 20_000
        assert not list(disk.glob("*.tmp"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


@pytest.mark.slow
def test_sigkill_of_certify_leaves_nothing_half_written(tmp_path):
    """``qkov certify DIR --json > FILE`` writes nothing into the run (it reads it and prints), and
    prints its JSON only once the proofs are done: SIGKILLed mid-way (brute force over 64**6 inputs
    runs for minutes), the run is byte for byte as it was, FILE is empty rather than half a JSON
    object, and a rerun prints the whole certificate."""
    import json

    run = tmp_path / "run"
    code, _, err = cli(["train", "max", "--out", str(run), "--steps", "20", "--quiet", "--set", "batch_size=64",
                        "--set", "checkpoint_every=10"])
    assert code == 0, err
    before = _files(run)
    rng = random.Random(3)
    for attempt in range(2):              # bounded: two kills, each after at most a few seconds
        out = tmp_path / f"cert{attempt}.json"
        with open(out, "wb") as f:
            proc = subprocess.Popen([*QKOV, "certify", str(run), "--json", "--exact-limit", str(64 ** 6)],
                                    stdout=f, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.0, 6.0))   # importing, loading the run, or proving
            assert proc.poll() is None, "certify finished before it could be killed"
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert out.read_bytes() == b""
        assert _files(run) == before and not list(run.rglob("*.tmp"))
    done = subprocess.run([*QKOV, "certify", str(run), "--json", "--length", "3"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)["lengths"]) == {"3"}
    assert _files(run) == before
