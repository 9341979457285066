"""How many intra-op threads a training run uses: :class:`ThreadPolicy`.

A second torch thread speeds a large enough step up on an idle machine (two cores: 1.3-1.7x for
add, fib, induction and modadd p = 113) and slows every step down 5-20x when another process holds
a core: torch's OpenMP runtime (libgomp) makes each thread spin at the end of every parallel
region until all have arrived, so a step's hundreds of regions each wait for the thread that
has no core. No fixed choice suits both, and load changes while a run trains, so with
``train.threads = 0`` the policy measures: it starts on one thread, times blocks of steps on
one thread and on several, keeps the faster (by median), and looks again now and then. A
competing process that starts shows in the next step (several threads then run several times
slower than they did) and one that stops shows in the machine's idle time (``/proc/stat``).

Switching mid-run must not change the weights. Two threads split the long inner dimension of a
gradient's matmul (``xᵀ @ grad`` over the batch) differently from one, so the sums round
differently; importing this module turns on MKL's strict conditional numerical reproducibility
(CNR), which makes its matmuls bit-identical for any thread count (measured on one thread:
10-20% slower on those long-inner matmuls, 0-6% on the others, 5-7% of a training step's CPU
time). Where that is not possible (a torch without MKL, ``MKL_CBWR`` set without ``STRICT``, or
MKL already used before qkov was imported) the thread count would change the results, and auto
mode stays on one thread for the whole run.

>>> policy = ThreadPolicy(2)                 # a fixed count: never changed
>>> with policy:
...     policy.step_done(0.01)
...     torch.get_num_threads()
2
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["ThreadPolicy", "thread_count_invariant", "work_per_step"]

# Multiply-adds per step (rough: tokens x d_model x (4 d_model + 2 d_mlp + d_vocab_out)) from
# which a second intra-op thread pays for itself. Measured on 2 cores: max (2e7) ran 4x slower
# with two threads on a busy machine (72 s instead of 16 s wall at load 3) and is no faster with
# them on a quiet one; induction (7e7) 25.7 -> 20.2 ms a step and modadd p=113 (2e9) 97 -> 45 ms
# with two on a quiet one. Below it a run keeps one thread without measuring.
_THREADED_WORK = 5e7

# The adaptive policy's settings, in seconds of training steps (evaluation and saving excluded).
BLOCK = 4                 # steps timed per thread count in a comparison (after one warm-up step)
MARGIN = 0.05             # a count takes over only when its median step is 5% shorter
ABORT = 2.0               # a trial step this many times the incumbent's median ends the trial
COLLAPSE = 3.0            # two steps in a row this many times their recent median on several threads: back to one
FIRST_TRIAL_S = 0.25      # one thread first: under load, a first step on two could take seconds
RECHECK_S = (1.0, 30.0)   # from one comparison to the next: doubles while the incumbent holds
FREE_CORE = 0.5           # idle cores (besides ours) that make a trial of more threads worth it


def work_per_step(rc) -> float:
    """Rough multiply-adds of one training step of ``rc`` (a :class:`qkov.store.RunConfig`):
    rows x tokens x d_model x (4 d_model + 2 d_mlp + d_vocab_out).

    >>> from qkov.store import RunConfig
    >>> from qkov.tasks import get_task
    >>> task = get_task("max")
    >>> work_per_step(RunConfig(task, task.model_config(), task.train_config(), 0)) < _THREADED_WORK
    True
    """
    m, task = rc.model, rc.task
    rows = rc.train.batch_size
    if rows is None:
        rows = len(task.dataset("train")) if task.finite else 1
    return float(rows * task.seq_len * m.d_model * (4 * m.d_model + 2 * (m.d_mlp or 0) + m.vocab_out))


# ----------------------------------------------------------------------- MKL's strict CNR mode
_MKL_CBWR_ALL, _MKL_CBWR_AUTO, _MKL_CBWR_STRICT = -1, 2, 0x10000


def _mkl_cbwr() -> tuple[Callable[[int], int], Callable[[int], int]] | None:
    """MKL's ``cbwr_get`` and ``cbwr_set`` inside torch's CPU library, or None."""
    if not torch.backends.mkl.is_available():
        return None
    candidates = [None] + sorted(str(p) for p in (Path(torch.__file__).parent / "lib").glob("*torch_cpu*"))
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in (("MKL_CBWR_Get", "MKL_CBWR_Set"), ("mkl_serv_cbwr_get", "mkl_serv_cbwr_set")):
            get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
            if get is not None and set_ is not None:
                get.argtypes = set_.argtypes = [ctypes.c_int]
                get.restype = set_.restype = ctypes.c_int
                return get, set_
    return None


def _strict_cnr() -> bool:
    """Turn on MKL's strict CNR mode (unless ``MKL_CBWR`` says otherwise); True when it is on.
    MKL accepts the change only before its first matmul, hence at import."""
    cbwr = _mkl_cbwr()
    if cbwr is None:
        return False
    get, set_ = cbwr
    if not os.environ.get("MKL_CBWR") and not get(_MKL_CBWR_ALL) & _MKL_CBWR_STRICT:
        set_(_MKL_CBWR_AUTO | _MKL_CBWR_STRICT)
    return bool(get(_MKL_CBWR_ALL) & _MKL_CBWR_STRICT)


_INVARIANT = _strict_cnr()


def thread_count_invariant() -> bool:
    """True when this process's matmuls give the same bits on any number of threads (MKL's
    strict CNR mode is on), so a run may change its thread count without changing its weights."""
    return _INVARIANT


# ----------------------------------------------------------------------- how busy the cores are
class IdleCores:
    """Cores that stood idle since the last call (``/proc/stat``, over the CPUs this process may
    run on); None where that is not known (not Linux, or a window under 50 ms)."""

    def __init__(self):
        try:
            self._cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
            self._hz = os.sysconf("SC_CLK_TCK")
        except (AttributeError, OSError, ValueError):
            self._cpus = set()
        self._last = self._read()

    def _read(self) -> tuple[float, float] | None:
        if not self._cpus:
            return None
        try:
            with open("/proc/stat") as f:
                idle = sum(int(parts[4]) + int(parts[5]) for parts in (line.split() for line in f)
                           if parts and parts[0] in self._cpus)       # idle + iowait, in ticks
        except (OSError, ValueError, IndexError):
            return None
        return time.monotonic(), idle / self._hz

    def __call__(self) -> float | None:
        now = self._read()
        if now is None or self._last is None:
            return None
        if now[0] - self._last[0] < 0.05:
            return None
        (t0, idle0), self._last = self._last, now
        return max(0.0, (now[1] - idle0) / (now[0] - t0))


# ----------------------------------------------------------------------- the policy
class ThreadPolicy:
    """Chooses torch's intra-op thread count while a run trains.

    ``ThreadPolicy(n)`` with ``n >= 1`` holds ``n`` threads; ``ThreadPolicy(0)`` adapts between one
    thread and ``available`` (torch's setting on entry): it times :data:`BLOCK` steps on each,
    keeps the faster by median, ends a trial at the first step :data:`ABORT` times slower than
    the incumbent, leaves several threads after two steps in a row :data:`COLLAPSE` times slower
    than their recent median, and tries more threads only while ``idle_cores()`` (default:
    :class:`IdleCores`) says a core stands idle. :meth:`for_run` picks the mode for a run.

    >>> clock = {1: 0.010, 2: 0.006}           # a quiet machine: two threads are faster
    >>> with ThreadPolicy(0, available=2, idle_cores=lambda: 1.0) as policy:
    ...     for _ in range(1000):
    ...         policy.step_done(clock[policy.threads])
    >>> policy.threads, policy.history[0]     # two threads from the 25th step on
    (2, (25, 2))
    """

    def __init__(self, threads: int = 0, *, available: int | None = None,
                 idle_cores: Callable[[], float | None] | None = None, reason: str = ""):
        self.requested = threads
        self.available = available
        self.reason = reason or ("adaptive" if threads == 0 else f"fixed at {threads}")
        self._idle_cores = idle_cores
        self.threads = threads or 1
        self.history: list[tuple[int, int]] = []     # (steps done, count) at each change

    @classmethod
    def for_run(cls, rc) -> ThreadPolicy:
        """The policy for ``rc`` (a :class:`qkov.store.RunConfig`): ``train.threads`` when set;
        else one thread for a step too small to share or where the thread count would change
        the weights, and the adaptive policy otherwise."""
        if rc.train.threads:
            return cls(rc.train.threads, reason="train.threads")
        work = work_per_step(rc)
        if work < _THREADED_WORK:
            return cls(1, reason=f"one thread: a step of {work:.1e} multiply-adds is too small to share")
        if not thread_count_invariant():
            return cls(1, reason="one thread: the thread count would change the results (MKL's strict CNR is off)")
        return cls(0)

    # ------------------------------------------------------------------- context
    def __enter__(self) -> ThreadPolicy:
        self._entry = torch.get_num_threads()
        self._many = self.available or self._entry
        self._adaptive = self.requested == 0 and self._many > 1
        self.threads = self.requested or 1
        self._steps, self._clock = 0, 0.0
        self._times: dict[int, deque] = {}
        self._trial: tuple[int, list[float]] | None = None       # (incumbent, the trial's steps)
        self._warm_up = False
        self._slow = 0                                            # slow steps in a row
        self._interval, self._next = RECHECK_S[0], FIRST_TRIAL_S
        if self._adaptive and self._idle_cores is None:
            self._idle_cores = IdleCores()
        torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self._entry)

    # ------------------------------------------------------------------- decisions
    def step_done(self, seconds: float) -> None:
        """Record one optimizer step's wall time; may change the thread count for the next."""
        self._steps += 1
        if not self._adaptive:
            return
        self._clock += seconds
        if self._trial is not None:
            self._trial_step(seconds)
            return
        times = self._times.setdefault(self.threads, deque(maxlen=BLOCK))
        if self._warm_up:                   # the first step after a change: not representative
            self._warm_up = False
            return
        if self.threads > 1 and len(times) >= 3 and seconds > COLLAPSE * statistics.median(times):
            self._slow += 1                 # one slow step is noise; two in a row, a core taken:
            if self._slow >= 2:             # leave now, look again soon
                self._settle(1)
            return
        self._slow = 0
        times.append(seconds)
        if self._clock >= self._next and len(times) >= BLOCK:
            self._start_trial()

    def _start_trial(self) -> None:
        other = 1 if self.threads > 1 else self._more_threads()
        if other is None:                   # the cores are busy: look again later, at no cost
            self._next = self._clock + RECHECK_S[0]
            return
        self._trial = (self.threads, [])
        self._switch(other)

    def _more_threads(self) -> int | None:
        """How many threads to try: ``available``, fewer when fewer cores stand idle, None
        when none does."""
        free = self._idle_cores()
        if free is None:
            return self._many
        if free < FREE_CORE:
            return None
        return max(2, min(self._many, 1 + round(free)))

    def _trial_step(self, seconds: float) -> None:
        incumbent, times = self._trial
        reference = statistics.median(self._times[incumbent])
        if seconds > ABORT * reference:
            self._end_trial(won=False)
            return
        if self._warm_up:
            self._warm_up = False
            return
        times.append(seconds)
        if len(times) >= BLOCK:
            self._end_trial(won=statistics.median(times) < (1 - MARGIN) * reference)

    def _end_trial(self, won: bool) -> None:
        incumbent, times = self._trial
        self._trial = None
        if won:
            self._times[self.threads] = deque(times, maxlen=BLOCK)
            self._interval = RECHECK_S[0]
        else:
            self._switch(incumbent)
            self._interval = min(2 * self._interval, RECHECK_S[1])
        self._next = self._clock + self._interval

    def _settle(self, count: int) -> None:
        """Move to ``count`` with fresh timings and look again soon (two slow steps in a row
        can be noise too; a busy machine makes the next trial wait at no cost)."""
        self._times.pop(count, None)
        self._switch(count)
        self._interval = RECHECK_S[0]
        self._next = self._clock + FIRST_TRIAL_S

    def _switch(self, count: int) -> None:
        if count == 1 and self._idle_cores is not None:
            self._idle_cores()              # the idle-time window restarts on one thread
        self.threads = count
        self._warm_up, self._slow = True, 0
        self.history.append((self._steps, count))
        torch.set_num_threads(count)
