"""The C kernels of the attention-only fast path (``_native.c``), where they were built.

A ``max`` training step spends most of its time after the tables: per example, gathering a
handful of 64-wide table rows, a 6-key softmax and a cross-entropy, done by torch as ~40 calls
over batch-sized intermediates. ``_native.c`` does that part in one pass per example, forward and
backward, and writes the three tables' gradients; everything before (the tables from the weights)
and after (from the tables' gradients back to the weights) stays in torch
(``fastpath/attn_only.py``). The results equal the torch kernels' to float rounding
(``tests/test_native.py``).

The extension is built by ``pip install`` where a C compiler is present (an optional build:
without one, qkov installs all the same and runs the torch kernels). ``QKOV_NATIVE=0`` in the
environment, or :func:`use_native` ``(False)``, turns it off.

>>> import torch
>>> s2 = torch.zeros(1, 2 * 3, 3 + 1)                     # h=1, nk=2 keys, V=3 tokens, P=1 query
>>> ov, skip = torch.zeros(2 * 3, 4), torch.zeros(1 * 3, 4)   # w=4 outputs
>>> grads = [torch.empty_like(t) for t in (s2, ov, skip)]
>>> loss = loss_and_grads(s2, ov, skip, torch.tensor([[0, 2]]), torch.tensor([[3]]), torch.tensor([1]), *grads)
>>> round(loss, 4)                                        # four equal logits: log 4
1.3863
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    from . import _native
except ImportError:  # built without a C compiler: the torch kernels run instead
    _native = None

_enabled = os.environ.get("QKOV_NATIVE", "1") != "0"


def available() -> bool:
    """Whether the C kernels were built and are switched on."""
    return _native is not None and _enabled


def use_native(on: bool) -> bool:
    """Switch the C kernels on or off (e.g. to compare with the torch kernels); returns the
    previous setting."""
    global _enabled
    old, _enabled = _enabled, bool(on)
    return old


def applies(dtype: torch.dtype, tokens: Tensor, n_keys: int) -> bool:
    """Whether the C kernels can take a model with weights of ``dtype`` on these tokens: built
    and on, float32 weights, and tokens that reach every key position."""
    return available() and dtype == torch.float32 and tokens.shape[1] >= n_keys


def _args(s2: Tensor, ov: Tensor, skip: Tensor, tokens: Tensor, targets: Tensor, pos: Tensor) -> tuple:
    """The raw addresses, strides and sizes ``_native`` reads, after checking what it assumes."""
    h, R, C = s2.shape
    P, B = len(pos), len(tokens)
    V = C - P
    nk, w = R // V, skip.shape[1]
    tables = (s2, ov, skip)
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tables) or ov.shape != (R, h * w) \
            or skip.shape != (P * V, w) or R != nk * V:
        raise ValueError(f"tables of inconsistent shapes or layout: {[tuple(t.shape) for t in tables]}")
    if targets.shape != (B, P) or tokens.ndim != 2 or tokens.shape[1] < nk:
        raise ValueError(f"tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)} do not fit "
                         f"{B} examples, {nk} key positions and {P} scored positions")
    if pos.dtype != torch.int64 or not pos.is_contiguous():
        raise ValueError("positions must be a contiguous int64 tensor")
    return (s2.data_ptr(), ov.data_ptr(), skip.data_ptr(), tokens.data_ptr(), *tokens.stride(),
            targets.data_ptr(), *targets.stride(), pos.data_ptr(), B, nk, P, V, h, w)


def loss_and_grads(s2: Tensor, ov: Tensor, skip: Tensor, tokens: Tensor, targets: Tensor, pos: Tensor,
                   g_s2: Tensor, g_ov: Tensor, g_skip: Tensor) -> float:
    """Mean cross-entropy of the logits at the scored positions ``pos`` against ``targets [b, p]``
    (``IGNORE`` where a query has none); the tables' gradients are written into ``g_s2``,
    ``g_ov``, ``g_skip`` (float32, contiguous, shaped as the tables). Layouts: see ``_native.c``."""
    tokens, targets = tokens.long(), targets.long()
    args = _args(s2, ov, skip, tokens, targets, pos)
    for g, t in zip((g_s2, g_ov, g_skip), (s2, ov, skip)):
        if g.shape != t.shape or g.dtype != torch.float32 or not g.is_contiguous():
            raise ValueError(f"gradient buffer {tuple(g.shape)} does not match its table {tuple(t.shape)}")
    return _native.loss_and_grads(*args, g_s2.data_ptr(), g_ov.data_ptr(), g_skip.data_ptr(), 0)


def nll_and_prediction(s2: Tensor, ov: Tensor, skip: Tensor, tokens: Tensor, targets: Tensor,
                       pos: Tensor) -> tuple[Tensor, Tensor]:
    """The NLL of each target (class 0 where ``IGNORE``) and the first argmax of the logits at
    each scored position, ``[b, p]`` each: what evaluation reads."""
    tokens, targets = tokens.long(), targets.long()
    args = _args(s2, ov, skip, tokens, targets, pos)
    nll = torch.empty(targets.shape, dtype=torch.float32)
    pred = torch.empty(targets.shape, dtype=torch.int64)
    _native.nll_and_prediction(*args, nll.data_ptr(), pred.data_ptr(), 0, 0)
    return nll, pred
