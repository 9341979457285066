"""Transformer: a small decoder-only transformer whose weights and hook names are TransformerLens's.

Parameters are named and shaped exactly as in a TransformerLens 3.x ``HookedTransformer`` state
dict (``embed.W_E``, ``blocks.0.attn.W_Q [n_heads, d_model, d_head]``, ...), so a TransformerLens
state dict of the same architecture loads with ``load_state_dict`` and vice versa. Activations
are cached under TransformerLens hook names by :meth:`Transformer.run_with_cache`.

Weights are applied as ``x @ W``. Shapes in comments: b = batch, p = position (query), k = key
position, h = head, e = d_head, d = d_model, m = d_mlp, v = vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import MLP, Attention, Block, LayerNorm, heads_matrix
from .config import ModelConfig
from .errors import QkovError
from .hooks import ActiveHooks, Hooked, HookPoint

__all__ = ["MLP", "Attention", "Block", "LayerNorm", "Transformer", "heads_matrix"]


class Embed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))


class PosEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))


class Unembed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.vocab_out))
        self.b_U = nn.Parameter(torch.zeros(cfg.vocab_out))
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()


def _stacked(module: str, name: str, shape: str) -> property:
    """A read-only property: every block's ``module.name`` stacked along a leading layer dim."""
    where = f"blocks[layer].{module}.{name}"
    doc = (f"``{name}`` of every layer, {shape}: a stacked *copy* (detached). Writing into it "
           f"(``model.{name}[0] = 0``) changes the copy, not the model; edit the parameter itself, "
           f"``with torch.no_grad(): model.{where}[...] = 0``.")
    return property(lambda self: self._stack(module, name), doc=doc)


