"""Attention at the scored positions from (position, token) tables, and the two forwards built
on them: values pushed through to the logits (no LayerNorm) or the residual stream per example."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import Transformer, heads_matrix
from ..tasks.base import _as_index, _nll_and_prediction
from .attn_only import _AttnOnlyLogits, _AttnOnlyLoss
from .attn_only import loss_and_grads as _attn_only_loss_and_grads
from .attn_only import nll_and_prediction as _attn_only_nll_and_prediction
from .kernels import Scratch, _AttendMix, _WeightedBag

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
        self.scratch = Scratch()                   # work tensors reused across steps
        self.logits_positions = positions          # what the logits cover (read by Task._measure)
        self.pos_cols = _as_index(positions)       # tokens[:, pos_cols]: a view where consecutive
        self._p_range, self._k_range = torch.arange(len(positions)), torch.arange(self.n_keys)
        # Keys after a scored query position: masked out of its softmax. [1, k, 1, p]
        self._masked = (self._k_range[:, None] > self.pos_idx[None, :])[None, :, None, :]

    def _embed_table(self, n: int) -> Tensor:
        """The residual stream's start for every (position, token) of ``n``-token sequences:
        ``W_E[t] + W_pos[j]`` at ``[j, t]``, ``[n, V, d]``."""
        return self.model.embed.W_E[None] + self.model.pos_embed.W_pos[:n, None]

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

    def _key_heads(self, k_rows: Tensor, h: int, V: int) -> Tensor:
        """Row ``head * k*V + k_row`` of a table stacked over heads, per (example, key, head): ``[b, k, h]``."""
        if h == 1:
            return k_rows[:, :, None]
        return k_rows[:, :, None] + torch.arange(h) * (self.n_keys * V)

    def _score_index(self, k_rows: Tensor, q_rows: Tensor, h: int, V: int) -> Tensor:
        """Flat indices ``[b, k, h, p]`` of each example's scores in a ``_score_table``."""
        PV = len(self.positions) * V
        return torch.add(q_rows[:, None, None, :], self._key_heads(k_rows, h, V)[..., None], alpha=PV)

    def _pattern(self, tokens: Tensor, q_tab: Tensor, k_tab: Tensor) -> Tensor:
        """Attention pattern ``[b, p, k, h]`` at the scored positions."""
        nk, V, h, e = k_tab.shape
        B, P = len(tokens), len(self.positions)
        # Row j*V + t of a flattened table is token t at (scored or key) position j.
        q_rows = self._query_rows(tokens, V)                                   # [b, p]
        k_rows = self._key_rows(tokens, V)                                     # [b, k]
        if self._use_score_table(B, V):
            idx = self._score_index(k_rows, q_rows, h, V).permute(1, 0, 3, 2)  # [k, b, p, h]
            scores = self._score_table(q_tab, k_tab).reshape(-1).index_select(0, idx.reshape(-1)).view(nk, B, P, h)
        else:
            q = F.embedding(q_rows, q_tab.reshape(-1, h * e)).view(1, B, P, h, e)      # [1, b, p, h, e]
            k = F.embedding(k_rows.T, k_tab.reshape(-1, h * e)).view(nk, B, 1, h, e)   # [k, b, 1, h, e]
            scores = (q * k).sum(-1) / e**0.5                                  # [k, b, p, h]
        # Key position first: a softmax over a leading dim is vectorised across the batch, several
        # times faster on CPU than one over a short last dim.
        masked = self._masked.permute(1, 0, 3, 2)                              # [k, 1, p, 1]
        return scores.masked_fill(masked, float("-inf")).softmax(dim=0).permute(1, 2, 0, 3)

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
            outs = _AttendMix.apply(self.scratch, self._score_table(q_tab, k_tab).reshape(-1),
                                    self._score_index(k_rows, q_rows, h, V), self._masked, k_rows, q_rows, *flat)
            return tuple(o.view(B * P, -1) for o in outs)
        pattern = self._pattern(tokens, q_tab, k_tab)
        return (self._mix_bmm if P > 1 else self._mix)(tokens, pattern, tables)

    def _query_rows(self, tokens: Tensor, V: int) -> Tensor:
        """Row ``i*V + t`` of a table over (scored position i, token t), per example."""
        return torch.add(tokens[:, self.pos_cols], self._p_range, alpha=V)     # [b, p]

    def _key_rows(self, tokens: Tensor, V: int) -> Tensor:
        """Row ``j*V + t`` of a table over (key position j, token t), per example."""
        return torch.add(tokens[:, :self.n_keys], self._k_range, alpha=V)      # [b, k]

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


