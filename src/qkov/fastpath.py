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
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import Transformer, heads_matrix


def scored_logits_fn(model, task) -> Callable[[Tensor], Tensor] | None:
    """A function ``tokens [batch, pos] -> logits [batch, len(positions), d_vocab_out]``.

    ``task`` is a :class:`qkov.tasks.Task` (its ``scored_positions`` are used) or a sequence of
    query positions. The result equals ``model(tokens, positions=positions)``. Returns None
    where the shortcut does not apply: not a qkov ``Transformer``, more than one layer, or no
    fixed scored positions.

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


# Use the score table when it has at most this many entries per (example, query, key) triple
# in the batch (measured on CPU: max at batch 512, add and fib full batch all gain from it).
_SCORE_TABLE_RATIO = 32


def _project(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``x [..., d] @ W [h, d, e] + b [h, e]`` -> ``[..., h, e]``: one matmul over all heads
    (at these sizes an einsum's permutes and batched matmul cost more than the product)."""
    h, d, e = W.shape
    out = torch.addmm(b.reshape(h * e), x.reshape(-1, d), heads_matrix(W))
    return out.view(*x.shape[:-1], h, e)


def _per_head(v: Tensor, M: Tensor) -> Tensor:
    """``v [..., h, e]`` times each head's ``M [h, e, c]`` -> ``[..., h, c]``."""
    h, e, c = M.shape
    out = torch.bmm(v.reshape(-1, h, e).transpose(0, 1), M)                   # [h, rows, c]
    return out.transpose(0, 1).reshape(*v.shape[:-1], c)


