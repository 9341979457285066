"""The five float64 tables every accuracy proof reads, for one sequence length.

A 1-layer, 1-head, attention-only model without LayerNorm computes, at the query position
``n-1`` of a length-``n`` input ``x``, exactly

    logits = EUPU[q] + Σ_i a_i (EVOU[x_i] + PVOU[i]),
    a = softmax_i((EQKE[q, x_i] + EQKP[q, i]) / attn_scale),       q = x_{n-1},

with ``E_q = W_E + W_pos[n-1]`` and every bias folded in: ``EQKE = (E_q W_Q + b_Q) W_Kᵀ W_Eᵀ``,
``EQKP = (E_q W_Q + b_Q)(W_pos W_K + b_K)ᵀ``, ``EVOU = (W_E W_V + b_V) W_O W_U`` (``b_V`` rides
with the tokens because attention sums to 1), ``PVOU = W_pos W_V W_O W_U`` and
``EUPU = (E_q + b_O) W_U + b_U``. The query's constant ``(E_q W_Q + b_Q) b_Kᵀ`` term is in
``EQKP`` (it is the same for every key, so softmax ignores it).

The tables are computed in float64 from the model's weights (read through
:func:`qkov.circuits.weights`) on the weights' device. Proofs are statements about this
function evaluated in float64; a float32 forward agrees with it to about 1e-6 of the logits.

>>> import qkov
>>> model = qkov.Transformer(qkov.ModelConfig(n_layers=1, n_heads=1, d_model=8, d_vocab=5, n_ctx=4))
>>> t = tables(model, length=3)
>>> t.EQKE.shape, t.EQKP.shape, t.EVOU.shape, t.PVOU.shape, t.EUPU.shape
(torch.Size([5, 5]), torch.Size([5, 3]), torch.Size([5, 5]), torch.Size([3, 5]), torch.Size([5, 5]))
>>> tokens = torch.tensor([[4, 0, 2]])
>>> torch.allclose(t.logits(tokens), model(tokens)[:, -1].double(), atol=1e-5)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import circuits
from ..errors import QkovError


@dataclass(frozen=True)
class Tables:
    """One length's tables (float64, shapes in the module docstring's notation)."""

    length: int                # n: positions 0..n-1, the query at n-1
    EQKE: Tensor               # [d_vocab (query token), d_vocab (key token)]
    EQKP: Tensor               # [d_vocab (query token), n (key position)]
    EVOU: Tensor               # [d_vocab (attended token), d_vocab_out]
    PVOU: Tensor               # [n (attended position), d_vocab_out]
    EUPU: Tensor               # [d_vocab (query token), d_vocab_out]
    attn_scale: float          # scores are divided by this before the softmax
    EQKE_factors: tuple[Tensor, Tensor] | None = None   # ([d_vocab, e], [d_vocab, e]): EQKE = A @ B.T
    flops: float = 0.0         # what computing the tables from the weights took

    @property
    def d_vocab(self) -> int:
        """Input tokens the proofs range over (0..d_vocab-1)."""
        return self.EQKE.shape[0]

    @property
    def d_vocab_out(self) -> int:
        return self.EVOU.shape[1]

    @property
    def inputs(self) -> int:
        """How many inputs of this length there are: ``d_vocab ** length``."""
        return self.d_vocab ** self.length

    @property
    def logit_scale(self) -> float:
        """A bound on how large any logit can be: the sum of the tables' largest entries."""
        return float(self.EUPU.abs().max() + self.EVOU.abs().max() + self.PVOU.abs().max())

    def scores(self, q: int) -> Tensor:
        """Pre-softmax scores ``[n (position), d_vocab (token)]`` of a key at each position for query ``q``."""
        return (self.EQKE[q][None, :] + self.EQKP[q][:, None]) / self.attn_scale

    def logits(self, tokens: Tensor) -> Tensor:
        """The model's logits at the last position, rebuilt from the tables: ``[b, n]`` -> ``[b, d_vocab_out]``."""
        tokens = torch.as_tensor(tokens, device=self.EQKE.device).long()
        q = tokens[:, -1]                                                       # [b]
        pos = torch.arange(self.length, device=tokens.device)
        s = (self.EQKE[q[:, None], tokens] + self.EQKP[q][:, pos]) / self.attn_scale   # [b, n]
        a = s.softmax(-1)                                                       # [b, n]
        values = self.EVOU[tokens] + self.PVOU[None]                            # [b, n, d_vocab_out]
        return self.EUPU[q] + (a[..., None] * values).sum(1)                    # [b, d_vocab_out]


