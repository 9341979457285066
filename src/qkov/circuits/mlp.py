"""Effective weights through an MLP: what tokens write into each neuron, what neurons write out.

An MLP splits a layer's OV circuit in two at its nonlinearity. Before it, the *neuron-input
map* says what each neuron's pre-activation receives from each token: through a head that
attends fully to token ``t`` at position ``pos`` it is ``(W_E + W_pos[pos]) W_V W_O W_in``
(summed over heads, or one head's term), and through the residual stream's skip path the query
position's own token adds ``(W_E + W_pos[pos]) W_in``. After it, the *neuron-logit map*
``W_out W_U`` says what each neuron's activation adds to each output logit.

For layers past the first these are the *direct* paths from the embedding (the terms of the
path expansion that skip earlier layers). Biases (``b_V``, ``b_O``, ``b_in``) are left out: each
adds one constant per neuron. LayerNorm models are read folded (see ``weights.py``).

>>> import qkov
>>> model = qkov.Transformer(qkov.ModelConfig(n_layers=1, n_heads=2, d_model=16, d_mlp=32, d_vocab=10, n_ctx=3))
>>> neuron_inputs(model, pos=0).shape, neuron_logits(model).shape
(torch.Size([10, 32]), torch.Size([32, 10]))
"""

from __future__ import annotations

import torch
from torch import Tensor

from .weights import Weights, weights


def _embed(w: Weights, pos: int | None) -> Tensor:
    """``W_E`` (+ ``W_pos[pos]``): the residual stream of each token, ``[d_vocab, d_model]``."""
    if pos is None:
        return w.W_E
    return w.W_E + w.W_pos[w.check_pos(pos)]


def _mlp_weights(model, layer: int, what: str) -> tuple[Weights, int]:
    w = weights(model)
    w.need_mlp(what)
    return w, w.check_layer(layer)


def neuron_inputs(model, layer: int = 0, pos: int | None = None, head: int | None = None) -> Tensor:
    """``[d_vocab, d_mlp]``: what neuron n of ``layer`` receives when the head(s) attend fully to token t.

    ``(W_E + W_pos[pos]) W_V W_O W_in`` summed over the layer's heads (``head=None``) or for one
    head. With ``pos=None`` the positional embedding is left out (it adds the same vector to
    every token's row, so it shifts each neuron by a constant).
    """
    w, layer = _mlp_weights(model, layer, "neuron_inputs")
    x = _embed(w, pos)                                                          # [v, d]
    W_V, W_O = w.W_V[layer], w.W_O[layer]                                      # [h, d, e], [h, e, d]
    if head is not None:
        head = w.check_head(head)
        W_V, W_O = W_V[head : head + 1], W_O[head : head + 1]
    # Contract the small factors first: x (W_V W_O W_in) per head, never a [v, h, d] tensor twice.
    ov_in = torch.einsum("hde,hef,fm->hdm", W_V, W_O, w.W_in[layer])          # [h, d, m]
    return torch.einsum("vd,hdm->vm", x, ov_in)                                 # [v, m]


def skip_inputs(model, layer: int = 0, pos: int | None = None) -> Tensor:
    """``[d_vocab, d_mlp]``: the skip path ``(W_E + W_pos[pos]) W_in``, the query token's own term."""
    w, layer = _mlp_weights(model, layer, "skip_inputs")
    return _embed(w, pos) @ w.W_in[layer]                                       # [v, m]


def neuron_logits(model, layer: int = 0) -> Tensor:
    """``[d_mlp, d_vocab_out]``: ``W_out W_U``, what each neuron's activation adds to each logit."""
    w, layer = _mlp_weights(model, layer, "neuron_logits")
    return w.W_out[layer] @ w.W_U                                               # [m, v_out]
