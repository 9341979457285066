"""One-layer attention-only models without LayerNorm: logits (or the training loss) at the scored
positions straight from the parameters, forward and backward written out by hand.

The tables of :class:`~qkov.fastpath.tables._PushedForward` (queries and keys, values pushed
through ``W_O W_U``, the skip path ``x W_U``) are built here (:func:`_tables`) and differentiated
by hand (:func:`_tables_backward`). Between the two, the per-example part (attention, mixing,
cross-entropy and their backward) runs in the C kernel of ``native.py`` where it was built, else
through torch around :func:`_softmax_mix_forward` / :func:`_softmax_mix_backward`. For ``max``, recording and replaying
autograd's ~60 small nodes cost as much as the arithmetic. :func:`_loss_forward` also folds the
cross-entropy in: its gradient ``softmax - onehot`` reuses the forward's exponentials, where
``F.cross_entropy``'s log-softmax and its backward computed them twice (0.6 ms of a 4.9 ms
``max`` step). :func:`loss_and_grads` runs forward and backward at once and writes the
parameters' gradients itself, the trainer's step; :class:`_AttnOnlyLoss` and
:class:`_AttnOnlyLogits` are the same maths as autograd functions.

Parameters are passed in the order ``W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, W_U, b_U``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..model import heads_matrix
from ..tasks.base import _LOG2E, IGNORE, _nll_and_prediction
from . import native
from .kernels import FRESH, _Fresh, _Lease, _softmax_mix_backward, _softmax_mix_forward


class _Factors(NamedTuple):
    """What :func:`_tables` keeps for :func:`_tables_backward`: the factors the tables were
    built from, and the sizes."""
    W_qkv: Tensor
    qf: Tensor
    k: Tensor
    v_f: Tensor
    W_OU: Tensor
    f_u: Tensor
    scale: float
    V: int
    d: int
    h: int
    e: int
    w: int
    P: int
    nk: int
    fwd: Any


class _NativeLoss(NamedTuple):
    """The C kernels' loss state: the tables' gradients, and the lease that holds their buffers
    until the backward has run."""
    lease: _Lease | _Fresh
    factors: _Factors
    grads: tuple[Tensor, Tensor, Tensor]


def _tables(fwd, params: tuple[Tensor, ...], lease: _Lease | _Fresh) -> tuple[tuple[Tensor, Tensor, Tensor], _Factors]:
    """The three tables the per-example kernels read (layouts as in ``_native.c``): scores
    ``s2 [h, k*V, V+p]``, values through ``W_O W_U`` ``ov [k*V, h*v_out]`` and the skip path
    ``skip [p*V, v_out]`` (biases folded in), and what :func:`_tables_backward` needs.

    The residual stream a key, value, query or the skip path reads is ``W_E[t] + W_pos[j]``, and
    all of them are linear in it. So every projection is taken of the V token rows and of the
    few position rows apart (factors), and a (position, token) table is a broadcast sum of two
    factors: the matmuls run on V + k rows instead of k*V (4-6x smaller for max). Scores are the
    exception: a key factor times a query factor, both sums, so they come from the table of
    (key position, key token) rows against the V + p query factors, read twice per score.
    """
    W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, W_U, b_U = params
    V, d = W_E.shape
    h, _, e = W_Q.shape
    w = W_U.shape[1]
    P, nk, he = len(fwd.positions), fwd.n_keys, h * e
    W_qkv = torch.cat([heads_matrix(W_Q), heads_matrix(W_K), heads_matrix(W_V)], dim=1)    # [d, 3he]
    b_qkv = torch.cat([b_Q.reshape(-1), b_K.reshape(-1), b_V.reshape(-1)])
    tok = W_E @ W_qkv                                                           # [V, 3he] token factors
    pos = torch.addmm(b_qkv, W_pos[:nk], W_qkv)                                 # [k, 3he] position factors
    scale = e**-0.5
    q_f = torch.cat([tok[:, :he], pos[fwd.pos_cols, :he]]).mul_(scale)         # [V+p, he] query factors
    qf = q_f.view(V + P, h, e).permute(1, 2, 0)                                 # [h, e, V+p]
    k = (tok[None, :, he:2 * he] + pos[:, None, he:2 * he]).view(nk * V, h, e).transpose(0, 1)   # [h, k*V, e]
    s2 = torch.bmm(k, qf, out=lease.empty("s2", (h, nk * V, V + P), k))         # [h, k*V, V+p]
    W_OU = (W_O.reshape(he, d) @ W_U).view(h, e, w)                             # [h, e, v_out]
    v_f = torch.cat([tok[:, 2 * he:], pos[:, 2 * he:]]).view(V + nk, h, e).transpose(0, 1)   # [h, V+k, e]
    ov_f = torch.bmm(v_f, W_OU).transpose(0, 1).reshape(V + nk, h * w)          # [V+k, h*v_out]
    ov = (ov_f[None, :V] + ov_f[V:, None]).view(nk * V, h * w)                  # row j*V + t
    f_u = torch.cat([W_E, W_pos[fwd.pos_cols]])                                 # [V+p, d]
    u_f = torch.mm(f_u, W_U)                                                    # [V+p, v_out] skip factors
    skip = (u_f[None, :V] + (u_f[V:] + (b_O @ W_U + b_U))[:, None]).view(P * V, w)
    return (s2, ov, skip), _Factors(W_qkv, qf, k, v_f, W_OU, f_u, scale, V, d, h, e, w, P, nk, fwd)


def _forward(fwd, tokens: Tensor, params: tuple[Tensor, ...], lease: _Lease | _Fresh,
             outs_from: _Lease | _Fresh) -> tuple[Tensor, tuple]:
    """Logits ``[b, p, v_out]`` (allocated by ``outs_from``) and what :func:`_backward` needs:
    the tables, then torch's kernels over the batch."""
    (s2, ov, skip), factors = _tables(fwd, params, lease)
    V, h, P, nk = factors.V, factors.h, factors.P, factors.nk
    B = len(tokens)
    q_tok = tokens[:, fwd.pos_cols]                                             # [b, p]
    k_rows = fwd._key_rows(tokens, V)                                           # [b, k]
    q_rows = fwd._query_rows(tokens, V)                                         # [b, p]
    row = fwd._key_heads(k_rows, h, V).view(-1)                                 # [b*k*h] row of s2
    idx_tok = torch.add(q_tok[:, None, :], row.view(B, -1, 1), alpha=V + P)     # [b, k*h, p]
    # The position part of a score is a whole row slice of s2 (its last p columns), gathered
    # straight into the [b, k, h, p] layout; the token part is one element per score.
    scores = s2.view(-1, V + P)[:, V:].index_select(0, row).view(B, nk, h, P)
    scores += s2.view(-1).index_select(0, idx_tok.view(-1)).view(B, nk, h, P)
    (out,), mix = _softmax_mix_forward(scores, fwd._masked, k_rows, q_rows, (ov, skip), lease, outs_from)
    return out, (mix, lease, idx_tok, row, factors)


