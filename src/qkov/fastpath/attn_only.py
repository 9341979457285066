"""One-layer attention-only models without LayerNorm: logits (or the training loss) at the scored
positions straight from the parameters, forward and backward written out by hand.

The tables of :class:`~qkov.fastpath.tables._PushedForward` (queries and keys, values pushed
through ``W_O W_U``, the skip path ``x W_U``) are built here and differentiated by hand around
:func:`_attend_mix_forward` / :func:`_attend_mix_backward`. For ``max``, recording and replaying
autograd's ~60 small nodes cost as much as the arithmetic. :class:`_AttnOnlyLoss` also folds the
cross-entropy in: its gradient ``softmax - onehot`` reuses the forward's exponentials, where
``F.cross_entropy`` computes them twice (a third of a ``max`` step's time went to ``exp``).

Parameters are passed in the order ``W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, W_U, b_U``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import heads_matrix
from ..tasks.base import IGNORE
from .kernels import FRESH, _attend_mix_backward, _attend_mix_forward, _Fresh, _Lease


def _forward(fwd, tokens: Tensor, params: tuple[Tensor, ...], lease: _Lease | _Fresh,
             outs_from: _Lease | _Fresh) -> tuple[Tensor, tuple]:
    """Logits ``[b, p, v_out]`` (allocated by ``outs_from``) and what :func:`_backward` needs."""
    W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, W_U, b_U = params
    B, n = tokens.shape
    V, d = W_E.shape
    h, _, e = W_Q.shape
    P, nk, pos_idx = len(fwd.positions), fwd.n_keys, fwd.pos_idx
    x_tab = W_E[None] + W_pos[:n, None]                                         # [n, V, d]
    xq, xk = x_tab[pos_idx].reshape(P * V, d), x_tab[:nk].reshape(nk * V, d)
    Wq, Wk, Wv = (heads_matrix(W) for W in (W_Q, W_K, W_V))                     # [d, h*e]
    q = torch.addmm(b_Q.reshape(-1), xq, Wq).view(P * V, h, e).transpose(0, 1)         # [h, p*V, e]
    k = torch.addmm(b_K.reshape(-1), xk, Wk).view(nk * V, h, e).transpose(0, 1)        # [h, k*V, e]
    v = torch.addmm(b_V.reshape(-1), xk, Wv).view(nk * V, h, e).transpose(0, 1)        # [h, k*V, e]
    scale = e**-0.5
    s_tab = torch.bmm(k, q.transpose(1, 2), out=lease.empty("s_tab", (h, nk * V, P * V), k)).mul_(scale)
    W_OU = (W_O.reshape(h * e, d) @ W_U).view(h, e, -1)                         # [h, e, v_out]
    ov = torch.bmm(v, W_OU).transpose(0, 1).reshape(nk * V, -1)                 # [k*V, h*v_out]
    skip = torch.addmm(b_O @ W_U + b_U, xq, W_U)                                # [p*V, v_out]
    q_rows = fwd._query_rows(tokens, V)                                         # [b, p]
    k_rows = fwd._key_rows(tokens, V)                                           # [b, k]
    idx = fwd._score_index(k_rows, q_rows, h, V)                                # [k, b, p, h]
    (out,), mix = _attend_mix_forward(s_tab.view(-1), idx, fwd._masked, k_rows, q_rows, (ov, skip), lease, outs_from)
    return out, (mix, lease, xq, xk, Wq, Wk, Wv, q, k, v, W_OU, scale, (n, V, d, h, e, P, nk), pos_idx)


def _backward(state: tuple, params: tuple[Tensor, ...], g_out: Tensor) -> tuple[Tensor, ...]:
    """Gradients of the 12 parameters from the logits' gradient ``g_out [b, p, v_out]``."""
    mix, lease, xq, xk, Wq, Wk, Wv, q, k, v, W_OU, scale, (n, V, d, h, e, P, nk), pos_idx = state
    W_pos, W_O, b_O, W_U = params[1], params[8], params[9], params[10]
    g_s, (g_ov, g_skip) = _attend_mix_backward(mix, (g_out,), lease)
    g_s = g_s.view(h, nk * V, P * V).mul_(scale)
    g_q = torch.bmm(g_s.transpose(1, 2), k).transpose(0, 1).reshape(P * V, h * e)
    g_k = torch.bmm(g_s, q).transpose(0, 1).reshape(nk * V, h * e)
    g_ov = g_ov.view(nk * V, h, -1).transpose(0, 1)                             # [h, k*V, v_out]
    g_v = torch.bmm(g_ov, W_OU.transpose(1, 2)).transpose(0, 1).reshape(nk * V, h * e)
    g_WOU = torch.bmm(v.transpose(1, 2), g_ov).reshape(h * e, -1)               # [h*e, v_out]
    g_sum = g_skip.sum(0)                                                       # [v_out]
    # q, k, v = x W + b; skip = x_q W_U + b_O W_U + b_U; W_OU = W_O W_U; x = W_E + W_pos.
    g_x = xq.new_zeros(n, V, d)
    g_x.index_add_(0, pos_idx, torch.addmm(g_skip @ W_U.T, g_q, Wq.T).view(P, V, d))
    g_x[:nk] += torch.addmm(g_k @ Wk.T, g_v, Wv.T).view(nk, V, d)
    g_W_pos = torch.zeros_like(W_pos)
    g_W_pos[:n] = g_x.sum(1)
    per_head = lambda x, g: (x.T @ g).view(d, h, e).permute(1, 0, 2).contiguous()  # noqa: E731
    g_W_U = W_O.reshape(h * e, d).T @ g_WOU + xq.T @ g_skip + torch.outer(b_O, g_sum)
    return (g_x.sum(0), g_W_pos,
            per_head(xq, g_q), g_q.sum(0).view(h, e), per_head(xk, g_k), g_k.sum(0).view(h, e),
            per_head(xk, g_v), g_v.sum(0).view(h, e), (g_WOU @ W_U.T).view(h, e, d), W_U @ g_sum,
            g_W_U, g_sum)


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


