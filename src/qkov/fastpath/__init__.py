"""One door to the ways a model's loss and evaluation are computed: :func:`plan`.

``plan(model, task)`` looks at the model and the task once and returns a :class:`Plan`; the
trainer and ``Task.evaluate`` use its three methods and never ask which one they got:

- ``logits(tokens)``: logits ``[b, p, v]`` at the task's scored positions (every position when
  the task's positions vary by example), differentiable;
- ``loss_and_grads(batch)``: the task's loss on a batch, its gradients added to the trainable
  parameters' ``.grad``, returned detached (``loss(batch)`` keeps the graph);
- ``nll_and_prediction(tokens, targets)``: what evaluation reads, the NLL of each target and
  the first argmax, ``[b, p]`` each.

There are three implementations, each tested against the first:

- ``"plain"``: the model's own forward, the reference; any model, any task;
- ``"tables"`` (:mod:`.tables`): one-layer qkov models scored at fixed positions, on any device:
  attention and mixing from (position, token) tables;
- ``"native"`` (:mod:`.native`, :mod:`.factored`): one-layer attention-only models without
  LayerNorm, float32 on the CPU, trained with the task's standard cross-entropy, where the C
  extension was built: tables in torch, everything per example in C.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import Transformer
from ..tasks import IGNORE, Batch, Scorer, Task, as_index
from . import native
from .factored import Buffers, build_tables, tables_backward
from .tables import TablePath

__all__ = ["Plan", "plan", "native"]


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


def plan(model, task: Task | Sequence[int]) -> Plan:
    """How ``model`` is trained and evaluated on ``task`` (a :class:`qkov.Task`, or a sequence of
    scored positions with the mean cross-entropy as the loss). Made once per model: it binds to
    where the model's weights are now (moving the model later needs a new plan).

    >>> from qkov.tasks import get_task
    >>> task = get_task("modadd", p=7)
    >>> model = Transformer(task.model_config(), seed=0)
    >>> fast = plan(model, task)
    >>> fast.kind
    'tables'
    >>> tokens = task.dataset("all").tokens
    >>> torch.allclose(fast.logits(tokens), model(tokens, positions=[2]), atol=1e-5)
    True
    """
    if isinstance(task, Task):
        positions, loss, standard = task.scored_positions, task.loss, type(task).loss is Task.loss
        loss_dtype = task.loss_dtype
    else:
        positions, loss, standard, loss_dtype = [int(p) for p in task], _cross_entropy, True, torch.float32
    if not _tables_apply(model, positions):
        return Plan(model, positions, loss)
    path = TablePath(model, positions)
    if standard and _native_applies(model, loss_dtype):
        return NativePlan(model, path, loss)
    return TablePlan(model, path, loss)


def _tables_apply(model, positions: list[int] | None) -> bool:
    """A one-layer causal qkov model without padding, scored at fixed positions inside its context."""
    return (isinstance(model, Transformer) and model.cfg.n_layers == 1 and bool(positions)
            and model.cfg.causal_unpadded
            and min(positions) >= 0 and max(positions) < model.cfg.n_ctx)


def _native_applies(model: Transformer, loss_dtype: torch.dtype) -> bool:
    """Attention-only, no LayerNorm, float32 weights on the CPU and a float32 loss, C built."""
    W_E = model.embed.W_E
    return (native.available() and model.cfg.d_mlp is None and model.cfg.normalization is None
            and W_E.device.type == "cpu" and W_E.dtype == torch.float32 and loss_dtype == torch.float32
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()))


class Plan(Scorer):
    """The plain forward: the reference every other plan is tested against."""

    kind = "plain"

    def __init__(self, model, positions: list[int] | None, loss: Callable[[Tensor, Tensor], Tensor]):
        super().__init__(model, positions)
        self._loss = loss
        self.columns = slice(None) if positions is None else as_index(self.positions)

    def logits(self, tokens: Tensor) -> Tensor:
        if self.positions is not None and isinstance(self.model, Transformer):
            return self.model(tokens, positions=self.positions)
        return super().logits(tokens)

    def loss(self, batch: Batch) -> Tensor:
        """The task's loss on ``batch``, differentiable."""
        if self.positions is None and isinstance(self.model, Transformer):
            # Positions that vary by example: unembed (the largest matmul) only rows with a target.
            rows = batch.targets != IGNORE
            return self._loss(self.model(batch.tokens, rows=rows), batch.targets[rows])
        return self._loss(self.logits(batch.tokens), batch.targets[:, self.columns])

    def loss_and_grads(self, batch: Batch) -> Tensor:
        """:meth:`loss`, with its gradients added to the parameters' ``.grad``; detached."""
        loss = self.loss(batch)
        loss.backward()
        return loss.detach()


class TablePlan(Plan):
    """One-layer qkov models at fixed positions: logits from (position, token) tables."""

    kind = "tables"

    def __init__(self, model: Transformer, path: TablePath, loss: Callable[[Tensor, Tensor], Tensor]):
        super().__init__(model, path.positions, loss)
        self.path = path

    def logits(self, tokens: Tensor) -> Tensor:
        return self.path(self.model._check_tokens(tokens))


class NativePlan(TablePlan):
    """Attention-only models on the CPU: training steps and evaluation through the C kernel.

    :meth:`loss_and_grads` builds the tables in torch, lets the C kernel run every example
    forward and backward and write the tables' gradients, and takes those back to the weights
    by hand (``factored.tables_backward``): no autograd graph at all. :meth:`logits` and
    :meth:`loss` (which keep a graph) run the table path.
    """

    kind = "native"

    def __init__(self, model: Transformer, path: TablePath, loss: Callable[[Tensor, Tensor], Tensor]):
        super().__init__(model, path, loss)
        self.buffers = Buffers()          # the tables and their gradients, reused across steps

    def _params(self) -> tuple[Tensor, ...]:
        m, attn = self.model, self.path.block.attn
        return (m.embed.W_E, m.pos_embed.W_pos, attn.W_Q, attn.b_Q, attn.W_K, attn.b_K, attn.W_V, attn.b_V,
                attn.W_O, attn.b_O, m.unembed.W_U, m.unembed.b_U)

    @torch.no_grad()
    def loss_and_grads(self, batch: Batch) -> Tensor:
        params = self._params()
        tables, factors = build_tables(self.path, params, self.buffers)
        grads = tuple(self.buffers.empty(f"grad_{name}", t.shape, t) for name, t in zip(tables._fields, tables))
        tokens = self.model._check_tokens(batch.tokens)
        loss = native.loss_and_grads(tables, tokens, batch.targets[:, self.columns], self.path.pos_idx, grads)
        for p, g in zip(params, tables_backward(self.path, factors, params, *grads)):
            if not p.requires_grad:        # frozen (e.g. unused biases): no .grad at all
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad += g
        return torch.tensor(loss, dtype=tables.scores.dtype)

    @torch.no_grad()
    def nll_and_prediction(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        tables, _ = build_tables(self.path, self._params(), self.buffers)
        return native.nll_and_prediction(tables, self.model._check_tokens(tokens), targets, self.path.pos_idx)
