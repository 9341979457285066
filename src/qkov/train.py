"""The training loop: AdamW, warmup, periodic eval, checkpoints, bit-exact resume.

``train(task)`` builds a ``Transformer`` from the task's reference config (or the one given),
trains it on batches drawn from a ``torch.Generator`` seeded by ``seed`` and, when ``out`` is
given, keeps a run directory up to date (see ``store.py``). The same seed and configs on a CPU
give identical weights, and ``resume(out)`` continues a stopped run bit-exactly.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

from . import store
from .config import ModelConfig, TrainConfig
from .errors import QkovError
from .fastpath import scored_logits_fn, scored_loss_fn
from .model import Transformer
from .optim import AdamW
from .store import RunConfig
from .tasks import IGNORE, Batch, Task, get_task
from .tasks.base import _as_index


@dataclass
class Run:
    """A trained model with its configs and eval history; ``path`` is None for in-memory runs."""

    model: Transformer
    config: RunConfig
    metrics: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None

    @property
    def task(self) -> Task:
        return self.config.task

    @property
    def final(self) -> dict[str, Any]:
        """The last eval's metrics."""
        return self.metrics[-1] if self.metrics else {}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the optimizer step that follows ``step`` completed steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr


def make_optimizer(model: Transformer, cfg: TrainConfig) -> AdamW:
    """AdamW over the model's trainable parameters with the run's settings (see ``optim.py``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _target_reached(metrics: dict[str, Any], target: float | None) -> bool:
    """Overall accuracy and every group's accuracy (by length or position) reach the target."""
    if target is None:
        return False
    accs = [metrics["accuracy"]]
    for key in ("by_length", "by_position"):
        accs += [g["accuracy"] for g in metrics.get(key, {}).values()]
    return min(accs) >= target


# Multiply-adds per step (rough: tokens x d_model x (4 d_model + 2 d_mlp + d_vocab_out)) from
# which a second intra-op thread pays for itself. Measured on 2 cores: max (2e7) ran 4x slower
# with two threads on a busy machine (72 s instead of 16 s wall at load 3); induction (7e7)
# 25.7 -> 20.2 ms a step and modadd p=113 (2e9) 97 -> 45 ms with two on a quiet one.
_THREADED_WORK = 5e7


def threads_for(rc: RunConfig, available: int) -> int:
    """Intra-op threads for a run: ``train.threads`` when set, else 1 for models whose step is
    too small to share (``_THREADED_WORK``) and ``available`` (torch's setting) otherwise."""
    if rc.train.threads:
        return rc.train.threads
    m, task = rc.model, rc.task
    rows = rc.train.batch_size
    if rows is None:
        rows = len(task.dataset("train")) if task.finite else 1
    work = rows * task.seq_len * m.d_model * (4 * m.d_model + 2 * (m.d_mlp or 0) + m.vocab_out)
    return available if work >= _THREADED_WORK else 1


