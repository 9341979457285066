"""Many runs: 151 seeds of max-of-4 trained and analysed, the local pool against Ray and a plain loop.

    python benchmarks/sweep.py                       # 151 seeds, each backend once (~10 min on 2 idle cores)
    python benchmarks/sweep.py --seeds 12 --rounds 3 # the smaller interleaved comparison
    python benchmarks/sweep.py --skip-ray            # without Ray installed

The setup of Gross et al.'s compact proofs: ``qkov.get_task("max", min_len=4, max_len=4)`` with
its default training (1,500 steps), seeds 0..N-1, each run trained into a run directory and
analysed (``summary.json``), exactly as ``qkov sweep max --seeds 0:151 --set min_len=4 --set
max_len=4`` does. Three ways, each into a fresh directory, in one run of this script:

- local: ``qkov.sweep(..., backend="local")``, one worker process per core, one torch thread each;
- ray: ``qkov.sweep(..., backend="ray")`` on a local Ray cluster with one CPU per core, bound to
  127.0.0.1 and started once before the timings (its start is printed on its own);
- loop: a plain sequential loop in this process, ``qkov.train(task, out=..., seed=s)`` then
  ``qkov.analyze`` and ``store.save_summary``, as a user would write it without a sweep.

With ``--rounds R`` every round runs the three in a rotated order, so each sees the same machine
load; the script prints each backend's median wall time, runs per minute and the ratio to the
local pool, the load average before and after, and checks that all three wrote the same weights.
The sweep page's headline numbers (its findings) are printed from the local pool's registry.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # a one-machine cluster on 127.0.0.1
os.environ.setdefault("RAY_worker_niceness", "0")                 # as qkov's own local cluster (Ray's default: 15)

import torch  # noqa: E402

import qkov  # noqa: E402
from qkov import registry, store  # noqa: E402
from qkov.report.sweep import sweep_findings  # noqa: E402

try:
    from qkov.certify import certify  # noqa: E402
except ImportError:
    certify = None

TASK = qkov.get_task("max", min_len=4, max_len=4)
GOAL_S, GOAL_RAY_RATIO = 300.0, 1.3


def loop(seeds: list[int], out: Path) -> None:
    """What a user writes without a sweep: train, analyse, certify (the proofs, as the sweep's
    workers run them), save, one seed after another."""
    for seed in seeds:
        run = qkov.train(TASK, out=out / f"seed{seed:04d}", seed=seed, quiet=True)
        store.save_summary(run.path, qkov.analyze(run.model, TASK).to_dict())
        if certify is not None:
            certify(run.model, TASK, exact_limit=0)


def weights(out: Path) -> dict[int, str]:
    """seed -> sha256 of model.safetensors, for every run under ``out``."""
    return {store.read_config(d).seed: hashlib.sha256((d / store.MODEL).read_bytes()).hexdigest()
            for d in sorted(out.iterdir()) if store.is_finished(d)}


def one(backend: str, seeds: list[int], root: Path, jobs: int) -> tuple[float, Path]:
    out = Path(tempfile.mkdtemp(prefix=f"{backend}-", dir=root))
    t0 = time.perf_counter()
    if backend == "loop":
        loop(seeds, out)
    else:
        result = qkov.sweep(TASK, seeds, out=out, jobs=jobs, backend=backend, quiet=True)
        assert not result.failed, result.text()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=151)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-loop", action="store_true")
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    backends = ["local"] + ([] if args.skip_ray else ["ray"]) + ([] if args.skip_loop else ["loop"])
    torch.set_num_threads(1)      # the loop's runs: max keeps one thread anyway (qkov.threads)
    print(f"max-of-4, {args.seeds} seeds, {args.jobs} jobs, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if "ray" in backends:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.jobs, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 logging_level="warning")
        print(f"ray {ray.__version__}: local cluster started in {time.perf_counter() - t0:.1f} s (not in the timings)")
    times: dict[str, list[float]] = {b: [] for b in backends}
    shas: dict[str, dict[int, str]] = {}
    with tempfile.TemporaryDirectory(prefix="qkov-sweep-bench-") as tmp:
        for r in range(args.rounds):
            order = backends[r % len(backends):] + backends[:r % len(backends)]
            for b in order:
                wall, out = one(b, seeds, Path(tmp), args.jobs)
                times[b].append(wall)
                shas[b] = weights(out)
                print(f"  round {r + 1} {b:5s} {wall:7.1f} s  {60 * len(seeds) / wall:6.1f} runs/min  "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
                if b == "local":
                    findings = sweep_findings(registry.read_rows(out))
        base = statistics.median(times["local"])
        print(f"median of {args.rounds} round(s), wall time; ratio to the local pool:")
        for b in backends:
            m = statistics.median(times[b])
            print(f"  {b:5s} {m:7.1f} s  {60 * len(seeds) / m:6.1f} runs/min  ratio {m / base:.2f}")
        same = all(s == shas["local"] for s in shas.values())
        print(f"same weights from every backend, seed by seed: {same}")
        print(f"goals: local under {GOAL_S:.0f} s for 151 seeds "
              f"({'met' if args.seeds == 151 and base < GOAL_S else 'n/a' if args.seeds != 151 else 'missed'}); "
              + (f"ray within {GOAL_RAY_RATIO}x of local ({statistics.median(times['ray']) / base:.2f}x)"
                 if "ray" in times else "ray skipped"))
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("sweep page findings (local pool's registry):")
        for f in findings:
            print(f"  - {f['text']}")


if __name__ == "__main__":
    main()
