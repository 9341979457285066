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
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .errors import QkovError

Cache = dict[str, Tensor]


class _Recorder:
    """Collects activations under hook names, keeping only those the filter asks for."""

    def __init__(self, names: Iterable[str] | Callable[[str], bool] | str | None):
        if names is None:
            self.wants: Callable[[str], bool] = lambda n: True
        elif callable(names):
            self.wants = names
        elif isinstance(names, str):
            self.wants = lambda n, s=names: n == s
        else:
            wanted = set(names)
            self.wants = wanted.__contains__
        self.cache: Cache = {}

    def __call__(self, name: str, x: Tensor) -> None:
        if self.wants(name):
            self.cache[name] = x


def _no_record(name: str, x: Tensor) -> None:
    pass


class LayerNorm(nn.Module):
    """TransformerLens's LayerNorm: centre, scale to unit variance (eps 1e-5), then ``w``, ``b``."""

    def __init__(self, d_model: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w, self.b, eps=1e-5)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d, e = cfg.n_heads, cfg.d_model, cfg.head_dim
        self.W_Q = nn.Parameter(torch.empty(h, d, e))
        self.W_K = nn.Parameter(torch.empty(h, d, e))
        self.W_V = nn.Parameter(torch.empty(h, d, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        self.b_Q = nn.Parameter(torch.zeros(h, e))
        self.b_K = nn.Parameter(torch.zeros(h, e))
        self.b_V = nn.Parameter(torch.zeros(h, e))
        self.b_O = nn.Parameter(torch.zeros(d))
        # Buffers named and shaped as TransformerLens 3.9 has them (an empty `mask`, built at
        # forward time there), so state dicts load strictly both ways.
        self.register_buffer("mask", torch.empty((0, 0), dtype=torch.bool))
        self.register_buffer("IGNORE", torch.tensor(-float("inf")))
        self.register_buffer("causal", torch.tril(torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool)), persistent=False)
        self.scale = 1 / math.sqrt(e)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Older TransformerLens releases store the causal mask itself ([n_ctx, n_ctx]); it is a
        # constant, so whatever shape arrives is replaced by ours.
        if prefix + "mask" in state_dict:
            state_dict[prefix + "mask"] = self.mask
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, rec, prefix: str, query_pos: Tensor | None = None) -> Tensor:
        xq = x if query_pos is None else x[:, query_pos]                       # [b, p, d]
        q = _heads_in(xq, self.W_Q, self.b_Q)                                   # [b, p, h, e]
        k = _heads_in(x, self.W_K, self.b_K)                                    # [b, k, h, e]
        v = _heads_in(x, self.W_V, self.b_V)                                    # [b, k, h, e]
        rec(prefix + "hook_q", q)
        rec(prefix + "hook_k", k)
        rec(prefix + "hook_v", v)
        scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * self.scale      # [b, h, p, k]
        n = x.shape[1]
        mask = self.causal[:n, :n] if query_pos is None else self.causal[query_pos, :n]
        scores = scores.masked_fill(~mask, self.IGNORE)
        rec(prefix + "hook_attn_scores", scores)
        pattern = scores.softmax(dim=-1)                                        # [b, h, p, k]
        rec(prefix + "hook_pattern", pattern)
        z = (pattern @ v.transpose(1, 2)).transpose(1, 2)                       # [b, p, h, e]
        rec(prefix + "hook_z", z)
        h, e, d = self.W_O.shape
        return z.reshape(*z.shape[:2], h * e) @ self.W_O.reshape(h * e, d) + self.b_O   # [b, p, d]


def heads_matrix(W: Tensor) -> Tensor:
    """Per-head input weights ``W [h, d, e]`` side by side as one ``[d, h*e]`` matrix, so that
    ``x @ heads_matrix(W)`` projects onto every head in one matmul."""
    h, d, e = W.shape
    return W.permute(1, 0, 2).reshape(d, h * e)


