"""QK and OV circuits of single heads, full circuits through the embeddings, and the path expansion.

Orientation (as in TransformerLens and the *Mathematical Framework*): a full OV circuit is
``[source token (attended), output logit]`` = ``(W_E [+ W_pos[pos]]) W_V W_O W_U``; a full QK
circuit is ``[query token, key token]`` = ``E_q W_Q W_Kᵀ E_kᵀ`` with ``E_q = W_E + W_pos[q_pos]``
when a position is given. Every circuit is a :class:`FactoredMatrix`, never a dense
``d_vocab × d_vocab`` matrix. QK circuits are the raw bilinear form: the model divides attention
scores by ``weights(model).attn_scale`` (``sqrt(d_head)``).

Positions, one convention for every function: ``pos`` (OV side, direct path) and ``q_pos`` /
``k_pos`` (QK side) are optional keywords, default ``None``. ``None`` leaves the positional
embedding out (the token-only circuit, what MFTC draws); an integer adds ``W_pos[pos]`` to the
token embeddings, and ``k_pos`` may not come after ``q_pos`` in a causal model (causal attention
never reads it; a bidirectional model's heads read every position).

``include_bias=True`` folds biases in with the framework's trick: the residual stream gains a
constant-1 coordinate, ``W_Q`` gains ``b_Q`` as an extra row (so ``[x, 1] W_Q' = x W_Q + b_Q``),
likewise ``W_K, W_V`` and ``W_U``. A head's OV output keeps 0 in that coordinate (it adds to the
stream), so full OV circuits gain ``b_V W_O W_U`` but never the layer's ``b_O`` or ``b_U``.

For LayerNorm models these are circuits of the folded, centred weights
(:mod:`qkov.circuits.weights`); every function takes a qkov model, a TransformerLens model or a
:class:`Weights`. Circuits through layer ``l > 0`` are the direct paths that skip earlier layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import QkovError
from .factored import FactoredMatrix
from .weights import Weights, weights


# ------------------------------------------------------------------ building blocks
def _with_one(x: Tensor) -> Tensor:
    """Append the constant-1 coordinate: ``[..., n, d] -> [..., n, d + 1]``."""
    return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)


def _with_row(W: Tensor, b: Tensor) -> Tensor:
    """``W [d, e]`` and its bias ``b [e]`` as one map from the extended stream ``[d + 1, e]``."""
    return torch.cat([W, b[None]], dim=0)


def _tokens(w: Weights, pos: int | None, include_bias: bool, name: str = "pos") -> Tensor:
    """Token embeddings ``[d_vocab, d_model(+1)]``, plus the embedding of position ``pos``."""
    E = w.W_E
    if pos is not None:
        E = E + w.W_pos[w.check_pos(pos, name)]
    return _with_one(E) if include_bias else E


def _unembed(w: Weights, include_bias: bool) -> Tensor:
    """``W_U [d_model(+1), d_vocab_out]`` (with ``b_U`` as the constant coordinate's row)."""
    return _with_row(w.W_U, w.b_U) if include_bias else w.W_U


def _head(w: Weights, layer, head) -> tuple[int, int]:
    return w.check_layer(layer), w.check_head(head)


def qk(model, layer: int, head: int, include_bias: bool = False) -> FactoredMatrix:
    """``W_Q W_Kᵀ`` of one head in the residual basis: ``[d_model(+1), d_model(+1)]``."""
    w = weights(model)
    l, h = _head(w, layer, head)
    W_Q, W_K = w.W_Q[l, h], w.W_K[l, h]                               # [d, e]
    if include_bias:
        W_Q, W_K = _with_row(W_Q, w.b_Q[l, h]), _with_row(W_K, w.b_K[l, h])
    return FactoredMatrix(W_Q, W_K.T)


def ov(model, layer: int, head: int, include_bias: bool = False) -> FactoredMatrix:
    """``W_V W_O`` of one head in the residual basis: ``[d_model(+1), d_model(+1)]``."""
    w = weights(model)
    l, h = _head(w, layer, head)
    W_V, W_O = w.W_V[l, h], w.W_O[l, h]                               # [d, e], [e, d]
    if include_bias:
        W_V = _with_row(W_V, w.b_V[l, h])
        W_O = torch.cat([W_O, W_O.new_zeros(W_O.shape[0], 1)], dim=1)  # output adds 0 to the 1
    return FactoredMatrix(W_V, W_O)


# ---------------------------------------------------------------------- full circuits
def full_ov(model, layer: int, head: int, pos: int | None = None, include_bias: bool = False) -> FactoredMatrix:
    """``(W_E [+ W_pos[pos]]) W_V W_O W_U``: ``[d_vocab (source), d_vocab_out (logit)]``."""
    w = weights(model)
    return _tokens(w, pos, include_bias) @ ov(w, layer, head, include_bias) @ _unembed(w, include_bias)


def full_qk(
    model, layer: int, head: int, q_pos: int | None = None, k_pos: int | None = None, include_bias: bool = False
) -> FactoredMatrix:
    """``E_q W_Q W_Kᵀ E_kᵀ``: ``[d_vocab (query token), d_vocab (key token)]``.

    ``E_q = W_E + W_pos[q_pos]`` (``W_E`` when ``q_pos`` is None), likewise ``E_k``. With both
    positions it is the position-aware circuit: entry ``[i, j]`` is the (unscaled) score a query
    ``i`` at ``q_pos`` gives a key ``j`` at ``k_pos`` along the direct path.
    """
    w = weights(model)
    _check_causal(w, q_pos, k_pos)
    Eq = _tokens(w, q_pos, include_bias, "q_pos")
    Ek = _tokens(w, k_pos, include_bias, "k_pos")
    return Eq @ qk(w, layer, head, include_bias) @ Ek.T


def _check_causal(w, q_pos, k_pos) -> None:
    """A causal model's query never reads a later key (a bidirectional one's reads every key)."""
    if w.causal and isinstance(q_pos, int) and isinstance(k_pos, int) and k_pos > q_pos >= 0:
        raise QkovError(
            f"k_pos={k_pos} comes after q_pos={q_pos}: causal attention never reads it; "
            f"pass k_pos in 0..{q_pos}"
        )


def positional_qk(model, layer: int, head: int, include_bias: bool = False) -> FactoredMatrix:
    """``W_pos W_Q W_Kᵀ W_posᵀ``: ``[n_ctx (query position), n_ctx (key position)]``."""
    w = weights(model)
    if w.W_pos is None:
        raise QkovError("positional_qk needs learned positional embeddings (W_pos); this model has none")
    P = _with_one(w.W_pos) if include_bias else w.W_pos
    return P @ qk(w, layer, head, include_bias) @ P.T


class QKTerms:
    """A position-aware full QK circuit split as ``(e_q + p_q) W_QK (e_k + p_k)ᵀ`` expands.

    ``tok_tok [d_vocab, d_vocab]`` (factored) = ``e_q W_QK e_kᵀ``; ``tok_pos [d_vocab]`` over
    query tokens = ``e_q W_QK p_kᵀ``; ``pos_tok [d_vocab]`` over key tokens = ``p_q W_QK e_kᵀ``;
    ``pos_pos`` (0-d) = ``p_q W_QK p_kᵀ``. With ``include_bias`` the biases ride with the
    positions (``p' = [p, 1]``). ``total()`` is the dense ``full_qk`` they add up to.
    """

    def __init__(self, tok_tok: FactoredMatrix, tok_pos: Tensor, pos_tok: Tensor, pos_pos: Tensor):
        self.tok_tok, self.tok_pos, self.pos_tok, self.pos_pos = tok_tok, tok_pos, pos_tok, pos_pos

    def total(self) -> Tensor:
        """``[d_vocab, d_vocab]`` dense: for small vocabularies and checks."""
        return self.tok_tok.AB + self.tok_pos[:, None] + self.pos_tok[None, :] + self.pos_pos

    def __repr__(self) -> str:
        return f"QKTerms(tok_tok={self.tok_tok}, pos_pos={float(self.pos_pos):.4g})"


def qk_terms(
    model, layer: int, head: int, q_pos: int | None = None, k_pos: int | None = None,
    include_bias: bool = False, scaled: bool = False,
) -> QKTerms:
    """Split the attention score of (query token at ``q_pos``, key token at ``k_pos``) in four.

    A position left ``None`` contributes nothing (its positional terms are zero), as in
    :func:`full_qk`: ``qk_terms(...).total()`` equals ``full_qk(...)`` with the same positions.
    ``scaled=True`` divides every term by ``attn_scale`` so they add up to the model's layer-0
    attention scores (for a model without LayerNorm; with it, to scores before the LN scale).

    >>> import qkov
    >>> model = qkov.Transformer(qkov.ModelConfig(n_layers=1, n_heads=1, d_model=8, d_vocab=5, n_ctx=4))
    >>> t = qk_terms(model, 0, 0, q_pos=3, k_pos=1)
    >>> torch.allclose(t.total(), full_qk(model, 0, 0, q_pos=3, k_pos=1).to_dense(), atol=1e-5)
    True
    >>> float(qk_terms(model, 0, 0).pos_pos)          # no positions: only the token-token term
    0.0
    """
    w = weights(model)
    _check_causal(w, q_pos, k_pos)
    M = qk(w, layer, head, include_bias)                              # [d(+1), d(+1)]
    E = w.W_E
    pq, pk = (E.new_zeros(E.shape[1]) if p is None else w.W_pos[w.check_pos(p, name)]   # [d]
              for p, name in ((q_pos, "q_pos"), (k_pos, "k_pos")))
    if include_bias:
        E = torch.cat([E, E.new_zeros(E.shape[0], 1)], dim=1)         # tokens carry no 1 ...
        pq, pk = torch.cat([pq, pq.new_ones(1)]), torch.cat([pk, pk.new_ones(1)])  # ... positions do
    s = 1.0 / w.attn_scale if scaled else 1.0
    tok_tok = (E @ M @ E.T) * s
    tok_pos = (E @ (M @ pk)) * s                                      # [d_vocab]
    pos_tok = ((pq @ M) @ E.T) * s                                    # [d_vocab]
    pos_pos = (pq @ (M @ pk)) * s
    return QKTerms(tok_tok, tok_pos, pos_tok, pos_pos)


# ------------------------------------------------------------------- path expansion
def direct_path(model, pos: int | None = None, include_bias: bool = False) -> FactoredMatrix:
    """``(W_E [+ W_pos[pos]]) W_U`` (``+ b_U`` with ``include_bias``): ``[d_vocab, d_vocab_out]``."""
    w = weights(model)
    return FactoredMatrix(_tokens(w, pos, include_bias), _unembed(w, include_bias))


def virtual_ov(
    model, first: tuple[int, int], second: tuple[int, int], pos: int | None = None, include_bias: bool = False
) -> FactoredMatrix:
    """The virtual head ``W_E W_OV^{first} W_OV^{second} W_U``: ``[d_vocab, d_vocab_out]``.

    ``first = (layer, head)`` must sit in an earlier layer than ``second``: the path where the
    second head reads what the first wrote (V-composition).
    """
    w = weights(model)
    (l1, h1), (l2, h2) = _pair(first, "first"), _pair(second, "second")
    if not w.check_layer(l1) < w.check_layer(l2):
        raise QkovError(
            f"virtual_ov needs first=({l1}, {h1}) in an earlier layer than second=({l2}, {h2}); "
            f"a head only reads what earlier layers wrote"
        )
    E = _tokens(w, pos, include_bias)
    return E @ ov(w, l1, h1, include_bias) @ ov(w, l2, h2, include_bias) @ _unembed(w, include_bias)


def _pair(x, name: str) -> tuple[int, int]:
    if not (isinstance(x, Sequence) and len(x) == 2):
        raise QkovError(f"{name}={x!r} must be a (layer, head) pair")
    return x[0], x[1]


# ------------------------------------------------------------------------- scores
def _shared_square(w: Weights, pos: int | None) -> tuple[Tensor, Tensor]:
    """Token embeddings and unembeddings restricted to the tokens both vocabularies share."""
    n = min(w.d_vocab, w.d_vocab_out)
    E = _tokens(w, pos, False)[:n]                                    # [n, d]
    return E, w.W_U[:, :n]                                            # [n, d], [d, n]


def copying_scores(model, pos: int | None = None) -> Tensor:
    """``Re(Σλ) / Σ|λ|`` over the eigenvalues ``λ`` of every head's full OV circuit: ``[L, H]``.

    1 for a head whose OV circuit maps each token to itself with positive weight. When
    ``d_vocab != d_vocab_out`` the square part over the shared tokens (ids ``0..n-1``) is used.
    The eigenvalues are those of the ``d_head × d_head`` matrix ``W_O W_U W_E W_V``, with
    ``W_U W_E`` (``d_model × d_model``) formed once for all heads.
    """
    w = weights(model)
    E, U = _shared_square(w, pos)
    n, d = E.shape
    if n >= d:
        BA = w.W_O @ (U @ E) @ w.W_V                                  # [L, H, e, e]
    else:
        BA = (w.W_O @ U) @ (E @ w.W_V)                                # [L, H, e, n] @ [L, H, n, e]
    if BA.dtype in (torch.float16, torch.bfloat16):
        BA = BA.float()
    lam = torch.linalg.eigvals(BA)                                    # [L, H, e] complex
    num, den = lam.sum(-1).real, lam.abs().sum(-1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def ov_self_stats(
    model, layer: int | None = None, head: int | None = None, ks: Sequence[int] = (1, 5), pos: int | None = None
) -> dict[str, Tensor]:
    """Fraction of source tokens whose top-``k`` output logits in the full OV circuit include
    the token itself, for each ``k`` in ``ks``: ``{"top1": ..., "top5": ...}``.

    Each value is ``[L, H]`` for all heads, or a 0-d tensor for ``layer, head``. Rows are the
    tokens both vocabularies share; a tie with the maximum counts as a hit. The circuit is
    streamed in row chunks (:meth:`FactoredMatrix.diag_in_topk`), so memory stays bounded even at
    50257 × 50257.
    """
    w = weights(model)
    E, _ = _shared_square(w, pos)
    if (layer is None) != (head is None):
        raise QkovError(f"pass both layer and head (one head) or neither (all heads); got layer={layer}, head={head}")
    if layer is None:
        W_V, W_O = w.W_V, w.W_O                                       # [L, H, d, e], [L, H, e, d]
    else:
        l, h = _head(w, layer, head)
        W_V, W_O = w.W_V[l, h], w.W_O[l, h]
    hits = FactoredMatrix(E @ W_V, W_O @ w.W_U).diag_in_topk(list(ks))   # [..., n, len(ks)]
    frac = hits.to(torch.float64).mean(-2)                            # [..., len(ks)]
    return {f"top{k}": frac[..., i] for i, k in enumerate(ks)}


def key_rank_correlation(
    model,
    layer: int,
    head: int,
    q_pos: int | None = None,
    k_pos: int | None = None,
    per_query: bool = False,
    tokens: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Spearman correlation between a key token's value and its score in the full QK circuit.

    For a vocabulary of ordered values (like the ``max`` task's integers): for each query token,
    rank the keys ``tokens`` by the score ``full_qk(q_pos, k_pos)[query, key]`` and correlate
    with their value order. ``tokens`` lists the value-carrying ids in increasing value (default:
    every id, value = id); they are both the queries and the keys. Returns the mean over query
    tokens (0-d), or ``[len(tokens)]`` with ``per_query=True``. Close to 1: "higher tokens get
    more attention" at that (query position, key position). Ties are ranked in index order.
    Positions as in :func:`full_qk` (None: the token-only circuit).

    >>> import qkov
    >>> model = qkov.Transformer(qkov.ModelConfig(n_layers=1, n_heads=1, d_model=8, d_vocab=5, n_ctx=4))
    >>> key_rank_correlation(model, 0, 0).shape, key_rank_correlation(model, 0, 0, q_pos=3, k_pos=3).shape
    (torch.Size([]), torch.Size([]))
    """
    w = weights(model)
    fm = full_qk(w, layer, head, q_pos, k_pos)
    # The ids are checked where they were given (values are read), then used on the weights' device.
    idx = torch.arange(w.d_vocab) if tokens is None else torch.as_tensor(tokens, dtype=torch.long).flatten()
    if idx.numel() < 2 or int(idx.min()) < 0 or int(idx.max()) >= w.d_vocab:
        raise QkovError(f"tokens must list at least 2 ids in 0..{w.d_vocab - 1}; got {idx.tolist()[:10]}")
    idx = idx.to(w.device)
    fm = FactoredMatrix(fm.A[idx], fm.B[:, idx])                      # [n, n]
    n = idx.numel()
    value_rank = torch.arange(n, dtype=torch.float64, device=w.device)
    out = []
    for _, block in fm.iter_rows():                                   # [c, n]
        rank = block.argsort(dim=-1, stable=True).argsort(dim=-1).to(torch.float64)
        out.append(1 - 6 * ((rank - value_rank) ** 2).sum(-1) / (n * (n * n - 1)))
    rho = torch.cat(out)
    return rho if per_query else rho.mean()
