"""Training speed: time for the `max` model to reach its accuracy target, qkov against TransformerLens.

    python benchmarks/train_speed.py                  # qkov and TransformerLens, 9 repeats each (~40 s)
    python benchmarks/train_speed.py --repeats 5 --threads 2
    python benchmarks/train_speed.py --skip-tl        # qkov only (no TransformerLens installed)
    python benchmarks/train_speed.py --no-native     # qkov without its C kernel: the table path

TransformerLens is never a qkov dependency. Install it into a separate environment and run the
benchmark from there:

    python -m venv .venv-tl && .venv-tl/bin/pip install transformer-lens==3.9.0 'torch>=2.2,<2.14' -e .
    .venv-tl/bin/python benchmarks/train_speed.py

Both sides train the same model from the same start: the task's reference `max` model
(1 layer, 1 head, d_model 32, attention-only, vocab 64, lengths 2..6) initialised by qkov with
the seed, and loaded into TransformerLens 3.9's ``HookedTransformer`` (built from
``HookedTransformerConfig(n_layers=1, n_heads=1, d_model=32, d_head=32, attn_only=True,
d_vocab=64, n_ctx=6, normalization_type=None, act_fn="relu")``) through its state dict. They see
the same batches (``task.sample`` from one ``torch.Generator`` seeded with the seed, in the same
order) and the same AdamW settings and learning-rate schedule (the task's train config).

- qkov: ``qkov.train(task, seed=..., train_config=...)``, the library's own trainer, with
  ``target_accuracy`` set, so it stops at the first eval that reaches the target.
- TransformerLens: a plain loop: logits at every position, the task's loss (``task.loss``, the
  cross-entropy qkov's trainer minimises) at the scored ones, ``torch.optim.AdamW`` with its
  defaults for everything the config does not set.

"Reached" means accuracy >= ``--target`` (0.999) at every length 2..6 on the task's fixed eval set
(10,000 sequences per length), checked every ``--eval-every`` steps with ``task.evaluate`` on both
sides; the timed span runs from building the model to that eval, evals included. Repeats alternate
qkov and TransformerLens so both see the same machine load; the script prints medians, the ratio
of the medians, and per-step times (forward, backward and AdamW step on one batch, interleaved).
On a shared machine wall time is not the program's speed, so CPU time (``time.process_time``) is
printed beside it, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch

import qkov
from qkov.fastpath import native, plan
from qkov.train import lr_at, make_optimizer

TARGET_SECONDS, TARGET_RATIO = 10.0, 0.3


def reached(metrics: dict, target: float) -> bool:
    """Overall accuracy and the accuracy at every length reach the target (as qkov's trainer checks)."""
    return min([metrics["accuracy"]] + [g["accuracy"] for g in metrics["by_length"].values()]) >= target


def tl_model(task, seed: int):
    """TransformerLens 3.9's HookedTransformer with the reference architecture and qkov's initial weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = task.model_config()
    tl_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.head_dim,
        attn_only=True, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx, normalization_type=None, act_fn="relu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3.9 marks HookedTransformer as deprecated in favour of 4.x
        model = HookedTransformer(tl_cfg)
    model.load_state_dict(qkov.Transformer(cfg, seed=seed).state_dict())
    return model


def tl_optimizer(model, train_cfg):
    return torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=train_cfg.betas,
                             weight_decay=train_cfg.weight_decay)


def tl_step(model, opt, task, batch, lr: float) -> float:
    pos = task.scored_positions
    for g in opt.param_groups:
        g["lr"] = lr
    loss = task.loss(model(batch.tokens)[:, pos], batch.targets[:, pos])       # the same objective as qkov's
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def time_qkov(task, train_cfg, seed: int) -> dict:
    w, c = time.perf_counter(), time.process_time()
    run = qkov.train(task, seed=seed, train_config=train_cfg, quiet=True)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    hit = reached(run.final, train_cfg.target_accuracy)
    return {"wall_s": wall, "cpu_s": cpu, "step": run.final["step"] if hit else None}


def time_tl(task, train_cfg, seed: int) -> dict:
    w, c = time.perf_counter(), time.process_time()
    model = tl_model(task, seed)
    opt = tl_optimizer(model, train_cfg)
    gen = torch.Generator().manual_seed(seed)
    step, hit = 0, False
    while step < train_cfg.steps:
        tl_step(model, opt, task, task.sample(train_cfg.batch_size, gen), lr_at(step, train_cfg))
        step += 1
        if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
            model.eval()
            hit = reached(task.evaluate(model), train_cfg.target_accuracy)
            model.train()
            if hit:
                break
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return {"wall_s": wall, "cpu_s": cpu, "step": step if hit else None}


def step_times(task, train_cfg, seed: int, steps: int, skip_tl: bool) -> dict:
    """Median wall and CPU ms of one training step on each side, interleaved, on the same batches."""
    q_model = qkov.Transformer(task.model_config(), seed=seed)
    q_plan, q_opt = plan(q_model, task), make_optimizer(q_model, train_cfg)

    def q_step(batch):                    # what qkov's trainer runs each step
        q_opt.zero_grad(set_to_none=True)
        q_plan.loss_and_grads(batch).item()     # the loss, gradients filled in
        q_opt.step()

    runners = {"qkov": q_step}
    if not skip_tl:
        t_model = tl_model(task, seed)
        t_opt = tl_optimizer(t_model, train_cfg)
        runners["TransformerLens"] = lambda batch: tl_step(t_model, t_opt, task, batch, train_cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    times = {k: {"wall": [], "cpu": []} for k in runners}
    for i in range(steps + 3):
        batch = task.sample(train_cfg.batch_size, gen)
        for name, fn in runners.items():
            w, c = time.perf_counter(), time.process_time()
            fn(batch)
            if i >= 3:  # the first steps warm up allocators and kernels
                times[name]["wall"].append(time.perf_counter() - w)
                times[name]["cpu"].append(time.process_time() - c)
    return {k: {"wall_ms": 1e3 * statistics.median(t["wall"]), "cpu_ms": 1e3 * statistics.median(t["cpu"])}
            for k, t in times.items()}


def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9,
                    help="timed runs per side (default 9: this machine's timing varies by 30%% between runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.999, help="accuracy at every length (default 0.999)")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="steps between target checks (default: the task's eval_every)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--step-timing", type=int, default=100, help="steps for the per-step timing (default 100)")
    ap.add_argument("--skip-tl", action="store_true", help="time qkov only")
    ap.add_argument("--no-native", action="store_true",
                    help="qkov without its C kernel (the table path, as where none was built)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native.use_native(not args.no_native)
    if not args.skip_tl:
        try:
            import transformer_lens  # noqa: F401
        except ImportError:
            raise SystemExit("TransformerLens is not installed here; see the instructions at the top of this file, "
                             "or pass --skip-tl") from None

    task = qkov.get_task("max")
    base = task.train_config()
    train_cfg = base.replace(
        target_accuracy=args.target, eval_every=args.eval_every or base.eval_every, checkpoint_every=0,
    )
    task.eval_batch()  # sampled once and shared by both sides; not part of either timing
    load0 = os.getloadavg()[0]
    print(f"max: batch {train_cfg.batch_size}, lr {train_cfg.lr:g} ({train_cfg.lr_schedule}), "
          f"up to {train_cfg.steps} steps, target {args.target:.1%} at every length, "
          f"checked every {train_cfg.eval_every} steps; {args.threads} thread(s), torch {torch.__version__}; "
          f"qkov's C kernels {'on' if native.available() else 'off'}",
          flush=True)

    per_step = step_times(task, train_cfg, args.seed, args.step_timing, args.skip_tl)
    for name, t in per_step.items():
        print(f"  per step {name:16s} {t['wall_ms']:6.2f} ms wall  {t['cpu_ms']:6.2f} ms CPU", flush=True)

    runs: dict[str, list[dict]] = {"qkov": []} | ({} if args.skip_tl else {"TransformerLens": []})
    for i in range(args.repeats):
        runs["qkov"].append(time_qkov(task, train_cfg, args.seed))
        if not args.skip_tl:
            runs["TransformerLens"].append(time_tl(task, train_cfg, args.seed))
        print(f"  repeat {i + 1}: " + "; ".join(
            f"{k} {v[-1]['wall_s']:.2f} s wall / {v[-1]['cpu_s']:.2f} s CPU (step {v[-1]['step']})"
            for k, v in runs.items()
        ), flush=True)
    load1 = os.getloadavg()[0]

    result = {"threads": args.threads, "native": native.available(), "target": args.target,
              "eval_every": train_cfg.eval_every, "batch_size": train_cfg.batch_size, "lr": train_cfg.lr,
              "per_step": per_step, "loadavg_before": round(load0, 2), "loadavg_after": round(load1, 2)}
    for name, rows in runs.items():
        result[name] = {"wall_s": median_of(rows, "wall_s"), "cpu_s": median_of(rows, "cpu_s"),
                        "steps": [r["step"] for r in rows]}
        print(f"{name:16s} reached the target in {result[name]['wall_s']:.2f} s wall / "
              f"{result[name]['cpu_s']:.2f} s CPU "
              f"(median of {len(rows)}; steps {result[name]['steps']})")
    if "TransformerLens" in runs:
        q, t = result["qkov"], result["TransformerLens"]
        result["ratio_wall"], result["ratio_cpu"] = q["wall_s"] / t["wall_s"], q["cpu_s"] / t["cpu_s"]
        print(f"qkov / TransformerLens: {result['ratio_wall']:.2f} (wall), {result['ratio_cpu']:.2f} (CPU); "
              f"goal <= {TARGET_RATIO}")
    print(f"qkov goal: under {TARGET_SECONDS:.0f} s; load average {load0:.1f} before, {load1:.1f} after")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
