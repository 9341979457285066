"""Grokking on a CPU: the reference modadd run (p = 113, Nanda et al.'s setup) to 99% test accuracy.

    python benchmarks/grokking.py                # the reference run: p=113, 30% train, up to 25k steps
    python benchmarks/grokking.py --quick        # p=23 smoke run (seconds to a minute)
    python benchmarks/grokking.py --threads 1    # one core (default: torch's setting, all cores)
    python benchmarks/grokking.py --full         # all 25k steps: the clean-up phase too (neuron FVE rises)

What it reports (JSON on the last line, a readable summary above it):

1. per-step time of one full-batch AdamW step through the plain forward
   (``model(tokens, positions=[2])``) and through the fast path (``qkov.fastpath``), measured
   here, in this process, on the same data, before training (steps interleaved, medians);
2. ``qkov.train`` with the task's reference configs and ``target_accuracy=0.99``: wall and CPU
   time, and the step at which test accuracy first reached 99%;
3. the trained model's Fourier picture: key frequencies, neuron FVE, logit FVE, restricted and
   excluded loss (``qkov.fourier.mlp_summary``).

The machine's load average is printed beside the timings: on a shared machine wall time is not
the program's speed, so CPU time (``time.process_time``, summed over threads) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

import qkov
from qkov import fourier
from qkov.fastpath import Plan, plan
from qkov.train import make_optimizer


def step_times(task, model_cfg, train_cfg, steps: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of one full-batch training step (forward, backward, AdamW),
    through the plain forward and through the fast path, interleaved so that both see the same load."""
    batch = task.dataset("train")
    runners = {}
    for name in ("plain", "fast"):
        model = qkov.Transformer(model_cfg, seed=0)
        # "plain": the model's own forward (the reference plan); "fast": what qkov.train uses.
        runner = plan(model, task) if name == "fast" else Plan(model, task.scored_positions, task.loss)
        runners[name] = (runner, make_optimizer(model, train_cfg))
    times = {name: {"wall": [], "cpu": []} for name in runners}
    for i in range(steps + 1):
        for name, (fn, opt) in runners.items():
            w, c = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            fn.loss_and_grads(batch)
            opt.step()
            if i:  # the first step warms up allocators and kernels
                times[name]["wall"].append(time.perf_counter() - w)
                times[name]["cpu"].append(time.process_time() - c)
    return {name: {"wall_s": statistics.median(t["wall"]), "cpu_s": statistics.median(t["cpu"])}
            for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="p=23, 60%% train, d_mlp 128, lr 3e-3: a smoke run")
    ap.add_argument("--p", type=int, default=None, help="the modulus (default 113; 23 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--steps", type=int, default=None, help="step limit (default: the reference 25000)")
    ap.add_argument("--eval-every", type=int, default=100, help="eval interval in steps (default 100)")
    ap.add_argument("--timing-steps", type=int, default=10, help="steps per per-step timing (default 10)")
    ap.add_argument("--full", action="store_true",
                    help="train every step (clean-up included) instead of stopping at 99%%")
    ap.add_argument("--out", default=None, help="keep the run directory here (default: a temp dir)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()

    if args.quick:
        task = qkov.get_task("modadd", p=args.p or 23, train_frac=0.6)
        model_cfg = task.model_config().replace(d_mlp=128)
        train_cfg = task.train_config().replace(lr=3e-3, steps=args.steps or 5000)
    else:
        task = qkov.get_task("modadd", p=args.p or 113)
        model_cfg = task.model_config()
        train_cfg = task.train_config().replace(steps=args.steps or task.train_config().steps)
    train_cfg = train_cfg.replace(target_accuracy=None if args.full else 0.99, eval_every=args.eval_every)

    load0 = os.getloadavg()
    timing = step_times(task, model_cfg, train_cfg, steps=args.timing_steps)
    plain, fast = timing["plain"], timing["fast"]
    print(f"modadd p={task.p}: {len(task.dataset('train'))} training examples, full batch, {args.threads} thread(s)")
    print(f"per step: plain forward {plain['wall_s'] * 1e3:.1f} ms wall / {plain['cpu_s'] * 1e3:.1f} ms CPU; "
          f"fast path {fast['wall_s'] * 1e3:.1f} ms wall / {fast['cpu_s'] * 1e3:.1f} ms CPU "
          f"({plain['cpu_s'] / fast['cpu_s']:.1f}x on CPU time)", flush=True)

    out = args.out or os.path.join(tempfile.mkdtemp(prefix="qkov-grok-"), "run")
    w, c = time.perf_counter(), time.process_time()
    run = qkov.train(task, out=out, model_config=model_cfg, train_config=train_cfg)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    load1 = os.getloadavg()
    final = run.final
    reached = next((m["step"] for m in run.metrics if m["accuracy"] >= 0.99), None)
    summary = fourier.mlp_summary(run.model, task)
    print(f"trained {final['step']} steps in {wall:.0f} s wall / {cpu:.0f} s CPU; test accuracy {final['accuracy']:.4f}"
          f" (>= 0.99 first at step {reached}); load average {load0[0]:.1f} before, {load1[0]:.1f} after")
    print(f"key frequencies {summary['key_frequencies']}; neurons with FVE >= 0.85: "
          f"{summary['neurons']['frac_fve_ge_0.85']:.1%}; logit FVE {summary['logit_fve']:.3f}; "
          f"restricted loss {summary['restricted_loss']:.3g}, test loss {summary['test_loss']:.3g}, "
          f"excluded loss {summary['excluded_loss']:.3g}")
    print(json.dumps({
        "p": task.p, "threads": args.threads, "train_examples": len(task.dataset("train")),
        "plain_step": plain, "fast_step": fast,
        "steps": final["step"], "steps_to_99": reached, "test_accuracy": final["accuracy"],
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "loadavg_before": round(load0[0], 2), "loadavg_after": round(load1[0], 2),
        "run_dir": str(run.path), "mlp": summary,
    }))


if __name__ == "__main__":
    main()
