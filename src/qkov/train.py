"""The training loop: AdamW, warmup, periodic eval, checkpoints, bit-exact resume.

``train(task)`` builds a ``Transformer`` from the task's reference config (or the one given),
trains it on batches drawn from a ``torch.Generator`` seeded by ``seed`` and, when ``out`` is
given, keeps a run directory up to date (``store``). The same seed and configs on a CPU give
identical weights, and ``resume(out)`` continues a stopped run bit-exactly.

The parts: the state that a resume needs (``trainstate.TrainingState``), evaluation
(``evaluation.Evaluator``), the loss through the one door to the fast paths
(``fastpath.plan``), the thread count (``threads.ThreadPolicy``), and the loop here.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

from . import memory, store
from .config import ModelConfig, TrainConfig
from .errors import QkovError
from .evaluation import Evaluator, target_reached
from .fastpath import plan
from .store import Run, RunConfig
from .tasks import Task, get_task
from .threads import ThreadPolicy
from .trainstate import TrainingState, make_optimizer

__all__ = ["Run", "check_setup", "lr_at", "make_optimizer", "resume", "train"]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the optimizer step that follows ``step`` completed steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr


def check_setup(rc: RunConfig, what: str | None = None, fix: str | None = None) -> None:
    """Refuse, with one line, a run that cannot work, before anything is allocated or written:
    a model that cannot represent the task, or a run (model, optimizer, the largest step, the
    task's data set) that cannot fit in this machine's memory (``qkov.memory.check_fits``).
    ``train`` and ``resume`` call it first; ``qkov train`` calls it before it takes the lock on
    ``--out``, so a refused run leaves no folder behind.

    >>> from qkov.tasks import get_task
    >>> task = get_task("modadd", p=30011)
    >>> check_setup(RunConfig(task, task.model_config(), task.train_config()))
    Traceback (most recent call last):
    ...
    qkov.errors.QkovError: training modadd needs about ... data set 145 GB for 900,660,121 examples) ...
    """
    rc.task.check_model(rc.model)
    memory.check_fits(rc.model, rc.train, what=what or f"training {rc.task.name}", fix=fix, task=rc.task)


def _run(state: TrainingState, out: Path | None, quiet: bool) -> Run:
    """Advance ``state`` to ``train.steps`` (or the target accuracy); save as it goes."""
    rc, cfg, task = state.rc, state.rc.train, state.rc.task
    fast = plan(state.model, task)
    evaluate = Evaluator(task, fast, out)
    train_data = task.dataset("train").to(state.device) if task.finite else None
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"train {task.name}", unit="step",
               disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)
    t0 = time.perf_counter() - _elapsed(state.metrics)
    with ThreadPolicy.for_run(rc) as threads:
        if state.step == 0:
            evaluate(state, None, lr_at(0, cfg), time.perf_counter() - t0)
            _checkpoint(state, out)
        train_loss = None
        while state.step < cfg.steps:
            lr = lr_at(state.step, cfg)
            started = time.perf_counter()
            state.optimizer.param_groups[0]["lr"] = lr
            state.optimizer.zero_grad(set_to_none=True)
            train_loss = fast.loss_and_grads(state.next_batch(train_data)).item()
            if not math.isfinite(train_loss):
                bar.close()
                raise QkovError(_nan_message(state.step, lr, out))
            state.optimizer.step()
            state.step += 1
            threads.step_done(time.perf_counter() - started)
            bar.update(1)
            if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                row = evaluate(state, train_loss, lr, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.4f}")
                if target_reached(row, cfg.target_accuracy):
                    _checkpoint(state, out)
                    break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                _checkpoint(state, out)
        bar.close()
        if state.metrics[-1]["step"] != state.step:
            evaluate(state, train_loss, lr_at(max(state.step - 1, 0), cfg), time.perf_counter() - t0)
    if out is not None:
        state.save(out)
        store.save_final(out, rc, state.model, state.step)
    state.model.eval()
    return Run(state.model, rc, state.metrics, out)


def _elapsed(metrics: list[dict]) -> float:
    """The seconds a resumed run had trained: ``elapsed_s`` of its last eval row that has one (a
    row edited by hand, or written by another tool, may lack it); 0 where none has."""
    value = next((r["elapsed_s"] for r in reversed(metrics) if "elapsed_s" in r), 0.0)
    return float(value) if math.isfinite(value) else 0.0


def _checkpoint(state: TrainingState, out: Path | None) -> None:
    """Weights as ``checkpoints/step_N`` and the resumable state, every ``checkpoint_every`` steps."""
    every = state.rc.train.checkpoint_every
    if out is None or not every or state.step % every:
        return
    store.save_checkpoint(out, state.step, state.model)
    state.save(out)


def _nan_message(step: int, lr: float, out: Path | None) -> str:
    where = ""
    if out is not None:
        ckpts = store.checkpoint_paths(out)
        where = (
            f"; the last good checkpoint (step {ckpts[-1][0]}) stays in {out / store.CHECKPOINTS}"
            if ckpts else f"; nothing past config.json was saved in {out}"
        )
    return (
        f"the training loss became NaN at step {step} (lr={lr:g}); "
        f"lower the learning rate, e.g. --set lr={lr / 10:g}{where}"
    )


def _prepare_out(out: Path, rc: RunConfig) -> None:
    """Start a fresh run in ``out``; refuse to mix with a different run that lives there."""
    if (out / store.CONFIG).is_file():
        try:
            old = store.read_config(out)
        except QkovError:
            old = None
        if old is not None and not old.same_setup(rc):
            raise QkovError(
                f"{out} already holds a run with a different setup ({old.task.name}, seed {old.seed}); "
                f"pass another --out, or delete {out} to replace it"
            )
    elif out.exists() and any(out.iterdir()):
        raise QkovError(f"{out} exists and is not a qkov run directory; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    store.clear_outputs(out)          # the same setup is being retrained from scratch
    store.write_config(out, rc)


def train(
    task: Task | str,
    out: str | Path | None = None,
    seed: int = 0,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    quiet: bool = False,
) -> Run:
    """Train a model on ``task`` with its reference configs (or the ones given).

    >>> run = train("max", train_config=get_task("max").train_config().replace(steps=20), quiet=True)
    >>> run.final["step"]
    20
    """
    task = get_task(task) if isinstance(task, str) else task
    rc = RunConfig(task, model_config or task.model_config(), train_config or task.train_config(), seed)
    check_setup(rc)
    state = TrainingState.fresh(rc)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        _prepare_out(out_path, rc)
    return _run(state, out_path, quiet)


RESUME_FIX = "config.json was edited, or the run needs a machine with more memory"


def resume(path: str | Path, steps: int | None = None, quiet: bool = False) -> Run:
    """Continue the run in ``path`` from its newest saved state, bit-exactly, up to ``steps``.

    An interrupted run resumes exactly as if it had never stopped. Passing a larger ``steps``
    extends a finished run; with a cosine schedule that stretches the schedule from here on.
    """
    path = Path(path)
    rc = store.read_config(path)
    if steps is not None:
        rc.train = rc.train.replace(steps=steps)
    if not (path / store.TRAIN_STATE).is_file():
        raise QkovError(
            f"{path} has no {store.TRAIN_STATE} to resume from (the run saved no checkpoint); "
            f"retrain it, with --set checkpoint_every=N to make it resumable"
        )
    check_setup(rc, what=f"resuming {path}", fix=RESUME_FIX)
    state = TrainingState.resumed(path, rc)
    if state.step >= rc.train.steps:
        raise QkovError(
            f"{path} already ran {state.step} steps (its config asks for {rc.train.steps}); "
            f"pass --steps N with N > {state.step} to train further"
        )
    rc.extra.pop("model_sha256", None)
    store.write_config(path, rc)
    return _run(state, path, quiet)
