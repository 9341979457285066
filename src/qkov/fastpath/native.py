"""The C kernels of the attention-only fast path (``_native.c``), where they were built.

A ``max`` training step spends most of its time after the tables: per example, gathering a
handful of 64-wide table rows, a 6-key softmax and a cross-entropy, done by torch as ~40 calls
over batch-sized intermediates. ``_native.c`` does that part in one pass per example, forward and
backward, and writes the three tables' gradients; everything before (the tables from the weights)
and after (from the tables' gradients back to the weights) stays in torch
(``fastpath/factored.py``). The results equal the table path's and the plain forward's to
float rounding (``tests/test_native.py``).

The extension is built by ``pip install`` where a C compiler is present (an optional build:
without one, qkov installs all the same and trains through the table path). ``QKOV_NATIVE=0`` in the
environment, or :func:`use_native` ``(False)``, turns it off.

>>> import torch
>>> scores = torch.zeros(1, 2 * 3, 3 + 1)                 # h=1, nk=2 keys, V=3 tokens, P=1 query
>>> ov, skip = torch.zeros(2 * 3, 4), torch.zeros(1 * 3, 4)   # w=4 outputs
>>> grads = [torch.empty_like(t) for t in (scores, ov, skip)]
>>> loss = loss_and_grads((scores, ov, skip), torch.tensor([[0, 2]]), torch.tensor([[3]]), torch.tensor([1]), grads)
>>> round(loss, 4)                                        # four equal logits: log 4
1.3863
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..tasks import IGNORE

try:
    from . import _native
except ImportError:  # built without a C compiler: the table path runs instead
    _native = None

_enabled = os.environ.get("QKOV_NATIVE", "1") != "0"


def available() -> bool:
    """Whether the C kernels were built and are switched on."""
    return _native is not None and _enabled


def use_native(on: bool) -> bool:
    """Switch the C kernels on or off (e.g. to compare with the table path); returns the previous
    setting. It counts when a plan is made (``fastpath.plan``), not for plans already made."""
    global _enabled
    old, _enabled = _enabled, bool(on)
    return old


def _checked(tables, tokens: Tensor, targets: Tensor, pos: Tensor, outs: tuple[Tensor, ...] = ()) -> tuple:
    """The raw addresses, strides and sizes ``_native`` reads, after the one check of everything
    it assumes: every tensor on the CPU, tables (and gradient buffers ``outs``) float32,
    contiguous and of consistent shapes; tokens, targets and positions int64 of the sizes the
    tables imply; every index in range (tokens in ``0..V-1`` at the key positions, targets in
    ``0..v_out-1`` or ``IGNORE``, positions in ``0..n_keys-1``). Nothing reaches the kernel, and
    no address is taken, before all of it holds: a tensor it could not read raises ValueError.
    """
    scores, ov, skip = tables
    named = dict(scores=scores, ov=ov, skip=skip, tokens=tokens, targets=targets, positions=pos)
    named.update({f"output {i}": t for i, t in enumerate(outs)})
    for name, t in named.items():
        if not isinstance(t, Tensor) or t.device.type != "cpu":
            raise ValueError(f"the C kernel reads CPU tensors only; {name} is on {getattr(t, 'device', type(t))}")
    for name, t in list(named.items())[:3] + list(named.items())[6:]:
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor; got {t.dtype}, strides {t.stride()}")
    for name, t in (("tokens", tokens), ("targets", targets), ("positions", pos)):
        if t.dtype != torch.int64:
            raise ValueError(f"{name} must be int64; got {t.dtype}")
    if scores.ndim != 3 or ov.ndim != 2 or skip.ndim != 2 or pos.ndim != 1 or not pos.is_contiguous():
        raise ValueError(f"tables of the wrong rank: {[tuple(t.shape) for t in tables]}, positions {tuple(pos.shape)}")
    h, R, C = scores.shape
    P, w = len(pos), skip.shape[1]
    V = C - P
    nk = R // V if V > 0 else 0
    if V < 1 or R != nk * V or ov.shape != (R, h * w) or skip.shape != (P * V, w):
        raise ValueError(f"tables of inconsistent shapes: {[tuple(t.shape) for t in tables]} for {P} positions")
    B = len(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < nk or targets.shape != (B, P):
        raise ValueError(f"tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)} do not fit "
                         f"{B} examples, {nk} key positions and {P} scored positions")
    if B and P:
        lo, hi = (int(x) for x in torch.aminmax(tokens[:, :nk]))
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids from {lo} to {hi} are outside 0..{V - 1}")
        lo, hi = (int(x) for x in torch.aminmax(targets.masked_fill(targets == IGNORE, 0)))
        if lo < 0 or hi >= w:
            raise ValueError(f"targets from {lo} to {hi} are outside 0..{w - 1} (or {IGNORE}: ignored)")
    if P and (int(pos.min()) < 0 or int(pos.max()) >= nk):
        raise ValueError(f"scored positions {pos.tolist()} are outside the {nk} key positions")
    return (scores.data_ptr(), ov.data_ptr(), skip.data_ptr(), tokens.data_ptr(), *tokens.stride(),
            targets.data_ptr(), *targets.stride(), pos.data_ptr(), B, nk, P, V, h, w)


def loss_and_grads(tables, tokens: Tensor, targets: Tensor, pos: Tensor, grads) -> float:
    """Mean cross-entropy of the logits at the scored positions ``pos`` against ``targets [b, p]``
    (``IGNORE`` where a query has none); the tables' gradients are written into ``grads``
    (float32, contiguous, shaped as the tables). Layouts: see ``_native.c`` and ``factored.Tables``."""
    for g, t in zip(grads, tables):
        if g.shape != t.shape:
            raise ValueError(f"gradient buffer {tuple(g.shape)} does not match its table {tuple(t.shape)}")
    args = _checked(tables, tokens, targets, pos, tuple(grads))
    loss = _native.loss_and_grads(*args, *(g.data_ptr() for g in grads), 0)
    return max(loss, 0.0) if loss == loss else loss      # rounding never reports a loss below 0; NaN stays


def nll_and_prediction(tables, tokens: Tensor, targets: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """The NLL of each target (class 0 where ``IGNORE``) and the first argmax of the logits at
    each scored position, ``[b, p]`` each: what evaluation reads."""
    nll = torch.empty(targets.shape, dtype=torch.float32)
    pred = torch.empty(targets.shape, dtype=torch.int64)
    args = _checked(tables, tokens, targets, pos)
    _native.nll_and_prediction(*args, nll.data_ptr(), pred.data_ptr(), 0, 0)
    return nll.clamp_(min=0), pred                       # as tasks.nll_and_prediction: never below 0