class _PushedForward(_TableForward):
    """No LayerNorm: values pushed through ``W_O W_in`` and ``W_O W_U``, mixed by the pattern."""

    def __init__(self, model: Transformer, positions: list[int]):
        super().__init__(model, positions)
        # The hand-written attention-only kernels: no MLP, several scored positions (and, per
        # call, a batch large enough for the score table).
        self.attn_only = not hasattr(self.block, "mlp") and len(positions) > 1

    def _attn_only(self, tokens: Tensor) -> bool:
        return self.attn_only and self._use_score_table(len(tokens), self.model.cfg.d_vocab)

    def _attn_only_params(self) -> tuple[Tensor, ...]:
        m, attn = self.model, self.block.attn
        return (m.embed.W_E, m.pos_embed.W_pos, attn.W_Q, attn.b_Q, attn.W_K, attn.b_K, attn.W_V, attn.b_V,
                attn.W_O, attn.b_O, m.unembed.W_U, m.unembed.b_U)

    def _fused_loss_tokens(self, tokens: Tensor, dtype: torch.dtype) -> Tensor | None:
        """The checked tokens where the fused loss applies (attention-only kernels, and a loss
        in the weights' dtype), else None."""
        if not self.attn_only or self.model.embed.W_E.dtype != dtype:
            return None
        tokens = self.model._check_tokens(tokens)
        return tokens if self._attn_only(tokens) else None

    def loss(self, tokens: Tensor, targets: Tensor, dtype: torch.dtype) -> Tensor | None:
        """Mean cross-entropy against ``targets [b, p]`` from the fused attention-only kernel,
        or None where it does not apply (or the loss wants another dtype than the weights')."""
        tokens = self._fused_loss_tokens(tokens, dtype)
        return None if tokens is None else _AttnOnlyLoss.apply(self, tokens, targets, *self._attn_only_params())

    def loss_with_grads(self, tokens: Tensor, targets: Tensor, dtype: torch.dtype) -> Tensor | None:
        """:meth:`loss`, its gradients added to the parameters' ``.grad`` by the hand-written
        backward directly (no autograd), or None where the fused kernel does not apply."""
        tokens = self._fused_loss_tokens(tokens, dtype)
        return None if tokens is None else _attn_only_loss_and_grads(self, tokens, targets, self._attn_only_params())

    @torch.no_grad()
    def nll_and_prediction(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """What ``Task._measure`` reads from the logits at the scored positions (NLL of
        ``targets`` and the argmax, ``[b, p]`` each). Attention-only models take the C kernel
        (``native.py``), or the torch kernels with logits and work tensors in reused buffers
        (fresh ones of eval size came back page-faulted, a third of an eval's time)."""
        tokens = self.model._check_tokens(tokens)
        if not self._attn_only(tokens):
            return _nll_and_prediction(self._logits(tokens).float(), targets)
        return _attn_only_nll_and_prediction(self, tokens, targets, self._attn_only_params())

    def __call__(self, tokens: Tensor) -> Tensor:
        return self._logits(self.model._check_tokens(tokens))

    def _logits(self, tokens: Tensor) -> Tensor:
        """:meth:`__call__` on tokens already checked."""
        model, block, attn = self.model, self.block, self.block.attn
        if self._attn_only(tokens):
            return _AttnOnlyLogits.apply(self, tokens, *self._attn_only_params())
        x_tab = self._embed_table(tokens.shape[1])                              # [n, V, d]
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
        tokens = model._check_tokens(tokens)
        resid_tab = self._embed_table(tokens.shape[1])                          # [n, V, d]
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