class _AttnOnlyLoss(torch.autograd.Function):
    """Mean cross-entropy of the logits at the scored positions against ``targets [b, p]``
    (``IGNORE`` where a position has none), as ``F.cross_entropy(..., ignore_index=IGNORE)``.
    Inputs: ``(fwd, tokens, targets, *params)``."""

    @staticmethod
    def forward(ctx, fwd, tokens, targets, *params):
        lease = fwd.scratch.lease()
        logits, state = _forward(fwd, tokens, params, lease, lease)
        flat = logits.view(-1, logits.shape[-1])                                # [b*p, v]
        t = targets.reshape(-1, 1)
        valid = t != IGNORE
        t = t.clamp(min=0)
        m = flat.amax(1, keepdim=True)
        probs = torch.sub(flat, m, out=lease.empty("probs", flat.shape, flat)).exp_()
        total = probs.sum(1, keepdim=True)
        nll = total.log().add_(m).sub_(flat.gather(1, t))                       # log Σ exp - logit[target]
        weight = valid.to(flat.dtype).div_(valid.sum())                         # each row's share of the mean
        ctx.state = (state, probs.div_(total), t, weight, logits.shape)         # probs: softmax
        ctx.save_for_backward(*params)
        return (nll * weight).sum()

    @staticmethod
    def backward(ctx, g_loss):
        state, probs, t, weight, shape = ctx.state
        del ctx.state
        w = weight * g_loss                                                     # [b*p, 1]
        g = probs.mul_(w).scatter_add_(1, t, -w)                                # (softmax - onehot) · w
        return (None, None, None, *_backward(state, ctx.saved_tensors, g.view(shape)))
