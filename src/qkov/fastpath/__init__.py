"""A fast, exact training forward for one-layer models whose loss reads fixed positions.

In a one-layer transformer everything attention reads is a function of one (position, token)
pair: the query, key and value of token ``t`` at position ``j`` are rows of small tables built
from ``W_E + W_pos[j]``. So instead of projecting every example's residual stream (``batch ×
pos × d_model × d_head`` per head, per step), :func:`scored_logits_fn` builds those tables once
per call over the vocabulary and gathers rows. Without LayerNorm it goes further and pushes the
values through ``W_O W_in`` and ``W_O W_U``: the MLP pre-activations and the direct-path logits
then come out of one ``embedding_bag`` whose bags are ``(key position, token, head)`` rows
weighted by the attention pattern (plus the query's own token for the skip path). Only the
MLP's output (``relu(pre) @ W_out W_U``) stays per example: it is the one nonlinear step.

The maths is the plain forward's, reassociated; logits and gradients match
``model(tokens, positions=...)`` to float rounding (``tests/test_fastpath.py``). The function
reads the live parameters on every call, so autograd and the optimizer see through it.

Modules: ``tables`` (the tables and the forwards built on them), ``kernels`` (hand-written
autograd kernels for the attention-and-mixing step), ``attn_only`` (attention-only models with
no autograd graph at all).
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor

from ..model import Transformer
from ..tasks.base import Task
from .tables import _PushedForward, _ResidForward


def scored_logits_fn(model, task) -> Callable[[Tensor], Tensor] | None:
    """A function ``tokens [batch, pos] -> logits [batch, len(positions), d_vocab_out]``.

    ``task`` is a :class:`qkov.tasks.Task` (its ``scored_positions`` are used) or a sequence of
    query positions. The result equals ``model(tokens, positions=positions)``. Returns None
    where the shortcut does not apply: not a qkov ``Transformer``, more than one layer, or no
    fixed scored positions.

    >>> import torch
    >>> from qkov.tasks import get_task
    >>> task = get_task("modadd", p=7)
    >>> model = Transformer(task.model_config(), seed=0)
    >>> fn = scored_logits_fn(model, task)
    >>> tokens = task.dataset("all").tokens
    >>> torch.allclose(fn(tokens), model(tokens, positions=[2]), atol=1e-5)
    True
    """
    if not isinstance(model, Transformer) or model.cfg.n_layers != 1:
        return None
    positions = task if isinstance(task, Sequence) else getattr(task, "scored_positions", None)
    if positions is None or len(positions) == 0:
        return None
    positions = [int(p) for p in positions]
    if min(positions) < 0 or max(positions) >= model.cfg.n_ctx:
        return None
    if model.cfg.normalization is None:
        return _PushedForward(model, positions)
    return _ResidForward(model, positions)


def scored_loss_fn(model, task: Task, logits_fn: Callable[[Tensor], Tensor] | None = None,
                   grads: bool = False) -> Callable[[Tensor, Tensor], Tensor] | None:
    """A function ``(tokens [batch, pos], targets [batch, len(positions)]) -> loss``: the task's
    training loss (``task.loss``) of the logits at its scored positions, through the fast path.

    One-layer attention-only models (``max``) get the cross-entropy fused into the hand-written
    kernel when the task's loss is the base mean cross-entropy in the weights' dtype; the rest
    get ``task.loss(scored_logits_fn(model, task)(tokens), targets)``. Returns None where
    :func:`scored_logits_fn` does. ``logits_fn``: that function, when the caller already has it.
    With ``grads=True`` the function also adds the loss's gradients to the parameters' ``.grad``
    and returns the loss detached: the fused kernel runs its backward at once, without autograd
    (what the trainer uses); the other paths call ``backward()``.

    >>> import torch
    >>> from qkov.tasks import get_task
    >>> task = get_task("max")
    >>> model = Transformer(task.model_config(), seed=0)
    >>> batch = task.sample(512, torch.Generator().manual_seed(0))
    >>> targets = batch.targets[:, task.scored_positions]
    >>> fused = scored_loss_fn(model, task)(batch.tokens, targets)
    >>> plain = task.loss(model(batch.tokens, positions=task.scored_positions), targets)
    >>> torch.allclose(fused, plain)
    True
    """
    logits_fn = logits_fn or scored_logits_fn(model, task)
    if logits_fn is None:
        return None
    # Decided once: the other models never try the fused kernel (nor check their tokens twice).
    fused = isinstance(logits_fn, _PushedForward) and logits_fn.attn_only and type(task).loss is Task.loss

    def loss(tokens: Tensor, targets: Tensor) -> Tensor:
        out = logits_fn.loss(tokens, targets, task.loss_dtype) if fused else None
        return out if out is not None else task.loss(logits_fn(tokens), targets)

    def loss_with_grads(tokens: Tensor, targets: Tensor) -> Tensor:
        out = logits_fn.loss_with_grads(tokens, targets, task.loss_dtype) if fused else None
        if out is None:
            out = task.loss(logits_fn(tokens), targets)
            out.backward()
        return out.detach()

    return loss_with_grads if grads else loss