class Transformer(Hooked, nn.Module):
    """A decoder-only transformer with TransformerLens's parameter names, shapes and hook names.

    Hooks (:class:`qkov.hooks.Hooked`) follow TransformerLens: ``model.run_with_hooks(tokens,
    fwd_hooks=[(name, fn)])``, ``with model.hooks(fwd_hooks=...)``, ``model.run_with_cache(tokens,
    names_filter=...)``; ``model.hook_dict`` holds every hook point TransformerLens defines for
    the same architecture, and each fires when hooked (no ``use_attn_result``-style flags).

    >>> cfg = ModelConfig(n_layers=1, n_heads=1, d_model=32, d_vocab=64, n_ctx=6)
    >>> model = Transformer(cfg, seed=0)
    >>> model(torch.tensor([[3, 1, 4]])).shape
    torch.Size([1, 3, 64])

    With the head's output zeroed, only the direct path is left:

    >>> zero_head = lambda z, hook: torch.zeros_like(z)
    >>> logits = model.run_with_hooks(torch.tensor([[3, 1, 4]]), fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
    >>> torch.allclose(logits[0], (model.W_E[[3, 1, 4]] + model.W_pos[:3]) @ model.W_U + model.b_U)
    True
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.pos_embed = PosEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.normalization == "LN":
            self.ln_final = LayerNorm(cfg.d_model)
        self.unembed = Unembed(cfg)
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.setup_hooks()
        self.init_weights(seed)

    # ------------------------------------------------------------------ init
    def init_weights(self, seed: int = 0) -> None:
        """TransformerLens's GPT-2 style init: N(0, init_std) matrices, zero biases, unit LN."""
        std = self.cfg.init_std if self.cfg.init_std is not None else 0.8 / math.sqrt(self.cfg.d_model)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.split(".")[-1].startswith("W_"):
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
                elif name.endswith(".w"):
                    p.fill_(1.0)
                else:
                    p.zero_()
        self.freeze_biases_if_unused()

    def freeze_biases_if_unused(self) -> None:
        """With ``use_bias=False`` the biases stay zero: they exist (for state-dict parity) but never train."""
        if not self.cfg.use_bias:
            for name, p in self.named_parameters():
                if name.split(".")[-1].startswith("b_"):
                    p.requires_grad_(False)

    # --------------------------------------------------------------- forward
    def forward(self, tokens: Tensor, positions: Tensor | list[int] | None = None,
                rows: Tensor | None = None, start_at_layer: int | None = None,
                stop_at_layer: int | None = None, prefix_kv: list | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        """``tokens [batch, pos]`` -> logits ``[batch, pos, d_vocab_out]``.

        With ``positions`` (query positions, e.g. the ones a loss reads), the last layer attends,
        runs its MLP and unembeds only at those positions: logits ``[batch, len(positions),
        d_vocab_out]``, equal to the full forward's logits at those positions. With ``rows``, a
        boolean ``[batch, pos]`` mask (positions that vary by example, e.g. the repeated part of
        an induction sequence), only those rows are unembedded: logits ``[rows.sum(),
        d_vocab_out]``, equal to ``model(tokens)[rows]``.

        As in TransformerLens, ``start_at_layer=l`` takes the residual stream before block ``l``
        (``[batch, pos, d_model]``) in place of tokens, and ``stop_at_layer=l`` returns the
        residual stream before block ``l`` instead of logits. With ``start_at_layer``, the input
        may be the later positions ``p0..`` of a sequence whose earlier positions' keys and values
        (``hook_k``, ``hook_v`` of each layer, ``[B, p0, head, d_head]``) are ``prefix_kv[layer]``:
        the outputs are those positions' (a causal model's later positions never change earlier ones).
        ``B`` may divide the input's batch: input row ``i`` continues prefix row ``i % B``.

        Padding: ``attention_mask`` ``[batch, key pos]`` (TransformerLens's: 1 or True at real
        tokens, 0 at padding; the prefix's positions first) says which positions are padding; a
        model with ``cfg.pad_token`` set reads it off the tokens (``tokens != pad_token``) when none
        is given. A padded position is never attended to and attends to nothing itself.
        """
        if prefix_kv is not None and (start_at_layer is None or positions is not None):
            raise QkovError("prefix_kv continues a residual stream: pass start_at_layer (and no positions)")
        return self._forward(tokens, self._active, positions, rows, start_at_layer, stop_at_layer, prefix_kv,
                             attention_mask)

    def _forward(self, tokens: Tensor, hooks: ActiveHooks | None, positions, rows: Tensor | None = None,
                 start: int | None = None, stop: int | None = None, prefix_kv: list | None = None,
                 attention_mask: Tensor | None = None) -> Tensor:
        if start is None:
            tokens = self._check_tokens(tokens)
            resid = self._embed(tokens, hooks)
        else:
            resid = self._check_resid(tokens, start)
        keep = self._keep(tokens if start is None else None, attention_mask, resid, prefix_kv, start)
        query_pos = None
        if positions is not None:
            query_pos = torch.as_tensor(positions, dtype=torch.long)
        last = self.cfg.n_layers - 1
        for layer, block in enumerate(self.blocks):
            if start is not None and layer < start:
                continue
            if stop is not None and layer >= stop:
                return resid
            resid = block(resid, hooks, query_pos if layer == last else None,
                          None if prefix_kv is None else prefix_kv[layer], keep)
        if stop is not None:
            return resid
        if rows is not None:
            if positions is not None or rows.shape != resid.shape[:2]:
                raise QkovError(f"rows must be a boolean mask shaped like tokens {tuple(resid.shape[:2])}, "
                                f"without positions; got {tuple(rows.shape)}")
            resid = resid[rows]                                                 # [n, d]
        if self.cfg.normalization == "LN":
            resid = self.ln_final(resid, hooks)
        if hooks is None:
            return resid @ self.unembed.W_U + self.unembed.b_U                 # [b, p, v] or [n, v]
        resid = hooks(self.unembed.hook_in, resid)
        return hooks(self.unembed.hook_out, resid @ self.unembed.W_U + self.unembed.b_U)

    def _embed(self, tokens: Tensor, hooks: ActiveHooks | None) -> Tensor:
        """Token plus positional embedding of checked ``tokens``, ``[b, p, d]``: the residual
        stream before block 0."""
        # F.embedding, not W_E[tokens]: indexing's backward accumulates with index_put_, whose
        # order varies between runs with more than one thread; embedding's backward does not.
        embed = F.embedding(tokens, self.embed.W_E)                             # [b, p, d]
        pos_embed = self.pos_embed.W_pos[:tokens.shape[1]].expand_as(embed)     # [b, p, d], a view
        if hooks is not None:
            embed = hooks(self.hook_embed, embed)
            # A hook that edits in place gets its own copy, never a view of W_pos.
            if hooks.edited(self.hook_pos_embed):
                pos_embed = pos_embed.clone()
            pos_embed = hooks(self.hook_pos_embed, pos_embed)
        return embed + pos_embed

    def _keep(self, tokens: Tensor | None, attention_mask, resid: Tensor, prefix_kv: list | None,
              start: int | None) -> Tensor | None:
        """``[b, key pos]`` bool, False at padding; None when nothing is padded."""
        n_keys = resid.shape[1] + (0 if prefix_kv is None else prefix_kv[start or 0][0].shape[1])
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask, device=resid.device)
            if mask.shape != (resid.shape[0], n_keys):
                raise QkovError(f"attention_mask must be [batch, key pos] = {(resid.shape[0], n_keys)}, 1 at real "
                                f"tokens and 0 at padding; got shape {tuple(mask.shape)}")
            return mask.bool()
        if self.cfg.pad_token is None:
            return None
        if tokens is None:
            raise QkovError(f"this model pads (pad_token={self.cfg.pad_token}) but start_at_layer gives it no "
                            f"tokens to find the padding in; pass attention_mask=(tokens != {self.cfg.pad_token})")
        keep = self.padding_mask(tokens.to(resid.device))
        return None if bool(keep.all()) else keep

    def padding_mask(self, tokens: Tensor) -> Tensor | None:
        """``tokens != cfg.pad_token`` (``[batch, pos]``, True at real tokens), the mask the forward
        reads padding from; None for a model without ``pad_token``."""
        return None if self.cfg.pad_token is None else torch.as_tensor(tokens) != self.cfg.pad_token

    def _check_resid(self, resid: Tensor, start: int) -> Tensor:
        if not 0 <= start < self.cfg.n_layers:
            raise QkovError(f"start_at_layer={start} is out of range; this model has layers 0..{self.cfg.n_layers - 1}")
        if resid.ndim != 3 or resid.shape[-1] != self.cfg.d_model or not resid.is_floating_point():
            raise QkovError(f"with start_at_layer the input is the residual stream [batch, pos, "
                            f"d_model={self.cfg.d_model}]; got {resid.dtype} of shape {tuple(resid.shape)}")
        return resid

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and any(isinstance(t, str) for t in tokens)):
            raise QkovError(
                f"tokens must be integer ids shaped [batch, pos], not text; got {tokens!r:.60}. Pass a tensor "
                f"of ids, e.g. torch.tensor([[35, 14, 47]]), or turn text into ids with the task's parse(text)"
            )
        try:
            tokens = torch.as_tensor(tokens)
        except (TypeError, ValueError, RuntimeError) as e:
            raise QkovError(
                f"tokens must be integer ids shaped [batch, pos]; got {type(tokens).__name__} ({e})"
            ) from None
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise QkovError(
                f"tokens must be integer ids shaped [batch, pos]; got dtype {tokens.dtype} shape {tuple(tokens.shape)}"
            )
        if tokens.shape[1] > self.cfg.n_ctx:
            raise QkovError(
                f"a sequence of {tokens.shape[1]} tokens is longer than n_ctx={self.cfg.n_ctx}; "
                f"shorten it or use a model with a larger n_ctx"
            )
        if tokens.numel():
            lo, hi = (int(x) for x in torch.aminmax(tokens))
            if lo < 0 or hi >= self.cfg.d_vocab:
                raise QkovError(
                    f"token ids must lie in 0..{self.cfg.d_vocab - 1} (d_vocab={self.cfg.d_vocab}); "
                    f"got ids from {lo} to {hi}"
                )
        return tokens.long()

    # ------------------------------------------- stacked weights, as in TransformerLens
    def _stack(self, module: str, name: str) -> Tensor:
        if module == "mlp" and self.cfg.d_mlp is None:
            raise QkovError(f"{name} needs an MLP, but this model is attention-only (d_mlp=None)")
        return torch.stack([getattr(getattr(b, module), name).detach() for b in self.blocks])

    @property
    def W_E(self) -> Tensor:            # [d_vocab, d_model]
        """``embed.W_E`` detached: a view, so writing into it (under ``torch.no_grad()``) changes
        the model. The stacked per-layer properties (``W_Q``, ``W_O``, ...) are copies instead."""
        return self.embed.W_E.detach()

    @property
    def W_pos(self) -> Tensor:          # [n_ctx, d_model]
        """``pos_embed.W_pos`` detached (a view of the parameter, as :attr:`W_E`)."""
        return self.pos_embed.W_pos.detach()

    @property
    def W_U(self) -> Tensor:            # [d_model, d_vocab_out]
        """``unembed.W_U`` detached (a view of the parameter, as :attr:`W_E`)."""
        return self.unembed.W_U.detach()

    @property
    def b_U(self) -> Tensor:            # [d_vocab_out]
        """``unembed.b_U`` detached (a view of the parameter, as :attr:`W_E`)."""
        return self.unembed.b_U.detach()

    W_Q = _stacked("attn", "W_Q", "[n_layers, n_heads, d_model, d_head]")
    W_K = _stacked("attn", "W_K", "[n_layers, n_heads, d_model, d_head]")
    W_V = _stacked("attn", "W_V", "[n_layers, n_heads, d_model, d_head]")
    W_O = _stacked("attn", "W_O", "[n_layers, n_heads, d_head, d_model]")
    b_Q = _stacked("attn", "b_Q", "[n_layers, n_heads, d_head]")
    b_K = _stacked("attn", "b_K", "[n_layers, n_heads, d_head]")
    b_V = _stacked("attn", "b_V", "[n_layers, n_heads, d_head]")
    b_O = _stacked("attn", "b_O", "[n_layers, d_model]")
    W_in = _stacked("mlp", "W_in", "[n_layers, d_model, d_mlp]")
    W_out = _stacked("mlp", "W_out", "[n_layers, d_mlp, d_model]")
    b_in = _stacked("mlp", "b_in", "[n_layers, d_mlp]")
    b_out = _stacked("mlp", "b_out", "[n_layers, d_model]")