def _backward(state: tuple, params: tuple[Tensor, ...], g_out: Tensor) -> tuple[Tensor, ...]:
    """Gradients of the 12 parameters from the logits' gradient ``g_out [b, p, v_out]``: back
    through the per-example kernels to the tables, then :func:`_tables_backward`."""
    mix, lease, idx_tok, row, factors = state
    V, h, P, nk = factors.V, factors.h, factors.P, factors.nk
    g_s, (g_ov, g_skip) = _softmax_mix_backward(mix, (g_out,))                 # [b, k, h, p]
    g_s2 = lease.empty("g_s2", (h * nk * V, V + P), g_s).zero_()
    g_s2.view(-1).index_add_(0, idx_tok.view(-1), g_s.view(-1))
    g_s2[:, V:].index_add_(0, row, g_s.view(-1, P))
    return _tables_backward(factors, params, g_s2, g_ov, g_skip)


def _tables_backward(factors: _Factors, params: tuple[Tensor, ...], g_s2: Tensor, g_ov: Tensor,
                     g_skip: Tensor) -> tuple[Tensor, ...]:
    """Gradients of the 12 parameters from the tables' (``g_s2`` read as ``[h, k*V, V+p]``,
    ``g_ov [k*V, h*v_out]``, ``g_skip [p*V, v_out]``): from the tables to their factors (a sum
    over the other index of the broadcast), and from the factors to the weights."""
    W_qkv, qf, k, v_f, W_OU, f_u, scale, V, d, h, e, w, P, nk, fwd = factors
    W_E, W_pos, W_O, b_O, W_U = params[0], params[1], params[8], params[9], params[10]
    he = h * e
    g_s2 = g_s2.view(h, nk * V, V + P)
    g_k = torch.bmm(g_s2, qf.transpose(1, 2)).transpose(0, 1).reshape(nk, V, he)
    g_q = torch.bmm(k.transpose(1, 2), g_s2).permute(2, 0, 1).reshape(V + P, he).mul_(scale)
    g_ov = g_ov.view(nk, V, h * w)
    g_ovf = torch.cat([g_ov.sum(0), g_ov.sum(1)]).view(V + nk, h, w).transpose(0, 1)   # [h, V+k, v_out]
    g_v = torch.bmm(g_ovf, W_OU.transpose(1, 2)).transpose(0, 1).reshape(V + nk, he)
    g_WOU = torch.bmm(v_f.transpose(1, 2), g_ovf).reshape(he, w)                # [h*e, v_out]
    g_skip = g_skip.view(P, V, w)
    g_uf = torch.cat([g_skip.sum(0), g_skip.sum(1)])                            # [V+p, v_out]
    g_c = g_uf[V:].sum(0)                                                       # b_O W_U + b_U: every row
    # The factors' gradients, laid out as W_qkv's columns: [query | key | value].
    g_pos_q = g_q.new_zeros(nk, he).index_copy_(0, fwd.pos_idx, g_q[V:])
    g_tok = torch.cat([g_q[:V], g_k.sum(0), g_v[:V]], dim=1)                    # [V, 3he]
    g_pos = torch.cat([g_pos_q, g_k.sum(1), g_v[V:]], dim=1)                    # [k, 3he]
    g_W_qkv = torch.addmm(W_E.T @ g_tok, W_pos[:nk].T, g_pos)                   # [d, 3he]
    g_b_qkv = g_pos.sum(0)
    g_fu = g_uf @ W_U.T                                                         # [V+p, d]
    g_W_pos = torch.zeros_like(W_pos)
    g_W_pos[:nk] = g_pos @ W_qkv.T
    g_W_pos[fwd.pos_cols] += g_fu[V:]
    g_W_U = torch.addmm(f_u.T @ g_uf, W_O.reshape(he, d).T, g_WOU).add_(torch.outer(b_O, g_c))
    per_head = lambda i: g_W_qkv[:, i * he:(i + 1) * he].reshape(d, h, e).permute(1, 0, 2).contiguous()  # noqa: E731
    return (torch.addmm(g_fu[:V], g_tok, W_qkv.T), g_W_pos,
            per_head(0), g_b_qkv[:he].view(h, e), per_head(1), g_b_qkv[he:2 * he].view(h, e),
            per_head(2), g_b_qkv[2 * he:].view(h, e), (g_WOU @ W_U.T).view(h, e, d), W_U @ g_c,
            g_W_U, g_c)


