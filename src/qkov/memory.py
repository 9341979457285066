"""Memory estimates: what a model, its training step and an evaluation chunk will take, checked
against this machine's available memory before anything is allocated.

The estimates are arithmetic on the configs (no tensor is made): parameters, their gradients
and AdamW's two moments, the causal masks, and the largest activations of one step (the
residual stream, queries/keys/values, attention scores and patterns, MLP activations, logits)
for a training batch or an evaluation chunk. They are deliberately generous upper bounds: a
config they refuse could not have run, and a refusal says how much was asked and how much the
machine has.

>>> from qkov.config import ModelConfig
>>> cfg = ModelConfig(n_layers=1, n_heads=1, d_model=32, d_vocab=64, n_ctx=6)
>>> param_count(cfg)
8576
>>> check_fits(ModelConfig(d_model=100_000_000))
Traceback (most recent call last):
...
qkov.errors.QkovError: the model needs about 1.6e+08 GB (40,000,013,800,000,064 parameters: ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config import ModelConfig, TrainConfig
from .errors import QkovError

FLOAT = 4           # bytes per float32 value
EVAL_CHUNK_TOKENS = 16384  # what Task._measure feeds the model at a time


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


@dataclass(frozen=True)
class Estimate:
    """Bytes a run needs: ``weights`` (with masks), ``optimizer`` (gradients and AdamW moments),
    ``activations`` (the larger of a training step and an evaluation chunk)."""

    weights: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations


def estimate(model: ModelConfig, train: TrainConfig | None = None) -> Estimate:
    """What a model takes to hold (``train=None``: weights and one evaluation chunk) or to train."""
    params = param_count(model)
    weights = FLOAT * params + model.n_layers * model.n_ctx ** 2  # the bool causal masks
    eval_batch = max(1, EVAL_CHUNK_TOKENS // model.n_ctx)
    acts = activation_bytes(model, eval_batch, backward=False)
    optimizer = 0
    if train is not None:
        optimizer = 3 * FLOAT * params  # gradients, exp_avg, exp_avg_sq
        if train.batch_size is not None:
            acts = max(acts, activation_bytes(model, train.batch_size))
    return Estimate(weights, optimizer, acts)


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


def check_fits(model: ModelConfig, train: TrainConfig | None = None, what: str = "the model",
               fix: str = "choose smaller sizes (d_model, d_mlp, n_ctx, d_vocab, n_layers, batch_size)") -> Estimate:
    """The estimate, or a one-line QkovError when it exceeds the available memory."""
    est = estimate(model, train)
    avail = available_bytes()
    if avail is not None and est.total > avail:
        parts = f"{param_count(model):,} parameters: weights {_gb(est.weights)}"
        if train is not None:
            parts += f", gradients and optimizer {_gb(est.optimizer)}"
        parts += f", activations {_gb(est.activations)}"
        raise QkovError(
            f"{what} needs about {_gb(est.total)} ({parts}) but this machine has {_gb(avail)} available; {fix}"
        )
    return est
