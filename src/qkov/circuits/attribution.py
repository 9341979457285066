"""Exact logit attribution: a model's final logits as the sum of what each path writes.

The residual stream at the last layer is a sum: token embedding + position embedding + every
head's output + every MLP's output + biases. The unembedding is linear, and a final LayerNorm
is linear too once its scale is fixed to the one the forward pass computed (as TransformerLens's
``apply_ln_to_stack`` does). So each piece can be pushed to the logits on its own and the pieces
add back up to the model's logits exactly (to float rounding).

This is the one place in ``qkov.circuits`` that runs the model (``model.run_with_cache``);
it takes a qkov model or a TransformerLens model, not a bare :class:`Weights`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import QkovError
from .weights import Weights, weights


@dataclass
class LogitAttribution:
    """Final logits split by path; :meth:`total` adds the terms back up to ``logits``."""

    embed: Tensor      # [batch, pos, d_vocab_out]  token embeddings, straight to the unembedding
    pos_embed: Tensor  # [batch, pos, d_vocab_out]  position embeddings, straight to the unembedding
    heads: Tensor      # [batch, pos, n_layers, n_heads, d_vocab_out]  each head's output
    mlps: Tensor       # [batch, pos, n_layers, d_vocab_out]  each MLP's output ([.., 0, ..] if attention-only)
    bias: Tensor       # [batch, pos, d_vocab_out]  b_O and b_out of every layer, LayerNorm biases and b_U
    logits: Tensor     # [batch, pos, d_vocab_out]  the model's own logits

    @property
    def direct(self) -> Tensor:
        """The direct path, embeddings to logits: ``embed + pos_embed``."""
        return self.embed + self.pos_embed

    def total(self) -> Tensor:
        """The sum of every term: equals ``logits`` up to float rounding."""
        return self.embed + self.pos_embed + self.heads.sum((2, 3)) + self.mlps.sum(2) + self.bias


def logit_attribution(model, tokens) -> LogitAttribution:
    """Run ``model`` on ``tokens [batch, pos]`` and split its final logits by path.

    For LayerNorm models each term is ``(component / scale) @ W_U + ...`` with the folded,
    centred weights of :func:`weights` and the final LayerNorm's scale from this forward pass.
    """
    if isinstance(model, Weights) or not hasattr(model, "run_with_cache"):
        raise QkovError(
            "logit_attribution runs the model, so it needs a qkov.Transformer or a TransformerLens "
            f"model, not {type(model).__name__}"
        )
    w = weights(model, center_unembed=False)
    tokens = torch.as_tensor(tokens).to(w.device)                    # the model runs where its weights are
    if tokens.ndim == 1:
        tokens = tokens[None]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    logits = logits.detach()
    get = lambda name: cache[name].detach()  # noqa: E731

    last = f"blocks.{w.n_layers - 1}.hook_resid_post"
    if w.normalization == "LN":
        if "ln_final.hook_scale" in cache:
            scale = get("ln_final.hook_scale")                       # [b, p, 1]
        else:
            resid = get(last)                                         # [b, p, d]
            centred = resid - resid.mean(-1, keepdim=True)
            scale = (centred.square().mean(-1, keepdim=True) + w.eps).sqrt()
    else:
        scale = None

    def to_logits(x: Tensor) -> Tensor:                               # [b, p, ..., d] -> [b, p, ..., v]
        if scale is not None:
            x = x / scale.reshape(scale.shape[:2] + (1,) * (x.ndim - 3) + (1,))
        return x @ w.W_U

    embed = get("hook_embed")                                         # [b, p, d]
    pos = get("hook_pos_embed") if "hook_pos_embed" in cache else torch.zeros_like(embed)
    heads, mlps = [], []
    bias = w.b_O.sum(0)                                               # [d]
    for l in range(w.n_layers):
        z = get(f"blocks.{l}.attn.hook_z")                            # [b, p, h, e]
        heads.append(to_logits(torch.einsum("bphe,hed->bphd", z, w.W_O[l])))   # [b, p, h, v]
        if not w.attn_only:
            mlp = get(f"blocks.{l}.hook_mlp_out") - w.b_out[l]        # [b, p, d], bias kept apart
            mlps.append(to_logits(mlp))
            bias = bias + w.b_out[l]
    b, p = embed.shape[:2]
    mlps_t = torch.stack(mlps, 2) if mlps else embed.new_zeros(b, p, 0, w.d_vocab_out)
    return LogitAttribution(
        embed=to_logits(embed),
        pos_embed=to_logits(pos.expand_as(embed)),
        heads=torch.stack(heads, 2),
        mlps=mlps_t,
        bias=to_logits(bias.expand_as(embed)) + w.b_U,
        logits=logits,
    )