class _Trainer:
    """One training run's state; ``run()`` advances it to ``train_cfg.steps``."""

    def __init__(self, rc: RunConfig, out: Path | None, quiet: bool):
        self.rc, self.out, self.quiet = rc, out, quiet
        self.task, self.cfg = rc.task, rc.train
        rc.task.check_model(rc.model)
        self.model = Transformer(rc.model, seed=rc.seed)
        self.model.train()
        self.opt = make_optimizer(self.model, self.cfg)
        self.gen = torch.Generator().manual_seed(rc.seed)
        self.step = 0
        self.metrics: list[dict[str, Any]] = []
        self._bind_model()
        if self.task.finite:
            self.train_data = self.task.dataset("train")

    # ---------------------------------------------------------------- the loop
    def _bind_model(self) -> None:
        """The training loss and the evaluation stand-in for ``self.model``, sharing one fast
        path where it applies."""
        pos = self.task.scored_positions
        fast = scored_logits_fn(self.model, self.task) if pos is not None else None
        self.loss_and_grads = self._make_loss_and_grads(fast)
        self.eval_model = self._eval_model(fast)

    def _make_loss_and_grads(self, fast: Callable[[Tensor], Tensor] | None) -> Callable[[Batch], Tensor]:
        """The task's loss on a batch (detached), with its gradients added to every parameter's
        ``.grad``; logits are computed only where the loss reads them."""
        pos, task = self.task.scored_positions, self.task

        def backward(loss: Tensor) -> Tensor:
            loss.backward()
            return loss.detach()

        if pos is None:
            # Positions that vary by example: unembed (the largest matmul) and score only the
            # rows with a target.
            def scored_rows(b: Batch) -> Tensor:
                rows = b.targets != IGNORE
                return backward(task.loss(self.model(b.tokens, rows=rows), b.targets[rows]))

            return scored_rows
        fused = scored_loss_fn(self.model, task, fast, grads=True) if fast is not None else None
        cols = _as_index(pos)
        if fused is None:
            return lambda b: backward(task.loss(self.model(b.tokens, positions=pos), b.targets[:, cols]))
        return lambda b: fused(b.tokens, b.targets[:, cols])

    def _eval_model(self, fast: Callable[[Tensor], Tensor] | None) -> Callable[[Tensor], Tensor]:
        """What evaluation runs: the model or, where the fast path applies and the task is scored
        by the base ``Task.evaluate`` (which reads logits only at scored positions), the fast
        path itself: it returns logits at its ``logits_positions`` only, and ``Task._measure``
        reads them there."""
        if fast is None or type(self.task).evaluate is not Task.evaluate:
            return self.model
        return fast

    def _batch(self) -> Batch:
        bs = self.cfg.batch_size
        if not self.task.finite:
            return self.task.sample(bs, self.gen)
        if bs is None or bs >= len(self.train_data):
            return self.train_data
        idx = torch.randint(0, len(self.train_data), (bs,), generator=self.gen)
        return self.train_data[idx]

    def _evaluate(self, train_loss: float | None, t0: float) -> dict[str, Any]:
        self.model.eval()
        m = self.task.evaluate(self.eval_model)
        self.model.train()
        row = {"step": self.step, "train_loss": train_loss, "lr": lr_at(max(self.step - 1, 0), self.cfg)}
        row.update(m)
        row["elapsed_s"] = round(time.perf_counter() - t0, 3)
        self.metrics.append(row)
        if self.out is not None:
            store.write_metrics(self.out, self.metrics)
        return row

    def run(self) -> Run:
        threads = torch.get_num_threads()
        torch.set_num_threads(threads_for(self.rc, threads))
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> Run:
        cfg = self.cfg
        bar = tqdm(
            total=cfg.steps, initial=self.step, desc=f"train {self.task.name}", unit="step",
            disable=self.quiet or not sys.stderr.isatty(), dynamic_ncols=True,
        )
        t0 = time.perf_counter() - (self.metrics[-1]["elapsed_s"] if self.metrics else 0.0)
        if self.step == 0:
            self._evaluate(None, t0)
            self._checkpoint()
        train_loss = None
        while self.step < cfg.steps:
            lr = lr_at(self.step, cfg)
            for g in self.opt.param_groups:
                g["lr"] = lr
            self.opt.zero_grad(set_to_none=True)
            train_loss = self.loss_and_grads(self._batch()).item()
            if not math.isfinite(train_loss):
                bar.close()
                raise QkovError(self._nan_message(lr))
            self.opt.step()
            self.step += 1
            bar.update(1)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                row = self._evaluate(train_loss, t0)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.4f}")
                if _target_reached(row, cfg.target_accuracy):
                    self._checkpoint()
                    break
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._checkpoint()
        bar.close()
        if self.metrics[-1]["step"] != self.step:
            self._evaluate(train_loss, t0)
        self._finish()
        self.model.eval()
        return Run(self.model, self.rc, self.metrics, self.out)

    def _nan_message(self, lr: float) -> str:
        where = ""
        if self.out is not None:
            ckpts = store.checkpoint_paths(self.out)
            where = (
                f"; the last good checkpoint (step {ckpts[-1][0]}) stays in {self.out / store.CHECKPOINTS}"
                if ckpts else f"; nothing past config.json was saved in {self.out}"
            )
        return (
            f"the training loss became NaN at step {self.step} (lr={lr:g}); "
            f"lower the learning rate, e.g. --set lr={lr / 10:g}{where}"
        )

    # ---------------------------------------------------------------- saving
    def _checkpoint(self) -> None:
        if self.out is None or not self.cfg.checkpoint_every or self.step % self.cfg.checkpoint_every:
            return
        store.save_tensors(
            self.out / store.CHECKPOINTS / f"step_{self.step}.safetensors",
            store.model_tensors(self.model), {"step": str(self.step)},
        )
        self._save_state()

    def _save_state(self) -> None:
        tensors = {f"model.{k}": v for k, v in store.model_tensors(self.model).items()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p in self.opt.param_groups[0]["params"]:
            for k, v in self.opt.state.get(p, {}).items():
                # The step counts are views of one tensor (optim.py), which safetensors
                # would refuse as shared memory: each is saved as its own copy.
                tensors[f"optim.{names[id(p)]}.{k}"] = v.clone() if k == "step" else torch.as_tensor(v)
        tensors["rng"] = self.gen.get_state()
        store.save_tensors(self.out / store.TRAIN_STATE, tensors, {"step": str(self.step)})

    def _finish(self) -> None:
        if self.out is None:
            return
        self._save_state()
        digest = store.save_tensors(self.out / store.MODEL, store.model_tensors(self.model))
        self.rc.extra["model_sha256"] = digest
        self.rc.extra["steps_done"] = self.step
        store.write_config(self.out, self.rc)

    def load_state(self, path: Path) -> None:
        tensors, _ = store.load_tensors(path / store.TRAIN_STATE, "training state")
        from safetensors import safe_open

        with safe_open(str(path / store.TRAIN_STATE), "pt") as f:
            step = int(f.metadata()["step"])
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model = store.build_model(self.rc.model, weights, str(path / store.TRAIN_STATE))
        self.model.train()
        self.opt = make_optimizer(self.model, self.cfg)
        by_name = dict(self.model.named_parameters())
        for k, v in tensors.items():
            if k.startswith("optim."):
                pname, key = k[6:].rsplit(".", 1)
                self.opt.state[by_name[pname]][key] = v
        self.gen.set_state(tensors["rng"])
        self.step = step
        self.metrics = [r for r in store.read_metrics(path) if r["step"] <= step]
        self._bind_model()


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
    for _, f in store.checkpoint_paths(out):  # the same setup is being retrained from scratch
        f.unlink()
    for name in (store.MODEL, store.TRAIN_STATE, store.METRICS):
        (out / name).unlink(missing_ok=True)
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
    task.check_model(rc.model)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        _prepare_out(out_path, rc)
    return _Trainer(rc, out_path, quiet).run()


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
    trainer = _Trainer(rc, path, quiet)
    trainer.load_state(path)
    if trainer.step >= rc.train.steps:
        raise QkovError(
            f"{path} already ran {trainer.step} steps (its config asks for {rc.train.steps}); "
            f"pass --steps N with N > {trainer.step} to train further"
        )
    rc.extra.pop("model_sha256", None)
    store.write_config(path, rc)
    return trainer.run()