class _TableForward:
    """Shared part: attention patterns at the scored positions from (position, token) tables."""

    def __init__(self, model: Transformer, positions: list[int]):
        self.model = model
        self.block = model.blocks[0]
        self.positions = positions
        self.n_keys = max(positions) + 1          # causal: later keys are never read
        self.pos_idx = torch.tensor(positions)
        # Keys after a scored query position: masked out of its softmax. [k, 1, p, 1]
        self._masked = torch.arange(self.n_keys)[:, None, None, None] > self.pos_idx[None, None, :, None]

    def _embed_table(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The checked tokens and the residual stream's start for every (position, token):
        ``W_E[t] + W_pos[j]`` at ``[j, t]``, ``[n, V, d]``."""
        tokens = self.model._check_tokens(tokens)
        W_E, W_pos = self.model.embed.W_E, self.model.pos_embed.W_pos[:tokens.shape[1]]
        return tokens, W_E[None] + W_pos[:, None]

    def _qkv_tables(self, x_tab: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value tables ``[p, V, h, e]``, ``[k, V, h, e]``, ``[k, V, h, e]``."""
        attn = self.block.attn
        xk = x_tab[:self.n_keys]                                               # [k, V, d]
        return (_project(x_tab[self.pos_idx], attn.W_Q, attn.b_Q),
                _project(xk, attn.W_K, attn.b_K), _project(xk, attn.W_V, attn.b_V))

    def _use_score_table(self, batch: int, V: int) -> bool:
        """Every (query row, key row) score from one matmul per head, then a gather per example:
        a matmul runs far faster than per-example dot products (and their broadcast backward),
        so this wins unless the batch is much smaller than the table."""
        P, nk = len(self.positions), self.n_keys
        return P * V * nk * V <= _SCORE_TABLE_RATIO * batch * P * nk

    def _score_table(self, q_tab: Tensor, k_tab: Tensor) -> Tensor:
        """``s[h, k*V + t', p*V + t]``: the scaled score of key token t' at key position k for
        query token t at scored position p; ``[h, k*V, p*V]``."""
        nk, V, h, e = k_tab.shape
        P = q_tab.shape[0]
        return torch.bmm(k_tab.reshape(nk * V, h, e).transpose(0, 1),
                         (q_tab.reshape(P * V, h, e) / e**0.5).permute(1, 2, 0))

    def _score_index(self, k_rows: Tensor, q_rows: Tensor, h: int, V: int) -> Tensor:
        """Flat indices ``[k, b, p, h]`` of each example's scores in a ``_score_table``."""
        nkV, PV = self.n_keys * V, len(self.positions) * V
        return ((torch.arange(h) * nkV)[None, None, None, :] + k_rows.T[:, :, None, None]) * PV + q_rows[None, :, :, None]

    def _pattern(self, tokens: Tensor, q_tab: Tensor, k_tab: Tensor) -> Tensor:
        """Attention pattern ``[b, p, k, h]`` at the scored positions."""
        nk, V, h, e = k_tab.shape
        B, P = len(tokens), len(self.positions)
        # Row j*V + t of a flattened table is token t at (scored or key) position j.
        q_rows = self._query_rows(tokens, V)                                   # [b, p]
        k_rows = self._key_rows(tokens, V)                                     # [b, k]
        if self._use_score_table(B, V):
            idx = self._score_index(k_rows, q_rows, h, V)                      # [k, b, p, h]
            scores = self._score_table(q_tab, k_tab).reshape(-1).index_select(0, idx.reshape(-1)).view(nk, B, P, h)
        else:
            q = F.embedding(q_rows, q_tab.reshape(-1, h * e)).view(1, B, P, h, e)      # [1, b, p, h, e]
            k = F.embedding(k_rows.T, k_tab.reshape(-1, h * e)).view(nk, B, 1, h, e)   # [k, b, 1, h, e]
            scores = (q * k).sum(-1) / e**0.5                                  # [k, b, p, h]
        # Key position first: a softmax over a leading dim is vectorised across the batch, several
        # times faster on CPU than one over a short last dim.
        return scores.masked_fill(self._masked, float("-inf")).softmax(dim=0).permute(1, 2, 0, 3)

    def _attend_mix(self, tokens: Tensor, q_tab: Tensor, k_tab: Tensor,
                    tables: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        """Attention at the scored positions, then ``_mix`` of ``tables``: ``[b*p, w]`` each."""
        nk, V, h, _ = k_tab.shape
        B, P = len(tokens), len(self.positions)
        if P > 1 and self._use_score_table(B, V):
            # Several scored positions share each example's value rows: one bmm per table, with
            # the hand-written backward of _AttendMix (the step's cost at these sizes is autograd's
            # per-op overhead, not arithmetic).
            q_rows = self._query_rows(tokens, V)
            k_rows = self._key_rows(tokens, V)
            flat = []
            for ov, sk in tables:
                flat += [ov.reshape(nk * V, -1), sk.reshape(P * V, -1)]
            outs = _AttendMix.apply(self._score_table(q_tab, k_tab).reshape(-1), self._score_index(k_rows, q_rows, h, V),
                                    self._masked, k_rows, q_rows, *flat)
            return tuple(o.view(B * P, -1) for o in outs)
        pattern = self._pattern(tokens, q_tab, k_tab)
        return (self._mix_bmm if P > 1 else self._mix)(tokens, pattern, tables)

    def _query_rows(self, tokens: Tensor, V: int) -> Tensor:
        """Row ``i*V + t`` of a table over (scored position i, token t), per example."""
        return torch.arange(len(self.positions)) * V + tokens[:, self.pos_idx]   # [b, p]

    def _key_rows(self, tokens: Tensor, V: int) -> Tensor:
        """Row ``j*V + t`` of a table over (key position j, token t), per example."""
        return torch.arange(self.n_keys) * V + tokens[:, :self.n_keys]         # [b, k]

    def _mix(self, tokens: Tensor, pattern: Tensor, tables: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        """``Σ_(k,h) pattern · ov_tab[k, token_k, h] + skip_tab[p, token_p]`` per (example, scored position).

        ``tables`` holds ``(ov_tab [k, V, h, w], skip_tab [p, V, w])`` pairs that share the same
        mixing (one output ``[b*p, w]`` each). One weighted bag per (example, scored position):
        the value-table rows ``(k*V + token_k)*h + head`` weighted by the pattern, then the query
        token's skip row (weight 1), which follows the value table. Rows increase along each bag.
        """
        B, P, nk, h = pattern.shape
        V = tables[0][0].shape[1]
        kv = self._key_rows(tokens, V) * h                                     # [b, k]
        rows = (kv[:, :, None] + torch.arange(h)).reshape(B, 1, nk * h).expand(B, P, nk * h)
        skip = nk * V * h + self._query_rows(tokens, V)                        # [b, p]
        rows = torch.cat([rows, skip[..., None]], dim=-1)                      # [b, p, k*h + 1]
        weights = torch.cat([pattern.reshape(B, P, nk * h), pattern.new_ones(B, P, 1)], dim=-1)
        flat = [torch.cat([ov.reshape(nk * V * h, -1), sk.reshape(P * V, -1)]) for ov, sk in tables]
        return _WeightedBag.apply(weights.reshape(B * P, -1), rows.reshape(B * P, -1), *flat)

    def _mix_bmm(self, tokens: Tensor, pattern: Tensor, tables: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        """``_mix`` as one batched matmul per table: the value rows an example reads are gathered
        once and shared by all its scored positions (cheaper than bags when there are several)."""
        B, P, nk, h = pattern.shape
        V = tables[0][0].shape[1]
        k_rows = self._key_rows(tokens, V).reshape(-1)                         # [b*k]
        q_rows = self._query_rows(tokens, V).reshape(-1)                       # [b*p]
        mix = pattern.reshape(B, P, nk * h)                                    # [b, p, k*h]
        out = []
        for ov, sk in tables:
            w = ov.shape[-1]
            rows = ov.reshape(nk * V, h * w).index_select(0, k_rows).view(B, nk * h, w)   # [b, k*h, w]
            skip = sk.reshape(P * V, w).index_select(0, q_rows).view(B, P, w)             # [b, p, w]
            out.append(torch.baddbmm(skip, mix, rows).view(B * P, w))
        return tuple(out)


class _WeightedBag(torch.autograd.Function):
    """``out[i] = Σ_j weights[i, j] · table[rows[i, j]]`` for each table: ``F.embedding_bag`` (sum).

    Torch's own backward for ``per_sample_weights`` is slow on CPU, so this one is written out:
    the weights' gradient is ``grad @ tableᵀ`` sampled at the bag entries (a sparse
    ``sampled_addmm``), and a table's gradient is itself an embedding_bag, with one bag per
    table row holding the examples that read it. ``rows`` must increase along each bag. Several
    tables mixed by the same bags give separate outputs (no concatenated output to split).
    """

    @staticmethod
    def forward(ctx, weights: Tensor, rows: Tensor, *tables: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(weights, rows, *tables)
        return tuple(F.embedding_bag(rows, t, per_sample_weights=weights, mode="sum") for t in tables)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        weights, rows, *tables = ctx.saved_tensors
        n, s = rows.shape
        n_rows = tables[0].shape[0]
        flat = rows.reshape(-1)
        g_weights = None
        if ctx.needs_input_grad[0]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                bags = torch.sparse_csr_tensor(torch.arange(0, n * s + 1, s), flat, weights.reshape(-1), size=(n, n_rows))
                for grad, table in zip(grads, tables):
                    g = torch.sparse.sampled_addmm(bags, grad.contiguous(), table.T, beta=0.0).values()
                    g_weights = g if g_weights is None else g_weights + g
            g_weights = g_weights.view(n, s)
        g_tables = [None] * len(tables)
        if any(ctx.needs_input_grad[2:]):
            order = flat.argsort()
            offsets = torch.zeros(n_rows, dtype=torch.long)
            offsets[1:] = torch.bincount(flat, minlength=n_rows)[:-1].cumsum(0)
            bag_of, w = order // s, weights.reshape(-1)[order]
            for i, grad in enumerate(grads):
                if ctx.needs_input_grad[2 + i]:
                    g_tables[i] = F.embedding_bag(bag_of, grad.contiguous(), offsets, mode="sum", per_sample_weights=w)
        return (g_weights, None, *g_tables)


class _AttendMix(torch.autograd.Function):
    """Attention read from a score table, then pattern-weighted sums of value-table rows, with
    the backward written out by hand.

    Forward, per example ``b`` and scored position ``p``::

        pattern[k, b, p, h] = softmax over causal keys k of s_tab[h, k_rows[b, k], q_rows[b, p]]
        out_i[b, p] = Σ_(k,h) pattern[k, b, p, h] · ov_i[k_rows[b, k], h] + skip_i[q_rows[b, p]]

    Autograd on the same ops records ~40 small nodes (gathers, permutes, masks, softmax, bmm);
    here the backward is the chain rule in a dozen calls: a ``bmm`` pair per table for the
    pattern's and the rows' gradients, ``index_add_`` to scatter them into the tables, and the
    softmax's Jacobian-vector product done in place. ``tables`` are ``(ov_i [k*V, h*w_i],
    skip_i [p*V, w_i])`` pairs, flattened; outputs are ``[b, p, w_i]``.
    """

    @staticmethod
    def forward(ctx, s_flat: Tensor, idx: Tensor, masked: Tensor, k_rows: Tensor, q_rows: Tensor,
                *tables: Tensor) -> tuple[Tensor, ...]:
        outs, ctx.state = _attend_mix_forward(s_flat, idx, masked, k_rows, q_rows, tables)
        return outs

    @staticmethod
    def backward(ctx, *grads: Tensor):
        g_flat, g_tables = _attend_mix_backward(ctx.state, grads)
        del ctx.state
        return (g_flat, None, None, None, None, *g_tables)


def _attend_mix_forward(s_flat: Tensor, idx: Tensor, masked: Tensor, k_rows: Tensor, q_rows: Tensor,
                        tables: Sequence[Tensor]) -> tuple[tuple[Tensor, ...], tuple]:
    """:class:`_AttendMix`'s forward: the outputs and what its backward needs."""
    nk, B, P, h = idx.shape
    scores = s_flat.index_select(0, idx.reshape(-1)).view(nk, B, P, h)
    scores.masked_fill_(masked, float("-inf"))
    # Softmax over the leading key dim: vectorised across the batch on CPU.
    pattern = scores.sub_(scores.amax(0, keepdim=True)).exp_()
    pattern.div_(pattern.sum(0, keepdim=True))
    mix = pattern.permute(1, 2, 0, 3).reshape(B, P, nk * h)                    # [b, p, k*h]
    outs, saved_rows = [], []
    for ov, sk in zip(tables[0::2], tables[1::2]):
        w = sk.shape[-1]
        rows = ov.index_select(0, k_rows.reshape(-1)).view(B, nk * h, w)        # [b, k*h, w]
        skip = sk.index_select(0, q_rows.reshape(-1)).view(B, P, w)             # [b, p, w]
        outs.append(torch.baddbmm(skip, mix, rows))
        saved_rows.append(rows)
    shapes = [(ov.shape, sk.shape) for ov, sk in zip(tables[0::2], tables[1::2])]
    return tuple(outs), (s_flat.shape[0], shapes, idx, k_rows, q_rows, pattern, mix, saved_rows)


def _attend_mix_backward(state: tuple, grads: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """:class:`_AttendMix`'s backward: gradients of the flat score table and of each table."""
    n_scores, shapes, idx, k_rows, q_rows, pattern, mix, rows = state
    nk, B, P, h = idx.shape
    g_tables, g_mix = [], None
    for g, r, (ov_shape, sk_shape) in zip(grads, rows, shapes):
        g = g.contiguous()                                                     # [b, p, w]
        gm = torch.bmm(g, r.transpose(1, 2))                                   # [b, p, k*h]
        g_mix = gm if g_mix is None else g_mix.add_(gm)
        g_rows = torch.bmm(mix.transpose(1, 2), g)                             # [b, k*h, w]
        g_ov = g.new_zeros(ov_shape).index_add_(0, k_rows.reshape(-1), g_rows.view(B * nk, -1))
        g_sk = g.new_zeros(sk_shape).index_add_(0, q_rows.reshape(-1), g.view(B * P, -1))
        g_tables += [g_ov, g_sk]
    # Softmax backward: g_s = pattern * (g_pattern - Σ_k pattern · g_pattern); masked keys
    # have pattern 0 and so get 0.
    g_pat = g_mix.view(B, P, nk, h).permute(2, 0, 1, 3)                      # [k, b, p, h]
    g_s = g_pat - (pattern * g_pat).sum(0, keepdim=True)
    g_s.mul_(pattern)
    g_flat = g_s.new_zeros(n_scores).index_add_(0, idx.reshape(-1), g_s.reshape(-1))
    return g_flat, g_tables


class _AttnOnlyLogits(torch.autograd.Function):
    """Logits at the scored positions of a one-layer attention-only model without LayerNorm,
    straight from its parameters, with the whole backward written out (no autograd graph).

    The tables of :class:`_PushedForward` (queries and keys, values pushed through ``W_O W_U``,
    the skip path ``x W_U``) are built here and differentiated by hand around
    :func:`_attend_mix_forward` / :func:`_attend_mix_backward`. For ``max``, recording and
    replaying autograd's ~60 small nodes cost as much as the arithmetic. Inputs:
    ``(fwd, tokens, W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, W_U, b_U)``.
    """

    @staticmethod
    def forward(ctx, fwd, tokens, W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, W_U, b_U):
        B, n = tokens.shape
        V, d = W_E.shape
        h, _, e = W_Q.shape
        P, nk, pos_idx = len(fwd.positions), fwd.n_keys, fwd.pos_idx
        x_tab = W_E[None] + W_pos[:n, None]                                     # [n, V, d]
        xq, xk = x_tab[pos_idx].reshape(P * V, d), x_tab[:nk].reshape(nk * V, d)
        Wq, Wk, Wv = (heads_matrix(W) for W in (W_Q, W_K, W_V))                 # [d, h*e]
        q = torch.addmm(b_Q.reshape(-1), xq, Wq).view(P * V, h, e).transpose(0, 1)     # [h, p*V, e]
        k = torch.addmm(b_K.reshape(-1), xk, Wk).view(nk * V, h, e).transpose(0, 1)    # [h, k*V, e]
        v = torch.addmm(b_V.reshape(-1), xk, Wv).view(nk * V, h, e).transpose(0, 1)    # [h, k*V, e]
        scale = e**-0.5
        s_tab = torch.bmm(k, q.transpose(1, 2)).mul_(scale)                     # [h, k*V, p*V]
        W_OU = (W_O.reshape(h * e, d) @ W_U).view(h, e, -1)                     # [h, e, v_out]
        ov = torch.bmm(v, W_OU).transpose(0, 1).reshape(nk * V, -1)             # [k*V, h*v_out]
        skip = torch.addmm(b_O @ W_U + b_U, xq, W_U)                            # [p*V, v_out]
        q_rows = fwd._query_rows(tokens, V)                                     # [b, p]
        k_rows = fwd._key_rows(tokens, V)                                       # [b, k]
        idx = fwd._score_index(k_rows, q_rows, h, V)                            # [k, b, p, h]
        (out,), state = _attend_mix_forward(s_tab.reshape(-1), idx, fwd._masked, k_rows, q_rows, (ov, skip))
        ctx.state = (state, xq, xk, Wq, Wk, Wv, q, k, v, W_OU, scale, (n, V, d, h, e, P, nk), pos_idx)
        ctx.save_for_backward(W_pos, W_O, b_O, W_U)
        return out                                                              # [b, p, v_out]

    @staticmethod
    def backward(ctx, g_out):
        state, xq, xk, Wq, Wk, Wv, q, k, v, W_OU, scale, (n, V, d, h, e, P, nk), pos_idx = ctx.state
        del ctx.state
        W_pos, W_O, b_O, W_U = ctx.saved_tensors
        g_s, (g_ov, g_skip) = _attend_mix_backward(state, (g_out,))
        g_s = g_s.view(h, nk * V, P * V).mul_(scale)
        g_q = torch.bmm(g_s.transpose(1, 2), k).transpose(0, 1).reshape(P * V, h * e)
        g_k = torch.bmm(g_s, q).transpose(0, 1).reshape(nk * V, h * e)
        g_ov = g_ov.view(nk * V, h, -1).transpose(0, 1)                         # [h, k*V, v_out]
        g_v = torch.bmm(g_ov, W_OU.transpose(1, 2)).transpose(0, 1).reshape(nk * V, h * e)
        g_WOU = torch.bmm(v.transpose(1, 2), g_ov).reshape(h * e, -1)           # [h*e, v_out]
        g_sum = g_skip.sum(0)                                                   # [v_out]
        # q, k, v = x W + b; skip = x_q W_U + b_O W_U + b_U; W_OU = W_O W_U; x = W_E + W_pos.
        g_x = xq.new_zeros(n, V, d)
        g_x.index_add_(0, pos_idx, torch.addmm(g_skip @ W_U.T, g_q, Wq.T).view(P, V, d))
        g_x[:nk] += torch.addmm(g_k @ Wk.T, g_v, Wv.T).view(nk, V, d)
        g_W_pos = torch.zeros_like(W_pos)
        g_W_pos[:n] = g_x.sum(1)
        per_head = lambda x, g: (x.T @ g).view(d, h, e).permute(1, 0, 2).contiguous()  # noqa: E731
        g_W_U = W_O.reshape(h * e, d).T @ g_WOU + xq.T @ g_skip + torch.outer(b_O, g_sum)
        return (None, None, g_x.sum(0), g_W_pos,
                per_head(xq, g_q), g_q.sum(0).view(h, e), per_head(xk, g_k), g_k.sum(0).view(h, e),
                per_head(xk, g_v), g_v.sum(0).view(h, e), (g_WOU @ W_U.T).view(h, e, d), W_U @ g_sum,
                g_W_U, g_sum)


class _PushedForward(_TableForward):
    """No LayerNorm: values pushed through ``W_O W_in`` and ``W_O W_U``, mixed by the pattern."""

    def __call__(self, tokens: Tensor) -> Tensor:
        model, block, attn = self.model, self.block, self.block.attn
        if not hasattr(block, "mlp") and len(self.positions) > 1:
            tokens = model._check_tokens(tokens)
            if self._use_score_table(len(tokens), model.cfg.d_vocab):
                return _AttnOnlyLogits.apply(self, tokens, model.embed.W_E, model.pos_embed.W_pos, attn.W_Q,
                                             attn.b_Q, attn.W_K, attn.b_K, attn.W_V, attn.b_V, attn.W_O,
                                             attn.b_O, model.unembed.W_U, model.unembed.b_U)
        tokens, x_tab = self._embed_table(tokens)                               # [n, V, d]
        B, P, W_U = len(tokens), len(self.positions), model.unembed.W_U
        q_tab, k_tab, v_tab = self._qkv_tables(x_tab)                           # [p|k, V, h, e]
        x_q = x_tab[self.pos_idx]                                               # [p, V, d]
        ov_U = (attn.W_O.flatten(0, 1) @ W_U).view(*attn.W_O.shape[:2], -1)     # [h, e, v_out]
        W_U_tab = (_per_head(v_tab, ov_U),                                      # [k, V, h, v_out] direct path
                   x_q @ W_U + (attn.b_O @ W_U + model.unembed.b_U))             # [p, V, v_out]
        if not hasattr(block, "mlp"):
            (logits,) = self._attend_mix(tokens, q_tab, k_tab, [W_U_tab])
            return logits.view(B, P, -1)
        mlp = block.mlp
        # The skip row enters every bag once with weight 1, so constant terms ride along in it.
        ov_in = (attn.W_O.flatten(0, 1) @ mlp.W_in).view(*attn.W_O.shape[:2], -1)   # [h, e, m]
        W_in_tab = (_per_head(v_tab, ov_in),                                    # [k, V, h, m]
                    x_q @ mlp.W_in + (attn.b_O @ mlp.W_in + mlp.b_in))            # [p, V, m]
        W_U_tab = (W_U_tab[0], W_U_tab[1] + mlp.b_out @ W_U)
        pre, direct = self._attend_mix(tokens, q_tab, k_tab, [W_in_tab, W_U_tab])   # [b*p, m], [b*p, v]
        logits = mlp.act(pre) @ (mlp.W_out @ W_U) + direct                      # [b*p, v]
        return logits.view(B, P, -1)


class _ResidForward(_TableForward):
    """LayerNorm: attention from tables, then the residual stream per example (LN is nonlinear)."""

    def __call__(self, tokens: Tensor) -> Tensor:
        model, block, attn = self.model, self.block, self.block.attn
        tokens, resid_tab = self._embed_table(tokens)                           # [n, V, d]
        B, P = len(tokens), len(self.positions)
        q_tab, k_tab, v_tab = self._qkv_tables(block.ln1(resid_tab))            # [p|k, V, h, e]
        ov_tab = _per_head(v_tab, attn.W_O)                                     # [k, V, h, d]
        (resid,) = self._attend_mix(tokens, q_tab, k_tab, [(ov_tab, resid_tab[self.pos_idx])])
        resid = resid + attn.b_O                                                # [b*p, d] resid_mid
        if hasattr(block, "mlp"):
            mlp = block.mlp
            resid = resid + mlp.act(block.ln2(resid) @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out
        resid = model.ln_final(resid)
        return (resid @ model.unembed.W_U + model.unembed.b_U).view(B, P, -1)
