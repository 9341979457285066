"""The layers of a Transformer, with TransformerLens's parameter and hook-point names.

``LayerNorm``, ``Attention``, ``MLP`` and the residual ``Block`` that joins them. Each holds its
hook points (``HookPoint`` attributes: ``attn.hook_z``, ``hook_resid_pre``, ...) and asks the
forward's hooks (``ActiveHooks``, ``None`` when nothing is attached) only at them; the optional
activations (each head's ``hook_result``, per-head ``hook_q_input``/``k_input``/``v_input``,
``hook_attn_in``, ``hook_mlp_in``) are computed only when a hook or a cache asks for them.
Shapes in comments: b = batch, p = position (query), k = key position, h = head, e = d_head,
d = d_model, m = d_mlp.

>>> from qkov.config import ModelConfig
>>> block = Block(ModelConfig(n_heads=2, d_model=8, d_mlp=16, n_ctx=4))
>>> block(torch.zeros(1, 3, 8), None).shape
torch.Size([1, 3, 8])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .hooks import ActiveHooks, HookPoint


class LayerNorm(nn.Module):
    """TransformerLens's LayerNorm: centre, scale to unit variance (eps 1e-5), then ``w``, ``b``."""

    def __init__(self, d_model: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor, hooks: ActiveHooks | None = None) -> Tensor:
        if hooks is None or not (hooks.wants(self.hook_scale) or hooks.wants(self.hook_normalized)):
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, eps=1e-5)
        centred = x - x.mean(-1, keepdim=True)                                  # [..., d]
        scale = hooks(self.hook_scale, (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt())   # [..., 1]
        normalized = hooks(self.hook_normalized, centred / scale)
        if not (hooks.edited(self.hook_scale) or hooks.edited(self.hook_normalized)):
            # Recorded only: the output is the plain forward's to the bit.
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, eps=1e-5)
        return normalized * self.w + self.b


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
        # Which keys a query may read: earlier ones (causal), or all (bidirectional: no mask).
        causal = torch.tril(torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool)) if cfg.causal else None
        self.register_buffer("causal", causal, persistent=False)
        self.scale = 1 / math.sqrt(e)
        for name in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_attn_scores", "hook_pattern", "hook_result"):
            setattr(self, name, HookPoint())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Older TransformerLens releases store the causal mask itself ([n_ctx, n_ctx]); it is a
        # constant, so whatever shape arrives is replaced by ours.
        if prefix + "mask" in state_dict:
            state_dict[prefix + "mask"] = self.mask
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, xq: Tensor, xk: Tensor, xv: Tensor, hooks: ActiveHooks | None,
                query_pos: Tensor | None = None, prefix: tuple[Tensor, Tensor] | None = None,
                keep: Tensor | None = None) -> Tensor:
        """Inputs ``[b, p, d]`` (one stream for every head) or ``[b, p, h, d]`` (one per head,
        when a hook edits ``hook_q_input``, ``hook_k_input``, ``hook_v_input`` or ``hook_attn_in``).
        ``prefix``: the keys and values ``[b, p0, h, e]`` of the positions before the input's.
        ``keep``: ``[b, k]``, False at padding (every key position, the prefix's included): a
        padded key is never read, and a padded query reads nothing (its pattern row is zero)."""
        if query_pos is not None:
            xq = xq[:, query_pos]                                               # [b, p, (h,) d]
        q = _heads_in(xq, self.W_Q, self.b_Q)                                   # [b, p, h, e]
        k = _heads_in(xk, self.W_K, self.b_K)                                   # [b, k, h, e]
        v = _heads_in(xv, self.W_V, self.b_V)                                   # [b, k, h, e]
        if hooks is not None:
            q, k, v = hooks(self.hook_q, q), hooks(self.hook_k, k), hooks(self.hook_v, v)
        if prefix is not None:
            k, v = _after(prefix[0], k), _after(prefix[1], v)                  # [b, p0 + k, h, e]
        scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * self.scale      # [b, h, p, k]
        n = k.shape[1]
        mask = None
        if self.causal is not None:
            mask = self.causal[:n, :n] if query_pos is None else self.causal[query_pos, :n]
            if prefix is not None:
                mask = mask[n - xk.shape[1]:]                                   # the input's rows only
        if keep is not None:
            keep_q = keep[:, query_pos] if query_pos is not None else keep[:, n - q.shape[1]:]   # [b, p]
            # A padded query's row keeps its keys (a finite softmax, no NaN in the backward) and
            # is zeroed after the softmax.
            reads = (keep[:, None, None, :] | ~keep_q[:, None, :, None])       # [b, 1, p, k]
            mask = reads if mask is None else reads & mask
        if mask is not None:
            scores = scores.masked_fill(~mask, self.IGNORE)
        if hooks is not None:
            scores = hooks(self.hook_attn_scores, scores)
        pattern = scores.softmax(dim=-1)                                        # [b, h, p, k]
        if keep is not None:
            pattern = pattern.masked_fill(~keep_q[:, None, :, None], 0.0)
        if hooks is not None:
            pattern = hooks(self.hook_pattern, pattern)
        z = (pattern @ v.transpose(1, 2)).transpose(1, 2)                       # [b, p, h, e]
        if hooks is not None:
            z = hooks(self.hook_z, z)
            if hooks.wants(self.hook_result):   # each head's write, computed only when asked for
                result = hooks(self.hook_result, torch.einsum("bphe,hed->bphd", z, self.W_O))   # [b, p, h, d]
                if hooks.edited(self.hook_result):   # (recorded only: the plain forward's output, to the bit)
                    return result.sum(2) + self.b_O
        h, e, d = self.W_O.shape
        return z.reshape(*z.shape[:2], h * e) @ self.W_O.reshape(h * e, d) + self.b_O   # [b, p, d]


