"""One-layer attention-only models without LayerNorm: logits at the scored positions from the
parameters, forward and backward written out by hand (no autograd graph)."""

from __future__ import annotations

import torch

from ..model import heads_matrix
from .kernels import _attend_mix_backward, _attend_mix_forward


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

