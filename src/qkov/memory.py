"""Memory estimates: what a model, its training step and an evaluation chunk will take, checked
against this machine's available memory before anything is allocated.

The estimates are arithmetic on the configs (no tensor is made): parameters, their gradients
and AdamW's two moments, the causal masks, the largest activations of one step (the residual
stream, queries/keys/values, attention scores and patterns, MLP activations, logits) for a
training batch (a finite task's whole train split when ``batch_size`` is None) or an evaluation
chunk, and a finite task's data set, sized from ``FiniteTask.n_examples()`` before it is built.
They are deliberately generous upper bounds: a config they refuse could not have run, and a
refusal says how much was asked and how much the machine has.

>>> from qkov.config import ModelConfig
>>> cfg = ModelConfig(n_layers=1, n_heads=1, d_model=32, d_vocab=64, n_ctx=6)
>>> param_count(cfg)
8576
>>> check_fits(ModelConfig(d_model=100_000_000))
Traceback (most recent call last):
...
qkov.errors.QkovError: the model needs about 1.6e+08 GB (40,000,013,800,000,064 parameters: ...
>>> from qkov.tasks import get_task
>>> task = get_task("modadd", p=113)
>>> dataset_bytes(task), train_examples(task)        # 113**2 examples of 3 tokens; 30% train
(2055809, 3831)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config import ModelConfig, TrainConfig
from .errors import QkovError

FLOAT = 4           # bytes per float32 value
EVAL_CHUNK_TOKENS = 16384  # what Task._measure feeds the model at a time
EXAMPLE_BYTES = 8 + 8 + 1  # per position of an example: its token and target (int64), its scored flag


def param_count(cfg: ModelConfig) -> int:
    """The number of parameters of a ``Transformer(cfg)`` (biases and LayerNorms included)."""
    d, h, e = cfg.d_model, cfg.n_heads, cfg.head_dim
    ln = 2 * d if cfg.normalization == "LN" else 0
    attn = 4 * h * d * e + 3 * h * e + d
    mlp = 0 if cfg.d_mlp is None else 2 * d * cfg.d_mlp + cfg.d_mlp + d
    per_layer = attn + mlp + 2 * ln
    return cfg.d_vocab * d + cfg.n_ctx * d + cfg.n_layers * per_layer + ln + d * cfg.vocab_out + cfg.vocab_out


def activation_bytes(cfg: ModelConfig, batch: int, backward: bool = True) -> int:
    """The largest activations of one forward (and backward) pass over ``batch`` sequences of
    ``n_ctx`` tokens: everything a layer keeps for its backward, for every layer, plus logits."""
    n, d, h, e = batch * cfg.n_ctx, cfg.d_model, cfg.n_heads, cfg.head_dim
    per_layer = 6 * n * d + 4 * n * h * e + 3 * n * h * cfg.n_ctx + 3 * n * (cfg.d_mlp or 0)
    layers = cfg.n_layers if backward else 1
    return FLOAT * (layers * per_layer + 3 * n * cfg.vocab_out) * (2 if backward else 1)


def n_examples(task) -> int:
    """The examples of ``task``'s fixed data set (``FiniteTask.n_examples()``); 0 for a task
    that samples its batches, or one that cannot say without building the set."""
    n = task.n_examples() if task is not None and task.finite else None
    return int(n) if n else 0


def train_examples(task) -> int:
    """The examples of ``task``'s train split (what a full-batch step, ``batch_size=None``, reads)."""
    n = n_examples(task)
    return int(round(task.params.get("train_frac", 1.0) * n)) if n else 0


def dataset_bytes(task) -> int:
    """What ``task``'s data set takes: every example's tokens, targets and scored mask, twice
    (the whole set, and its train and test splits, which are copies), plus the split's
    permutation and what building the set holds at once (about as much again for ``modadd``'s
    meshgrid); 0 for a sampled task."""
    n = n_examples(task)
    return n * (3 * task.seq_len * EXAMPLE_BYTES + 8) if n else 0


@dataclass(frozen=True)
class Estimate:
    """Bytes a run needs: ``weights`` (with masks), ``optimizer`` (gradients and AdamW moments),
    ``activations`` (the larger of a training step and an evaluation chunk) and ``data`` (a
    finite task's data set)."""

    weights: int
    optimizer: int
    activations: int
    data: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.data


def estimate(model: ModelConfig, train: TrainConfig | None = None, task=None) -> Estimate:
    """What a model takes to hold (``train=None``: weights and one evaluation chunk) or to train,
    with ``task``'s data set when it is given (a finite task's set is built whole, and a full-batch
    step runs over all of its train split)."""
    params = param_count(model)
    weights = FLOAT * params + model.n_layers * model.n_ctx ** 2  # the bool causal masks
    eval_batch = max(1, EVAL_CHUNK_TOKENS // model.n_ctx)
    acts = activation_bytes(model, eval_batch, backward=False)
    optimizer = 0
    if train is not None:
        optimizer = 3 * FLOAT * params  # gradients, exp_avg, exp_avg_sq
        batch = train.batch_size if train.batch_size is not None else train_examples(task)
        if batch:
            acts = max(acts, activation_bytes(model, batch))
    return Estimate(weights, optimizer, acts, dataset_bytes(task))


def available_bytes() -> int | None:
    """This machine's available memory (``MemAvailable`` in /proc/meminfo), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB"


FIX = "choose smaller sizes (d_model, d_mlp, n_ctx, d_vocab, n_layers, batch_size)"
FIX_DATA = "choose task parameters with fewer examples (qkov train TASK --show-config lists them)"


def check_fits(model: ModelConfig, train: TrainConfig | None = None, what: str = "the model",
               fix: str | None = None, task=None) -> Estimate:
    """The estimate (with ``task``'s data set when given), or a one-line QkovError when it
    exceeds the available memory; ``fix`` says what to do (default: smaller sizes, or, when the
    data set is most of it, a task with fewer examples)."""
    est = estimate(model, train, task)
    avail = available_bytes()
    if avail is not None and est.total > avail:
        parts = f"{param_count(model):,} parameters: weights {_gb(est.weights)}"
        if train is not None:
            parts += f", gradients and optimizer {_gb(est.optimizer)}"
        parts += f", activations {_gb(est.activations)}"
        if est.data:
            parts += f", data set {_gb(est.data)} for {n_examples(task):,} examples"
        if fix is None:
            fix = FIX_DATA if est.data > avail or 2 * est.data > est.total else FIX
        raise QkovError(
            f"{what} needs about {_gb(est.total)} ({parts}) but this machine has {_gb(avail)} available; {fix}"
        )
    return est