class _AttnOnlyLogits(torch.autograd.Function):
    """Logits ``[b, p, v_out]`` at the scored positions, with the whole backward written out.
    Inputs: ``(fwd, tokens, *params)``; ``fwd`` is the model's ``_PushedForward``."""

    @staticmethod
    def forward(ctx, fwd, tokens, *params):
        out, ctx.state = _forward(fwd, tokens, params, fwd.scratch.lease(), FRESH)
        ctx.save_for_backward(*params)
        return out

    @staticmethod
    def backward(ctx, g_out):
        state = ctx.state
        del ctx.state                                                           # frees the lease
        return (None, None, *_backward(state, ctx.saved_tensors, g_out.contiguous()))


def _loss_forward(fwd, tokens: Tensor, targets: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, tuple]:
    """Mean cross-entropy of the logits at the scored positions against ``targets [b, p]``
    (``IGNORE`` where a position has none), as ``F.cross_entropy(..., ignore_index=IGNORE)``,
    and what :func:`_loss_backward` needs. The C kernels (``native.py``) compute the tables'
    gradients in the same pass; the torch kernels keep logits and softmax in reused buffers."""
    lease = fwd.scratch.lease()
    if native.applies(params[0].dtype, tokens, fwd.n_keys):
        tabs, factors = _tables(fwd, params, lease)
        grads = tuple(lease.empty(f"native_{i}", t.shape, t) for i, t in enumerate(tabs))
        loss = native.loss_and_grads(*tabs, tokens, targets, fwd.pos_idx, *grads)
        return torch.tensor(loss, dtype=tabs[0].dtype), _NativeLoss(lease, factors, grads)
    logits, state = _forward(fwd, tokens, params, lease, lease)
    flat = logits.view(-1, logits.shape[-1])                                    # [b*p, v]
    t = targets.reshape(-1, 1)
    valid = t != IGNORE
    t = t.clamp(min=0)
    m = flat.amax(1, keepdim=True)
    picked = flat.gather(1, t)                                                  # logit[target]
    # exp(x - m) as exp2((x - m) log2 e) in one fused add (exp2 runs twice as fast as exp here),
    # in place: the logits are not read again, and a step's tensors then stay closer to cache.
    probs = torch.add(m * -_LOG2E, flat, alpha=_LOG2E, out=flat).exp2_()
    total = probs.sum(1, keepdim=True)
    nll = total.log().add_(m).sub_(picked)                                      # log Σ exp - logit[target]
    weight = valid.to(flat.dtype).div_(valid.sum())                             # each row's share of the mean
    # exp(x - m) stays unnormalised: the backward scales it by weight / total in its one pass.
    return (nll * weight).sum(), (state, (probs, total, t, weight, logits.shape))


