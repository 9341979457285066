"""The table path: a one-layer model's logits at fixed positions from (position, token) tables.

In a one-layer transformer everything attention reads is a function of one (position, token)
pair: the query, key and value of token ``t`` at position ``j`` are rows of small tables built
from ``W_E[t] + W_pos[j]``. So instead of projecting every example's residual stream, a
:class:`TablePath` builds those tables once per call over the vocabulary and gathers rows:

- scores: one matmul of every key row against every query row (the score table), then one
  gather per (example, query, key, head);
- mixing: one weighted bag per (example, scored position) over the value rows it attends to,
  plus its own row of the skip path (:class:`WeightedBag`, backward written out).

Without LayerNorm the values are pushed through ``W_O W_in`` and ``W_O W_U`` first, so the MLP
pre-activations and the direct-path logits come out of the bags; only the MLP's output
(``act(pre) @ W_out W_U``) stays per example, the one nonlinear step. With LayerNorm the bags
mix residual-stream rows and the rest runs per example (LayerNorm is nonlinear).

The maths is the plain forward's, reassociated: logits and gradients equal
``model(tokens, positions=...)`` to float rounding (``tests/test_fastpath.py``). Parameters are
read on every call, so autograd and the optimizer see through it. Index tensors live on the
model's device: the path runs wherever the weights are.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..model import Transformer, heads_matrix
from ..tasks import as_index


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


class TablePath:
    """Logits ``[b, len(positions), d_vocab_out]`` of a one-layer qkov ``Transformer`` at fixed
    query ``positions``, through (position, token) tables. Call it on checked tokens."""

    def __init__(self, model: Transformer, positions: list[int]):
        self.model = model
        self.block = model.blocks[0]
        self.positions = positions
        self.n_keys = max(positions) + 1          # causal: later keys are never read
        device = model.embed.W_E.device
        self.pos_idx = torch.tensor(positions, device=device)
        self.pos_cols = as_index(positions)       # tokens[:, pos_cols]: a view where consecutive
        self._p_range = torch.arange(len(positions), device=device)
        self._k_range = torch.arange(self.n_keys, device=device)
        self._heads = torch.arange(model.cfg.n_heads, device=device)
        # Keys after a scored query position: masked out of its softmax. [k, 1, p, 1]
        self._masked = (self._k_range[:, None] > self.pos_idx[None, :])[:, None, :, None]

    def query_rows(self, tokens: Tensor, V: int) -> Tensor:
        """Row ``i*V + t`` of a table over (scored position i, token t), per example ``[b, p]``."""
        return torch.add(tokens[:, self.pos_cols], self._p_range, alpha=V)

    def key_rows(self, tokens: Tensor, V: int) -> Tensor:
        """Row ``j*V + t`` of a table over (key position j, token t), per example ``[b, k]``."""
        return torch.add(tokens[:, :self.n_keys], self._k_range, alpha=V)

    # ------------------------------------------------------------ attention
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

    def _pattern(self, tokens: Tensor, q_tab: Tensor, k_tab: Tensor) -> Tensor:
        """Attention pattern ``[b, p, k, h]`` at the scored positions.

        Every (key row, query row) score comes from one matmul per head, then one gather per
        example: a matmul runs far faster than per-example dot products and their broadcast
        backward. Key position first for the softmax: over a leading dim it is vectorised across
        the batch, several times faster on CPU than over a short last dim. It is written out
        (max, exp, sum, divide), not torch's softmax(dim=0): that kernel splits the rows after
        the softmax dim between threads and rounds the split's edges differently, so the weights
        would depend on the thread count; each step here computes every element alike.
        """
        nk, V, h, e = k_tab.shape
        B, P = len(tokens), len(self.positions)
        table = torch.bmm(k_tab.reshape(nk * V, h, e).transpose(0, 1),
                          (q_tab.reshape(P * V, h, e) / e**0.5).permute(1, 2, 0))   # [h, k*V, p*V]
        k_rows = self.key_rows(tokens, V).T[:, :, None, None]                  # [k, b, 1, 1]
        q_rows = self.query_rows(tokens, V)[None, :, :, None]                  # [1, b, p, 1]
        idx = (k_rows + self._heads * (nk * V)) * (P * V) + q_rows             # [k, b, p, h]
        scores = table.reshape(-1).index_select(0, idx.reshape(-1)).view(nk, B, P, h)
        scores = scores.masked_fill(self._masked, float("-inf"))
        weights = (scores - scores.amax(0, keepdim=True)).exp()                # [k, b, p, h]
        return (weights / weights.sum(0, keepdim=True)).permute(1, 2, 0, 3)

    def _mix(self, tokens: Tensor, pattern: Tensor, tables: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
        """``Σ_(k,h) pattern · ov_tab[k, token_k, h] + skip_tab[p, token_p]`` per (example, scored position).

        ``tables`` holds ``(ov_tab [k, V, h, w], skip_tab [p, V, w])`` pairs that share the same
        mixing (one output ``[b*p, w]`` each). One weighted bag per (example, scored position):
        the value-table rows ``(k*V + token_k)*h + head`` weighted by the pattern, then the query
        token's skip row (weight 1), which follows the value table. Rows increase along each bag.
        """
        B, P, nk, h = pattern.shape
        V = tables[0][0].shape[1]
        kv = self.key_rows(tokens, V) * h                                      # [b, k]
        rows = (kv[:, :, None] + self._heads).reshape(B, 1, nk * h).expand(B, P, nk * h)
        skip = nk * V * h + self.query_rows(tokens, V)                         # [b, p]
        rows = torch.cat([rows, skip[..., None]], dim=-1)                      # [b, p, k*h + 1]
        weights = torch.cat([pattern.reshape(B, P, nk * h), pattern.new_ones(B, P, 1)], dim=-1)
        flat = [torch.cat([ov.reshape(nk * V * h, -1), sk.reshape(P * V, -1)]) for ov, sk in tables]
        return WeightedBag.apply(weights.reshape(B * P, -1), rows.reshape(B * P, -1), *flat)

    # ------------------------------------------------------------ readouts
    def __call__(self, tokens: Tensor) -> Tensor:
        if self.model.cfg.normalization is None:
            return self._pushed_logits(tokens)
        return self._resid_logits(tokens)

    def _pushed_logits(self, tokens: Tensor) -> Tensor:
        """No LayerNorm: values pushed through ``W_O W_in`` and ``W_O W_U``, mixed by the pattern."""
        model, block, attn = self.model, self.block, self.block.attn
        x_tab = self._embed_table(tokens.shape[1])                              # [n, V, d]
        B, P, W_U = len(tokens), len(self.positions), model.unembed.W_U
        q_tab, k_tab, v_tab = self._qkv_tables(x_tab)                           # [p|k, V, h, e]
        pattern = self._pattern(tokens, q_tab, k_tab)                           # [b, p, k, h]
        x_q = x_tab[self.pos_idx]                                               # [p, V, d]
        ov_U = (attn.W_O.flatten(0, 1) @ W_U).view(*attn.W_O.shape[:2], -1)     # [h, e, v_out]
        W_U_tab = (_per_head(v_tab, ov_U),                                      # [k, V, h, v_out] direct path
                   x_q @ W_U + (attn.b_O @ W_U + model.unembed.b_U))             # [p, V, v_out]
        if not hasattr(block, "mlp"):
            (logits,) = self._mix(tokens, pattern, [W_U_tab])
            return logits.view(B, P, -1)
        mlp = block.mlp
        # The skip row enters every bag once with weight 1, so constant terms ride along in it.
        ov_in = (attn.W_O.flatten(0, 1) @ mlp.W_in).view(*attn.W_O.shape[:2], -1)   # [h, e, m]
        W_in_tab = (_per_head(v_tab, ov_in),                                    # [k, V, h, m]
                    x_q @ mlp.W_in + (attn.b_O @ mlp.W_in + mlp.b_in))            # [p, V, m]
        W_U_tab = (W_U_tab[0], W_U_tab[1] + mlp.b_out @ W_U)
        pre, direct = self._mix(tokens, pattern, [W_in_tab, W_U_tab])           # [b*p, m], [b*p, v]
        logits = mlp.act(pre) @ (mlp.W_out @ W_U) + direct                      # [b*p, v]
        return logits.view(B, P, -1)

    def _resid_logits(self, tokens: Tensor) -> Tensor:
        """LayerNorm: attention from tables, then the residual stream per example."""
        model, block, attn = self.model, self.block, self.block.attn
        resid_tab = self._embed_table(tokens.shape[1])                          # [n, V, d]
        B, P = len(tokens), len(self.positions)
        q_tab, k_tab, v_tab = self._qkv_tables(block.ln1(resid_tab))            # [p|k, V, h, e]
        pattern = self._pattern(tokens, q_tab, k_tab)                           # [b, p, k, h]
        ov_tab = _per_head(v_tab, attn.W_O)                                     # [k, V, h, d]
        (resid,) = self._mix(tokens, pattern, [(ov_tab, resid_tab[self.pos_idx])])
        resid = resid + attn.b_O                                                # [b*p, d] resid_mid
        if hasattr(block, "mlp"):
            mlp = block.mlp
            resid = resid + mlp.act(block.ln2(resid) @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out
        resid = model.ln_final(resid)
        return (resid @ model.unembed.W_U + model.unembed.b_U).view(B, P, -1)


class WeightedBag(torch.autograd.Function):
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
                crow = torch.arange(0, n * s + 1, s, device=rows.device)
                bags = torch.sparse_csr_tensor(crow, flat, weights.reshape(-1), size=(n, n_rows))
                for grad, table in zip(grads, tables):
                    g = torch.sparse.sampled_addmm(bags, grad.contiguous(), table.T, beta=0.0).values()
                    g_weights = g if g_weights is None else g_weights + g
            g_weights = g_weights.view(n, s)
        g_tables = [None] * len(tables)
        if any(ctx.needs_input_grad[2:]):
            order = flat.argsort()
            offsets = torch.zeros(n_rows, dtype=torch.long, device=rows.device)
            offsets[1:] = torch.bincount(flat, minlength=n_rows)[:-1].cumsum(0)
            bag_of, w = order // s, weights.reshape(-1)[order]
            for i, grad in enumerate(grads):
                if ctx.needs_input_grad[2 + i]:
                    g_tables[i] = F.embedding_bag(bag_of, grad.contiguous(), offsets, mode="sum", per_sample_weights=w)
        return (g_weights, None, *g_tables)
