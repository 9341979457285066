"""Certified accuracy: exact accuracy and proved bounds for max-of-4 models from 10 seeds, and the
reference max model at every length.

    python benchmarks/certify.py                    # 10 seeds of max-of-4, the reference max model (~2 min)
    python benchmarks/certify.py --seeds 3 --repeats 3
    python benchmarks/certify.py --exact-5          # also brute-force the reference model at length 5 (64^5)

Max-of-4 is Gross et al.'s setup (``qkov.get_task("max", min_len=4, max_len=4)``: ints 0..63,
1 layer, 1 head, attention-only, d_model 32) trained with qkov's default config for that task,
one model per seed. For each model, on one thread: the tables (EQKE, EQKP, EVOU, PVOU, EUPU), the
exact accuracy over all 64^4 = 16,777,216 inputs by brute force, the cubic proof and the
subcubic proof, each timed ``--repeats`` times interleaved (brute force, cubic, subcubic, brute
force, ...) so all see the same machine load. It prints each seed's numbers, the mean ± sd of
the exact accuracy and each bound over the seeds, the median times and the ratio of each
proof's median time to brute force's, with CPU time and the load average beside the wall time.
Then the reference ``max`` model (lengths 2..6, seed 0): each length's exact accuracy (where
brute force runs) and bounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import qkov
from qkov.certify import brute_force, cubic, subcubic, tables
from qkov.tasks import configure

GOALS = {"brute_force": 10.0, "cubic": 1.0}    # seconds, from the issue


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def one_seed(seed: int, repeats: int) -> dict:
    task, model_cfg, train_cfg = configure("max", {"min_len": "4", "max_len": "4"})
    run = qkov.train(task, seed=seed, model_config=model_cfg, train_config=train_cfg, quiet=True)
    t = tables(run.model, 4)
    times = {name: [] for name in ("brute_force", "cubic", "subcubic")}
    cpu = {name: [] for name in times}
    for _ in range(repeats):
        for name, fn in (("brute_force", brute_force), ("cubic", cubic), ("subcubic", subcubic)):
            result, wall, c = timed(fn, t)
            times[name].append(wall)
            cpu[name].append(c)
            if name == "brute_force":
                exact = result
            elif name == "cubic":
                cub = result
            else:
                sub = result
    return {"seed": seed, "eval": run.final["accuracy"], "exact": exact.accuracy, "cubic": cub.bound,
            "subcubic": sub.bound, "flops": {"brute_force": exact.flops, "cubic": cub.flops, "subcubic": sub.flops},
            "rechecked": cub.rechecked, "times": times, "cpu": cpu}


def mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4%} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4%}"


def report_seeds(rows: list[dict]) -> None:
    print("\nmax-of-4 (64^4 = 16,777,216 inputs), per seed:")
    print(f"  {'seed':>4}  {'eval acc':>9}  {'exact':>9}  {'cubic':>9}  {'subcubic':>9}  {'re-checked':>10}")
    for r in rows:
        print(f"  {r['seed']:>4}  {r['eval']:9.4%}  {r['exact']:9.4%}  {r['cubic']:9.4%}  {r['subcubic']:9.4%}"
              f"  {r['rechecked']:>10}")
    print(f"\nover {len(rows)} seeds (mean ± sd):")
    for key in ("exact", "cubic", "subcubic"):
        print(f"  {key:<9} {mean_sd([r[key] for r in rows])}")
    gaps = [100 * (r["exact"] - r["cubic"]) for r in rows]
    sd = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
    print(f"  exact - cubic: {statistics.mean(gaps):.3f} ± {sd:.3f} points (goal: within 2)")
    med = {k: statistics.median(x for r in rows for x in r["times"][k]) for k in rows[0]["times"]}
    cpu = {k: statistics.median(x for r in rows for x in r["cpu"][k]) for k in rows[0]["times"]}
    flops = {k: statistics.median(r["flops"][k] for r in rows) for k in rows[0]["flops"]}
    print("\nmedian times (one thread; every repeat of every seed):")
    for k in med:
        goal = f"  (goal < {GOALS[k]:g} s)" if k in GOALS else ""
        print(f"  {k:<12} {med[k]:8.3f} s wall  {cpu[k]:8.3f} s CPU  {flops[k]:9.3g} FLOPs  "
              f"{med[k] / med['brute_force']:7.4f}x brute force{goal}")
    print(f"  load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def reference(exact_limit: int) -> None:
    run = qkov.train(qkov.get_task("max"), seed=0, quiet=True)
    cert = qkov.certify(run, exact_limit=exact_limit)
    print("\nreference max (lengths 2..6, seed 0):")
    print(f"  {'length':>6}  {'inputs':>14}  {'exact':>9}  {'cubic':>9}  {'subcubic':>9}  {'brute s':>8}"
          f"  {'cubic s':>8}")
    for n, c in cert.lengths.items():
        exact = "—" if c.exact is None else f"{c.exact:.4%}"
        bf = f"{c.seconds['brute_force']:8.2f}" if "brute_force" in c.seconds else f"{'—':>8}"
        print(f"  {n:>6}  {c.inputs:>14,}  {exact:>9}  {c.bounds['cubic']:9.4%}  {c.bounds['subcubic']:9.4%}"
              f"  {bf}  {c.seconds['cubic']:8.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each method per seed, interleaved")
    p.add_argument("--exact-5", action="store_true", help="brute-force the reference model at length 5 too")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in range(args.seeds):
        rows.append(one_seed(seed, args.repeats))
        r = rows[-1]
        print(f"seed {seed}: exact {r['exact']:.4%}  cubic {r['cubic']:.4%}  subcubic {r['subcubic']:.4%}", flush=True)
    report_seeds(rows)
    reference(64 ** 5 if args.exact_5 else 64 ** 4)


if __name__ == "__main__":
    main()
