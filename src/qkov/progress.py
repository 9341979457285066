"""Progress measures of grokking over a run's checkpoints (Nanda et al. 2023, section 5).

For every ``(step, model)`` checkpoint of a ``modadd`` run: train and test loss and accuracy,
the restricted loss (logits kept to the key frequencies' ``cos/sin(w(a+b))`` directions, over
all inputs) and the excluded loss (those directions removed, on the training set), the sum of
squared weights, and the Gini coefficient of the embedding's Fourier norms. Together they show
the three phases: memorisation, circuit formation (excluded loss rises while test loss stays
high) and clean-up (weights shrink, restricted and test loss fall).

The measures are a function of the models only; a run directory's checkpoints come from
:func:`qkov.store.checkpoints` (passing the directory does that for you).

>>> import qkov, tempfile
>>> task = qkov.get_task("modadd", p=7)
>>> run = qkov.train(task, out=tempfile.mkdtemp() + "/run", quiet=True,
...                  train_config=task.train_config().replace(steps=20, checkpoint_every=10, eval_every=10))
>>> [row["step"] for row in progress_measures(run.path, task)]
[0, 10, 20]
>>> pairs = qkov.store.checkpoints(run.path)
>>> rows = progress_measures(pairs, task, final_model=run.model)
>>> len(rows), rows[0]["key_frequencies"] == progress_measures(run.path, task)[0]["key_frequencies"]
(3, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import fourier, store
from .devices import model_device
from .errors import QkovError
from .fastpath import plan
from .model import Transformer
from .tasks import Task, get_task


def gini(x: Tensor) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, → 1 when one holds everything."""
    x = x.double().flatten().sort().values
    n = x.numel()
    if n == 0 or float(x.sum()) <= 0:
        return 0.0
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * i - n - 1) * x).sum() / (n * x.sum()))


def embedding_fourier_norms(model, p: int) -> Tensor:
    """``[p]`` norm of each Fourier component (const, cos 1, sin 1, ...) of ``W_E``'s residue rows."""
    return fourier.fft1d(model.W_E[:p].double(), dim=0).norm(dim=1)


@torch.no_grad()
def _measures(model, task, keys: Sequence[int], train: Tensor) -> dict[str, Any]:
    p = task.p
    tokens = task.dataset("all").tokens.to(model_device(model))
    # Scalars from here on: the [p, p, p] logits come back to the CPU once.
    logits = plan(model, task).logits(tokens)[:, -1, :p].reshape(p, p, p).double().cpu()
    s = torch.arange(p)
    hit = logits.argmax(-1) == (s[:, None] + s[None, :]) % p
    test = ~train
    out = {
        "train_loss": fourier._loss(logits, train),
        "train_accuracy": float(hit[train].float().mean()),
        "test_loss": fourier._loss(logits, test) if test.any() else None,
        "test_accuracy": float(hit[test].float().mean()) if test.any() else None,
        "restricted_loss": fourier.restricted_loss(logits, keys) if keys else None,
        "excluded_loss": fourier.excluded_loss(logits, keys, train) if keys else None,
        "sum_sq_weights": float(sum(q.double().pow(2).sum() for q in model.parameters())),
        "gini_embed_fourier": gini(embedding_fourier_norms(model, p)),
    }
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in out.items()}


def progress_measures(
    checkpoints: Iterable[tuple[int, Transformer]] | str | Path,
    task: Task | str,
    key_freqs: Sequence[int] | None = None,
    final_model: Transformer | None = None,
) -> list[dict[str, Any]]:
    """One JSON-able row per checkpoint of a ``modadd`` run, in the order given.

    ``checkpoints``: ``(step, model)`` pairs, such as :func:`qkov.store.checkpoints` yields (in
    step order), or a run directory to read them from. ``task``: the run's task or its name.
    Row keys: ``step, train_loss, train_accuracy, test_loss, test_accuracy, restricted_loss,
    excluded_loss, sum_sq_weights, gini_embed_fourier`` and, in the first row only,
    ``key_frequencies``: ``key_freqs`` when given, else those of ``final_model``; the paper
    measures every checkpoint against the final model's key frequencies. Without either, the
    final model is the run's ``model.safetensors`` for a run directory and the last checkpoint
    otherwise (the pairs are then held in memory until it is reached; pass one of the two to
    measure a long run one checkpoint at a time).
    """
    task = get_task(task) if isinstance(task, str) else task
    fourier._residue_p(task)
    if isinstance(checkpoints, (str, Path)):
        run_dir, checkpoints = checkpoints, store.checkpoints(checkpoints)
        if key_freqs is None and final_model is None:
            final_model = store.load_final(run_dir)
    if key_freqs is None:
        if final_model is None:
            checkpoints = list(checkpoints)
            final_model = checkpoints[-1][1] if checkpoints else None
        if final_model is not None:
            task.check_model(final_model.cfg)
            key_freqs = fourier.key_frequencies(fourier.neuron_frequencies(fourier.neuron_grid(final_model, task)))
    keys = fourier._check_freqs(key_freqs or [], task.p)
    train = fourier.train_mask(task)
    rows = []
    for step, model in checkpoints:
        task.check_model(model.cfg)
        rows.append({"step": step, **_measures(model, task, keys, train)})
    if not rows:
        raise QkovError("progress_measures got no checkpoints; pass (step, model) pairs, "
                        "e.g. qkov.store.checkpoints(run_dir)")
    rows[0]["key_frequencies"] = keys
    return rows