def check_model(w: circuits.Weights) -> None:
    """Raise one clear QkovError when the proofs do not apply to a model with these weights."""
    what = (
        [f"n_layers={w.n_layers}"] * (w.n_layers != 1)
        + [f"an MLP (d_mlp={w.d_mlp})"] * (not w.attn_only)
        + ["LayerNorm"] * (w.normalization is not None)
        + [f"n_heads={w.n_heads}"] * (w.n_heads != 1)
        + ["no learned positional embedding"] * (w.W_pos is None)
    )
    if what:
        raise QkovError(
            "qkov certify proves accuracy bounds for 1-layer, 1-head, attention-only models without LayerNorm "
            f"(e.g. the max task's reference model); this model has {', '.join(what)}"
        )


def tables(model, length: int, d_vocab: int | None = None) -> Tables:
    """The tables of ``model`` (qkov, TransformerLens or :class:`~qkov.circuits.Weights`) for
    inputs of ``length`` tokens drawn from ``0..d_vocab-1`` (default: the model's vocabulary)."""
    w = circuits.weights(model, center_unembed=False)
    check_model(w)
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= w.n_ctx:
        raise QkovError(f"length={length!r} must be an integer in 1..{w.n_ctx} (the model's n_ctx)")
    V = w.d_vocab if d_vocab is None else int(d_vocab)
    if not 1 <= V <= w.d_vocab:
        raise QkovError(f"d_vocab={d_vocab} must be in 1..{w.d_vocab} (the model's vocabulary)")
    f = lambda x: x.to(torch.float64)  # noqa: E731
    n = length
    W_E, W_pos, W_U = f(w.W_E[:V]), f(w.W_pos[:n]), f(w.W_U)                  # [V, d], [n, d], [d, v]
    W_Q, W_K, W_V, W_O = (f(x[0, 0]) for x in (w.W_Q, w.W_K, w.W_V, w.W_O))   # [d, e] x3, [e, d]
    b_Q, b_K, b_V = (f(x[0, 0]) for x in (w.b_Q, w.b_K, w.b_V))               # [e]
    E_q = W_E + W_pos[n - 1]                                                  # [V, d]
    query = E_q @ W_Q + b_Q                                                   # [V, e]
    OU = W_O @ W_U                                                            # [e, v]
    key = W_E @ W_K                                                           # [V, e]
    d, e, v = W_E.shape[1], W_Q.shape[1], W_U.shape[1]
    matmuls = ((3 * V + 2 * n) * d * e              # queries, keys and values of tokens and positions
               + e * d * v + (V + n) * e * v         # W_O W_U, then EVOU and PVOU
               + (V + n) * V * e + V * d * v)        # EQKE, EQKP, EUPU
    flops = 2.0 * matmuls
    return Tables(
        length=n,
        EQKE=query @ key.T,                                                   # [V, V]
        EQKP=query @ (W_pos @ W_K + b_K).T,                                   # [V, n]
        EVOU=(W_E @ W_V + b_V) @ OU,                                          # [V, v]
        PVOU=(W_pos @ W_V) @ OU,                                              # [n, v]
        EUPU=(E_q + f(w.b_O[0])) @ W_U + f(w.b_U),                            # [V, v]
        attn_scale=float(w.attn_scale),
        EQKE_factors=(query, key),
        flops=flops,
    )