def _after(prefix: Tensor, x: Tensor) -> Tensor:
    """``prefix [B, p0, h, e]`` then ``x [c*B, n, h, e]`` along positions: row ``i`` of ``x``
    continues prefix row ``i % B`` (one copy; the prefix is not repeated first)."""
    B, c = prefix.shape[0], x.shape[0] // prefix.shape[0]
    both = torch.cat([prefix.expand(c, *prefix.shape), x.view(c, B, *x.shape[1:])], 2)   # [c, B, p0 + n, h, e]
    return both.view(x.shape[0], -1, *x.shape[2:])


def heads_matrix(W: Tensor) -> Tensor:
    """Per-head input weights ``W [h, d, e]`` side by side as one ``[d, h*e]`` matrix, so that
    ``x @ heads_matrix(W)`` projects onto every head in one matmul."""
    h, d, e = W.shape
    return W.permute(1, 0, 2).reshape(d, h * e)


def _heads_in(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``x [b, p, d] @ W [h, d, e] + b [h, e]`` -> ``[b, p, h, e]`` as one matmul over all heads
    (torch's CPU einsum for this took 40x longer at the induction model's sizes); a per-head
    input ``x [b, p, h, d]`` is projected head by head."""
    if x.ndim == 4:
        return torch.einsum("bphd,hde->bphe", x, W) + b
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
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor, hooks: ActiveHooks | None) -> Tensor:
        pre = x @ self.W_in + self.b_in                                         # [b, p, m]
        if hooks is not None:
            pre = hooks(self.hook_pre, pre)
        post = self.act(pre)
        if hooks is not None:
            post = hooks(self.hook_post, post)
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
        self.n_heads = cfg.n_heads
        # TransformerLens's names, in its order; hook_mlp_in/out exist in attention-only blocks too.
        names = ["hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in", "hook_attn_out",
                 "hook_mlp_out", "hook_resid_pre"] + (["hook_resid_mid"] if self._mlp else []) + ["hook_resid_post"]
        for name in names:
            setattr(self, name, HookPoint())

    def forward(self, resid: Tensor, hooks: ActiveHooks | None, query_pos: Tensor | None = None,
                prefix: tuple[Tensor, Tensor] | None = None, keep: Tensor | None = None) -> Tensor:
        if hooks is not None:
            resid = hooks(self.hook_resid_pre, resid)
        xq, xk, xv = self._attn_inputs(resid, hooks)
        attn_out = self.attn(xq, xk, xv, hooks, query_pos, prefix, keep)
        if hooks is not None:
            attn_out = hooks(self.hook_attn_out, attn_out)
        # Only the queried positions go on past attention (all of them when query_pos is None).
        resid = (resid if query_pos is None else resid[:, query_pos]) + attn_out
        if self._mlp:
            mlp_in = resid
            if hooks is not None:
                resid = mlp_in = hooks(self.hook_resid_mid, resid)
                mlp_in = hooks(self.hook_mlp_in, _own(resid, hooks, self.hook_mlp_in))
            mlp_out = self.mlp(self.ln2(mlp_in, hooks) if self._ln else mlp_in, hooks)
            if hooks is not None:
                mlp_out = hooks(self.hook_mlp_out, mlp_out)
            resid = resid + mlp_out
        elif hooks is not None and (hooks.wants(self.hook_mlp_in) or hooks.wants(self.hook_mlp_out)):
            # Attention-only: no MLP reads the stream (hook_mlp_in) and what it writes is zero.
            hooks(self.hook_mlp_in, _own(resid, hooks, self.hook_mlp_in))
            resid = resid + hooks(self.hook_mlp_out, torch.zeros_like(resid))
        if hooks is not None:
            resid = hooks(self.hook_resid_post, resid)
        return resid

    def _attn_inputs(self, resid: Tensor, hooks: ActiveHooks | None) -> tuple[Tensor, Tensor, Tensor]:
        """What the queries, keys and values read: one stream ``[b, p, d]``, or one per head
        ``[b, p, h, d]`` (LayerNorm applied to each) when a hook edits a head's input."""
        points = (self.hook_q_input, self.hook_k_input, self.hook_v_input)
        if hooks is None or not any(hooks.edited(p) for p in (self.hook_attn_in, *points)):
            if hooks is not None:        # recorded only: every head reads the same stream
                for point in (self.hook_attn_in, *points):
                    if hooks.wants(point):
                        hooks(point, resid[:, :, None].expand(*resid.shape[:2], self.n_heads, resid.shape[2]))
            x = self.ln1(resid, hooks) if self._ln else resid
            return x, x, x
        per_head = resid[:, :, None].repeat(1, 1, self.n_heads, 1)             # [b, p, h, d]
        attn_in = hooks(self.hook_attn_in, per_head)
        streams = [hooks(p, _own(attn_in, hooks, p)) for p in points]
        if self._ln:
            streams = [self.ln1(x, hooks) for x in streams]
        return streams[0], streams[1], streams[2]


def _own(x: Tensor, hooks: ActiveHooks, point: HookPoint) -> Tensor:
    """``x``, copied when a hook edits ``point``: an edit in place there must not reach the other
    readers of ``x`` (as TransformerLens clones ``hook_mlp_in``'s input)."""
    return x.clone() if hooks.edited(point) else x