def _heads_in(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``x [b, p, d] @ W [h, d, e] + b [h, e]`` -> ``[b, p, h, e]`` as one matmul over all heads
    (torch's CPU einsum for this took 40x longer at the induction model's sizes)."""
    h, _, e = W.shape
    return (x @ heads_matrix(W)).view(*x.shape[:-1], h, e) + b


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act = F.relu if cfg.act_fn == "relu" else F.gelu

    def forward(self, x: Tensor, rec, prefix: str) -> Tensor:
        pre = x @ self.W_in + self.b_in                                         # [b, p, m]
        rec(prefix + "hook_pre", pre)
        post = self.act(pre)
        rec(prefix + "hook_post", post)
        return post @ self.W_out + self.b_out                                   # [b, p, d]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ln = cfg.normalization == "LN"
        if ln:
            self.ln1 = LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        if cfg.d_mlp is not None:
            if ln:
                self.ln2 = LayerNorm(cfg.d_model)
            self.mlp = MLP(cfg)
        self._ln = ln
        self._mlp = cfg.d_mlp is not None

    def forward(self, resid: Tensor, rec, prefix: str, query_pos: Tensor | None = None) -> Tensor:
        rec(prefix + "hook_resid_pre", resid)
        x = self.ln1(resid) if self._ln else resid
        attn_out = self.attn(x, rec, prefix + "attn.", query_pos)
        rec(prefix + "hook_attn_out", attn_out)
        # Only the queried positions go on past attention (all of them when query_pos is None).
        resid = (resid if query_pos is None else resid[:, query_pos]) + attn_out
        if self._mlp:
            rec(prefix + "hook_resid_mid", resid)
            mlp_out = self.mlp(self.ln2(resid) if self._ln else resid, rec, prefix + "mlp.")
            rec(prefix + "hook_mlp_out", mlp_out)
            resid = resid + mlp_out
        rec(prefix + "hook_resid_post", resid)
        return resid


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


def _stacked(module: str, name: str, shape: str) -> property:
    """A read-only property: every block's ``module.name`` stacked along a leading layer dim."""
    return property(lambda self: self._stack(module, name), doc=f"``{name}`` of every layer, {shape} (detached).")


class Transformer(nn.Module):
    """A decoder-only transformer with TransformerLens's parameter names, shapes and hook names.

    >>> cfg = ModelConfig(n_layers=1, n_heads=1, d_model=32, d_vocab=64, n_ctx=6)
    >>> model = Transformer(cfg, seed=0)
    >>> model(torch.tensor([[3, 1, 4]])).shape
    torch.Size([1, 3, 64])
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
                rows: Tensor | None = None) -> Tensor:
        """``tokens [batch, pos]`` -> logits ``[batch, pos, d_vocab_out]``.

        With ``positions`` (query positions, e.g. the ones a loss reads), the last layer attends,
        runs its MLP and unembeds only at those positions: logits ``[batch, len(positions),
        d_vocab_out]``, equal to the full forward's logits at those positions. With ``rows``, a
        boolean ``[batch, pos]`` mask (positions that vary by example, e.g. the repeated part of
        an induction sequence), only those rows are unembedded: logits ``[rows.sum(),
        d_vocab_out]``, equal to ``model(tokens)[rows]``.
        """
        return self._forward(tokens, _no_record, positions, rows)

    def run_with_cache(
        self, tokens: Tensor, names: Iterable[str] | Callable[[str], bool] | str | None = None
    ) -> tuple[Tensor, Cache]:
        """Logits and a dict of activations keyed by TransformerLens hook names.

        ``names`` keeps only some activations: a hook name, a list of names, or a predicate.
        """
        rec = _Recorder(names)
        logits = self._forward(tokens, rec, None)
        return logits, rec.cache

    def _forward(self, tokens: Tensor, rec, positions, rows: Tensor | None = None) -> Tensor:
        tokens = self._check_tokens(tokens)
        n = tokens.shape[1]
        # F.embedding, not W_E[tokens]: indexing's backward accumulates with index_put_, whose
        # order varies between runs with more than one thread; embedding's backward does not.
        embed = F.embedding(tokens, self.embed.W_E)                             # [b, p, d]
        pos_embed = self.pos_embed.W_pos[:n].expand_as(embed)                   # [b, p, d]
        rec("hook_embed", embed)
        rec("hook_pos_embed", pos_embed)
        resid = embed + pos_embed
        query_pos = None
        if positions is not None:
            query_pos = torch.as_tensor(positions, dtype=torch.long)
        last = self.cfg.n_layers - 1
        for layer, block in enumerate(self.blocks):
            resid = block(resid, rec, f"blocks.{layer}.", query_pos if layer == last else None)
        if rows is not None:
            if positions is not None or rows.shape != tokens.shape:
                raise QkovError(f"rows must be a boolean mask shaped like tokens {tuple(tokens.shape)}, "
                                f"without positions; got {tuple(rows.shape)}")
            resid = resid[rows]                                                 # [n, d]
        if self.cfg.normalization == "LN":
            resid = self.ln_final(resid)
        return resid @ self.unembed.W_U + self.unembed.b_U                     # [b, p, v] or [n, v]

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        tokens = torch.as_tensor(tokens)
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
        return self.embed.W_E.detach()

    @property
    def W_pos(self) -> Tensor:          # [n_ctx, d_model]
        return self.pos_embed.W_pos.detach()

    @property
    def W_U(self) -> Tensor:            # [d_model, d_vocab_out]
        return self.unembed.W_U.detach()

    @property
    def b_U(self) -> Tensor:            # [d_vocab_out]
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
