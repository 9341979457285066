"""Progress measures of grokking over a run's checkpoints (Nanda et al. 2023, section 5).

For every ``checkpoints/step_{N}.safetensors`` of a ``modadd`` run: train and test loss and
accuracy, the restricted loss (logits kept to the key frequencies' ``cos/sin(w(a+b))``
directions, over all inputs) and the excluded loss (those directions removed, on the training
set), the sum of squared weights, and the Gini coefficient of the embedding's Fourier norms.
Together they show the three phases: memorisation, circuit formation (excluded loss rises while
test loss stays high) and clean-up (weights shrink, restricted and test loss fall).

Checkpoints are read with safetensors only, never unpickled.

>>> import qkov, tempfile
>>> task = qkov.get_task("modadd", p=7)
>>> run = qkov.train(task, out=tempfile.mkdtemp() + "/run", quiet=True,
...                  train_config=task.train_config().replace(steps=20, checkpoint_every=10, eval_every=10))
>>> [row["step"] for row in progress_measures(run.path, task)]
[0, 10, 20]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor

from . import fourier
from .config import ModelConfig
from .errors import QkovError
from .fastpath import scored_logits_fn
from .model import Transformer

CHECKPOINTS = "checkpoints"
FINAL = "model.safetensors"  # the run's final weights, when training has finished


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


def checkpoint_files(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, file)`` for the run's checkpoints, in step order; a clear error when there are none."""
    folder = Path(run_dir) / CHECKPOINTS
    files = []
    if folder.is_dir():
        for f in folder.glob("step_*.safetensors"):
            step = f.stem.split("_", 1)[1]
            if step.isdigit():
                files.append((int(step), f))
    if not files:
        raise QkovError(
            f"{folder} holds no step_N.safetensors checkpoints; train with checkpoints, "
            f"e.g. qkov train modadd --set checkpoint_every=1000"
        )
    return sorted(files)


def _model_config(run_dir: Path) -> ModelConfig:
    f = run_dir / "config.json"
    try:
        return ModelConfig.from_dict(json.loads(f.read_text())["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QkovError(f"cannot read the model config from {f} ({e}); pass model_config explicitly") from None


def _load(states: Iterable[tuple[int, dict[str, Tensor], str]], cfg: ModelConfig):
    """Yield ``(step, model)``; every checkpoint must hold the same tensors as ``cfg``'s model."""
    model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith((".mask", ".IGNORE"))}
    first = None
    for step, tensors, source in states:
        shapes = {k: v.shape for k, v in tensors.items() if not k.endswith((".mask", ".IGNORE"))}
        if shapes != expected:
            diff = sorted(set(shapes) ^ set(expected)) or [k for k in expected if shapes[k] != expected[k]]
            k = diff[0]
            seen = f"{k} {tuple(shapes[k])}" if k in shapes else f"no {k}"
            want = f"{tuple(expected[k])}" if k in expected else "no such tensor"
            other = f" (the first checkpoint, {first}, matches it)" if first else ""
            raise QkovError(
                f"checkpoints mix architectures: {source} has {seen} but the model config needs {want}{other}; "
                f"keep one run's checkpoints per folder"
            )
        first = first or source
        model.load_state_dict(tensors, strict=False)
        yield step, model


@torch.no_grad()
def _measures(model, task, keys: Sequence[int], train: Tensor) -> dict[str, Any]:
    p = task.p
    tokens = task.dataset("all").tokens
    fast = scored_logits_fn(model, task)
    logits = fast(tokens) if fast is not None else model(tokens, positions=task.scored_positions)
    logits = logits[:, -1, :p].reshape(p, p, p).double()
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
    run_dir: str | Path, task, model_config: ModelConfig | None = None, key_freqs: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """One JSON-able row per checkpoint of a ``modadd`` run, in step order.

    Row keys: ``step, train_loss, train_accuracy, test_loss, test_accuracy, restricted_loss,
    excluded_loss, sum_sq_weights, gini_embed_fourier`` and, in the first row only,
    ``key_frequencies``: those of the final model (``model.safetensors``, else the last
    checkpoint) unless ``key_freqs`` is given; the paper measures every checkpoint against the
    final model's key frequencies.
    """
    fourier._residue_p(task)
    run_dir = Path(run_dir)
    cfg = model_config if model_config is not None else _model_config(run_dir)
    task.check_model(cfg)
    files = checkpoint_files(run_dir)
    states = ((step, load_file(str(f)), f"{f.parent.name}/{f.name}") for step, f in files)
    if key_freqs is None:
        final = run_dir / FINAL if (run_dir / FINAL).is_file() else files[-1][1]
        *_, (_, last) = _load([(0, load_file(str(final)), final.name)], cfg)
        key_freqs = fourier.key_frequencies(fourier.neuron_frequencies(fourier.neuron_grid(last, task)))
    keys = fourier._check_freqs(key_freqs, task.p)
    train = fourier.train_mask(task)
    rows = []
    for step, model in _load(states, cfg):
        rows.append({"step": step, **_measures(model, task, keys, train)})
    rows[0]["key_frequencies"] = keys
    return rows
