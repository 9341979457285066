"""Threads: qkov's default thread choice against one thread, on a quiet machine and a busy one.

    python benchmarks/threads.py                       # add, fib, induction; 3 repeats (~5 min on 2 cores)
    python benchmarks/threads.py --tasks induction --repeats 5
    python benchmarks/threads.py --no-mid              # without the load that starts mid-run
    python benchmarks/threads.py --all-cores           # also threads=N fixed (the old default)

Each timed run is ``qkov.train(task, seed=0, train_config=...)`` with the task's reference
settings and fewer steps (``--steps``; evaluation at the start and the end only, no checkpoints),
as a user would call it, once with ``threads=0`` (the default: :class:`qkov.threads.ThreadPolicy`
chooses) and once with ``threads=1``. Wall time covers the whole call, model building and both
evaluations included. Three machine states, one after the other within each repeat so all of
them see the same background:

- quiet: nothing started by the benchmark;
- busy: one competing CPU-bound process (a Python spin loop) for the whole run;
- busy from mid-run: the same process started halfway through the run (half the quiet one-thread
  run's median time after the call begins), which the default has to notice while it trains.

The competing process is this script's own child, runs at most ``--busy-limit`` seconds whatever
happens and is killed in a ``finally``. The order of default and one-thread runs alternates between
repeats. The script prints every run, then per task and state the medians, the median of the
paired ratios default / one thread (the goal: at most 1.25 under load, and no slower than one thread when
quiet; with ``--all-cores`` also all cores / one thread), and the load average, since on a
shared machine "quiet" is only as quiet as the others.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

import qkov
from qkov.threads import thread_count_invariant

STEPS = {"add": 150, "fib": 300, "induction": 300}
GOAL = 1.25
SPIN = """
import os, sys, time
parent = os.getppid()
time.sleep(float(sys.argv[1]))
end = time.monotonic() + float(sys.argv[2])
x = 0
while time.monotonic() < end and os.getppid() == parent:   # dies with the benchmark, or at the limit
    for _ in range(100_000):
        x += 1
"""


class Busy:
    """One CPU-bound child process, from ``delay`` seconds on, for at most ``limit`` seconds."""

    def __init__(self, delay: float = 0.0, limit: float = 120.0):
        self.delay, self.limit = delay, limit
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Busy:
        self.proc = subprocess.Popen([sys.executable, "-c", SPIN, str(self.delay), str(self.limit)])
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()


def timed_run(name: str, steps: int, threads: int) -> tuple[float, float]:
    """Wall and CPU seconds (all of this process's threads) of one ``qkov.train`` call."""
    task = qkov.get_task(name)
    cfg = task.train_config().replace(steps=steps, eval_every=steps, checkpoint_every=0, threads=threads)
    t0, c0 = time.perf_counter(), time.process_time()
    qkov.train(task, seed=0, train_config=cfg, quiet=True)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(STEPS), choices=sorted(STEPS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=float, default=1.0, help=f"scale the step counts (default 1: {STEPS})")
    ap.add_argument("--no-mid", action="store_true", help="skip the load that starts mid-run")
    ap.add_argument("--all-cores", action="store_true",
                    help="also time threads fixed at torch's setting (the default before ThreadPolicy)")
    ap.add_argument("--busy-limit", type=float, default=180.0, help="longest a competing process lives, s")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # a kill still ends the busy child

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available, "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores; "
          f"thread count leaves results unchanged (MKL strict CNR): {thread_count_invariant()}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    steps = {name: max(10, round(STEPS[name] * args.steps)) for name in args.tasks}
    for name in args.tasks:                       # warm-up: imports, datasets, caches
        timed_run(name, 10, 1)

    states = ["quiet", "busy"] + ([] if args.no_mid else ["busy from mid-run"])
    many = torch.get_num_threads()
    counts = [0, 1] + ([many] if args.all_cores and many > 1 else [])
    walls: dict[tuple[str, str, int], list[float]] = {}
    cpus: dict[tuple[str, str, int], list[float]] = {}
    for rep in range(args.repeats):
        for name in args.tasks:
            order = counts if rep % 2 == 0 else counts[::-1]
            for state in states:
                for threads in order:
                    if state == "quiet":
                        wall, cpu = timed_run(name, steps[name], threads)
                    else:
                        quiet_one = walls.get((name, "quiet", 1), [10.0])
                        delay = statistics.median(quiet_one) / 2 if state != "busy" else 0.0
                        with Busy(delay, args.busy_limit):
                            wall, cpu = timed_run(name, steps[name], threads)
                    walls.setdefault((name, state, threads), []).append(wall)
                    cpus.setdefault((name, state, threads), []).append(cpu)
                    label = "default" if threads == 0 else f"threads={threads}"
                    print(f"  repeat {rep + 1}  {name:9s} {state:17s} {label:9s} {wall:6.2f} s "
                          f"({1e3 * wall / steps[name]:.1f} ms a step; CPU {cpu:6.2f} s; "
                          f"load {os.getloadavg()[0]:.2f})", flush=True)

    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    # ratio: the median over repeats of default / one thread, each pair run back to back (so a
    # background that changes between repeats cancels); cpu: the same for CPU seconds, which
    # grow when threads spin for a core and barely move when others only delay us.
    extra = f" {'threads=' + str(many):>10s} {'ratio':>6s}" if many in counts else ""
    print(f"{'task':9s} {'steps':>5s}  {'machine':17s} {'default':>9s} {'threads=1':>10s} {'ratio':>6s} "
          f"{'cpu':>5s}{extra}")
    worst = 0.0
    for name in args.tasks:
        for state in states:
            d, one = walls[(name, state, 0)], walls[(name, state, 1)]
            ratio = statistics.median(a / b for a, b in zip(d, one))
            cpu = statistics.median(a / b for a, b in zip(cpus[(name, state, 0)], cpus[(name, state, 1)]))
            if state != "quiet":
                worst = max(worst, ratio)
            line = (f"{name:9s} {steps[name]:5d}  {state:17s} {statistics.median(d):8.2f}s "
                    f"{statistics.median(one):9.2f}s {ratio:6.2f} {cpu:5.2f}")
            if many in counts:
                all_cores = walls[(name, state, many)]
                line += (f" {statistics.median(all_cores):9.2f}s "
                         f"{statistics.median(a / b for a, b in zip(all_cores, one)):6.2f}")
            print(line)
    print(f"worst ratio under load: {worst:.2f} (goal <= {GOAL})")
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