def _loss_backward(state: tuple, params: tuple[Tensor, ...], g_loss: Tensor | None) -> tuple[Tensor, ...]:
    """The 12 parameters' gradients of ``g_loss`` (None: 1) times the loss."""
    if isinstance(state, _NativeLoss):                                          # d loss / d tables given
        grads = state.grads
        if g_loss is not None:
            grads = tuple(g.mul_(g_loss) for g in grads)
        return _tables_backward(state.factors, params, *grads)
    state, (probs, total, t, weight, shape) = state
    w = weight if g_loss is None else weight * g_loss                           # [b*p, 1]
    g = probs.mul_(w / total).scatter_add_(1, t, -w)                            # (softmax - onehot) · w
    return _backward(state, params, g.view(shape))


class _AttnOnlyLoss(torch.autograd.Function):
    """:func:`_loss_forward` as an autograd function. Inputs: ``(fwd, tokens, targets, *params)``."""

    @staticmethod
    def forward(ctx, fwd, tokens, targets, *params):
        loss, ctx.state = _loss_forward(fwd, tokens, targets, params)
        ctx.save_for_backward(*params)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        state = ctx.state
        del ctx.state
        return (None, None, None, *_loss_backward(state, ctx.saved_tensors, g_loss))


@torch.no_grad()
def loss_and_grads(fwd, tokens: Tensor, targets: Tensor, params: tuple[Tensor, ...]) -> Tensor:
    """The loss, with its gradients added to each parameter's ``.grad`` straight from the
    hand-written backward: what ``_AttnOnlyLoss.apply(...).backward()`` does, without autograd's
    node, engine and 12 gradient-accumulation calls (~0.1 ms of a 3 ms max step)."""
    loss, state = _loss_forward(fwd, tokens, targets, params)
    for p, g in zip(params, _loss_backward(state, params, None)):
        if p.grad is None:
            p.grad = g
        else:
            p.grad += g
    return loss


@torch.no_grad()
def nll_and_prediction(fwd, tokens: Tensor, targets: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """The NLL of ``targets [b, p]`` and the first argmax at the scored positions, ``[b, p]``
    each (what ``Task._measure`` reads), from the C kernels or from the logits."""
    lease = fwd.scratch.lease()
    if native.applies(params[0].dtype, tokens, fwd.n_keys):
        tabs, _ = _tables(fwd, params, lease)
        return native.nll_and_prediction(*tabs, tokens, targets, fwd.pos_idx)
    logits, _ = _forward(fwd, tokens, params, lease, lease)
    return _nll_and_prediction(logits.float(), targets, lease)
