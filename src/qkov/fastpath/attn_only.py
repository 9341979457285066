"""One-layer attention-only models without LayerNorm: logits (or the training loss) at the scored
positions straight from the parameters, forward and backward written out by hand.

The tables of :class:`~qkov.fastpath.tables._PushedForward` (queries and keys, values pushed
through ``W_O W_U``, the skip path ``x W_U``) are built here and differentiated by hand around
:func:`_softmax_mix_forward` / :func:`_softmax_mix_backward`. For ``max``, recording and replaying
autograd's ~60 small nodes cost as much as the arithmetic. :class:`_AttnOnlyLoss` also folds the
cross-entropy in: its gradient ``softmax - onehot`` reuses the forward's exponentials, where
``F.cross_entropy`` computes them twice (a third of a ``max`` step's time went to ``exp``).

Parameters are passed in the order ``W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, W_U, b_U``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import heads_matrix
from ..tasks.base import _LOG2E, IGNORE
from .kernels import FRESH, _Fresh, _Lease, _softmax_mix_backward, _softmax_mix_forward


def _forward(fwd, tokens: Tensor, params: tuple[Tensor, ...], lease: _Lease | _Fresh,
             outs_from: _Lease | _Fresh) -> tuple[Tensor, tuple]:
    """Logits ``[b, p, v_out]`` (allocated by ``outs_from``) and what :func:`_backward` needs."""
    W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V, W_O, b_O, W_U, b_U = params
    B, n = tokens.shape
    V, d = W_E.shape
    h, _, e = W_Q.shape
    P, nk, pos_idx = len(fwd.positions), fwd.n_keys, fwd.pos_idx
    x_k = (W_E[None] + W_pos[:nk, None]).reshape(nk * V, d)                     # [k*V, d] keys' residual
    W_pos_q = W_pos[fwd.pos_cols]                                               # [p, d]
    x_q = (W_E[None] + W_pos_q[:, None]).reshape(P * V, d)                      # [p*V, d] queries'
    Wq, Wk, Wv = (heads_matrix(W) for W in (W_Q, W_K, W_V))                     # [d, h*e]
    # A query is linear in its token and its position: q = W_E[t] Wq + (W_pos[p] Wq + b_Q). So the
    # scores come from a table over V + p query factors instead of all p*V (token, position)
    # pairs, s2 = K [W_E Wq ; W_pos[p] Wq + b_Q]ᵀ, read twice per (example, key, head, query):
    # 5x less arithmetic than the full score table for max, in the forward and in the backward.
    scale = e**-0.5
    f = torch.cat([W_E, W_pos_q])                                               # [V+p, d]
    qf = torch.mm(f, Wq)
    qf[V:] += b_Q.reshape(-1)
    qf = qf.mul_(scale).view(V + P, h, e).permute(1, 2, 0)                      # [h, e, V+p]
    k = torch.addmm(b_K.reshape(-1), x_k, Wk).view(nk * V, h, e).transpose(0, 1)       # [h, k*V, e]
    v = torch.addmm(b_V.reshape(-1), x_k, Wv).view(nk * V, h, e).transpose(0, 1)       # [h, k*V, e]
    s2 = torch.bmm(k, qf, out=lease.empty("s2", (h, nk * V, V + P), k))         # [h, k*V, V+p]
    W_OU = (W_O.reshape(h * e, d) @ W_U).view(h, e, -1)                         # [h, e, v_out]
    ov = torch.bmm(v, W_OU).transpose(0, 1).reshape(nk * V, -1)                 # [k*V, h*v_out]
    skip = torch.addmm(b_O @ W_U + b_U, x_q, W_U)                               # [p*V, v_out]
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
    return out, (mix, lease, x_q, x_k, f, Wq, Wk, Wv, qf, k, v, W_OU, scale, idx_tok, row,
                 (V, d, h, e, P, nk), pos_idx)


def _backward(state: tuple, params: tuple[Tensor, ...], g_out: Tensor) -> tuple[Tensor, ...]:
    """Gradients of the 12 parameters from the logits' gradient ``g_out [b, p, v_out]``."""
    (mix, lease, x_q, x_k, f, Wq, Wk, Wv, qf, k, v, W_OU, scale, idx_tok, row,
     (V, d, h, e, P, nk), pos_idx) = state
    W_pos, W_O, b_O, W_U = params[1], params[8], params[9], params[10]
    g_s, (g_ov, g_skip) = _softmax_mix_backward(mix, (g_out,))                 # [b, k, h, p]
    g_s2 = lease.empty("g_s2", (h * nk * V, V + P), g_s).zero_()
    g_s2.view(-1).index_add_(0, idx_tok.view(-1), g_s.view(-1))
    g_s2[:, V:].index_add_(0, row, g_s.view(-1, P))
    g_s2 = g_s2.view(h, nk * V, V + P)
    g_k = torch.bmm(g_s2, qf.transpose(1, 2)).transpose(0, 1).reshape(nk * V, h * e)
    g_qf = torch.bmm(k.transpose(1, 2), g_s2).permute(2, 0, 1).reshape(V + P, h * e).mul_(scale)
    g_ov = g_ov.view(nk * V, h, -1).transpose(0, 1)                             # [h, k*V, v_out]
    g_v = torch.bmm(g_ov, W_OU.transpose(1, 2)).transpose(0, 1).reshape(nk * V, h * e)
    g_WOU = torch.bmm(v.transpose(1, 2), g_ov).reshape(h * e, -1)               # [h*e, v_out]
    g_sum = g_skip.sum(0)                                                       # [v_out]
    # k, v = x_k W + b; qf = f Wq (+ b_Q on the position rows); skip = x_q W_U + b_O W_U + b_U;
    # W_OU = W_O W_U; x = W_E + W_pos; f = [W_E ; W_pos[p]].
    g_xq = (g_skip @ W_U.T).view(P, V, d)
    g_xk = torch.addmm(g_k @ Wk.T, g_v, Wv.T).view(nk, V, d)
    g_f = g_qf @ Wq.T                                                           # [V+p, d]
    g_W_pos = torch.zeros_like(W_pos)
    g_W_pos[:nk] = g_xk.sum(1)
    g_W_pos.index_add_(0, pos_idx, g_xq.sum(1) + g_f[V:])
    per_head = lambda x, g: (x.T @ g).view(d, h, e).permute(1, 0, 2).contiguous()  # noqa: E731
    g_W_U = W_O.reshape(h * e, d).T @ g_WOU + x_q.T @ g_skip + torch.outer(b_O, g_sum)
    return (g_xq.sum(0) + g_xk.sum(0) + g_f[:V], g_W_pos,
            per_head(f, g_qf), g_qf[V:].sum(0).view(h, e), per_head(x_k, g_k), g_k.sum(0).view(h, e),
            per_head(x_k, g_v), g_v.sum(0).view(h, e), (g_WOU @ W_U.T).view(h, e, d), W_U @ g_sum,
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
        # exp(x - m) as exp2((x - m) log2 e) in one fused add: exp2 runs twice as fast as exp here.
        probs = torch.add(m * -_LOG2E, flat, alpha=_LOG2E, out=lease.empty("probs", flat.shape, flat)).exp2_()
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
