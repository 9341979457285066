"""The corrupted run that activation and edge patching share, and the ways it is continued.

A patched variant differs from the corrupted run only from its patched layer and position on: a
causal model's earlier positions never see the change. :class:`Corrupted` keeps what each
continuation reads: the logits, and each layer's residual stream, queries, keys, values, scores,
pattern, heads' outputs and the residual stream after its attention.

- :meth:`Corrupted.metrics`: ``c`` copies continued through the model's own forward from a layer
  and a position ``p0`` on, every position from ``p0`` recomputed (edge patching, grids over
  every position);
- :func:`block_rows`: a layer's output at chosen rows when, in variant ``j``, one row ``p_j`` is
  changed (its residual stream, or one of its activations). Every other row keeps the corrupted
  queries and residual stream, and every key and value but ``p_j``'s is the corrupted one, so the
  variants share one key matrix: each row's scores are one matmul against it, with the changed
  key's column replaced. Variants with different rows run side by side.

Activation patching (:mod:`qkov.patching`) patches one row of a layer at a time: a head's
output, query or pattern, ``attn_out``, ``resid_mid`` or ``mlp_out`` at ``p_j`` change only that
row's output, so the layer is computed at ``p_j`` alone; the next layer sees one changed row, whose
key changes the later rows' attention; from the layer after, every row from ``p_j`` on runs the
model's forward.

>>> import qkov
>>> model = qkov.Transformer(qkov.ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=10, n_ctx=5))
>>> run, _ = Corrupted.run(model, torch.tensor([[1, 2, 3, 1, 2]]))
>>> rows = block_rows(model, run, 1, torch.tensor([2]), start=0)       # rows 0.., nothing changed
>>> torch.allclose(rows[0], model(torch.tensor([[1, 2, 3, 1, 2]]), stop_at_layer=2), atol=1e-6)
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .blocks import heads_matrix
from .errors import QkovError

Metric = Callable[[Tensor], Tensor]


def check_metric_value(value) -> float:
    """A metric's value as a float; a ``QkovError`` unless it is a scalar."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise QkovError(f"patching_metric returned a tensor of shape {tuple(value.shape)}; it must return a "
                            f"scalar, e.g. a mean over the batch")
        return float(value.detach())
    if isinstance(value, (int, float)):
        return float(value)
    raise QkovError(f"patching_metric returned {type(value).__name__}; it must return a scalar tensor or number")


@dataclass
class Corrupted:
    """The corrupted run, shared by every patched variant: its logits ``[B, P, V]`` and, for
    each layer, the residual stream before it and its queries, keys and values ``[B, P, h, e]``."""

    logits: Tensor
    resid: list[Tensor]
    q: list[Tensor]
    k: list[Tensor]
    v: list[Tensor]
    attn_scores: list[Tensor]           # [B, h, P, P], scaled and masked
    pattern: list[Tensor]               # [B, h, P, P]
    z: list[Tensor]                     # [B, P, h, e]
    after: list[Tensor]                 # [B, P, d]: the residual stream after the attention
    buffer: Tensor | None = None        # the logits each variant's metric reads (see scores)
    # [B, P], True at real tokens, for a model with cfg.pad_token (None otherwise)
    attention_mask: Tensor | None = None
    _made: dict = field(default_factory=dict)         # what heads(), attention() and qkv() made once

    def heads(self, layer: int) -> tuple[Tensor, Tensor]:
        """The layer's keys and values head-major, ``[B, h, P, e]`` (contiguous, for matmuls)."""
        if layer not in self._made:
            self._made[layer] = tuple(T[layer].transpose(1, 2).contiguous() for T in (self.k, self.v))
        return self._made[layer]

    def attention(self, model, layer: int, start: int) -> tuple[Tensor, ...]:
        """At the layer's rows ``start..`` (``n`` of them): each row's log-sum-exp of its scores
        and of its scores but the dominant key's (the key a row gives more than half its attention,
        if one does; ``[B, h, n]`` each), and ``[B, n, 2h + 1,
        d]``: each head's output through ``W_O``, each head's output attending to every key but the
        dominant one through ``W_O`` (zero where that is the only key), and the residual stream
        after the attention. Made when first asked for."""
        s0, made = self._made.get(("attention", layer), (None, None))
        if s0 is None or s0 > start:            # (chunks come in ascending starts: made once a layer)
            attn, S = model.blocks[layer].attn, self.attn_scores[layer][:, :, start:]
            A, Vh = self.pattern[layer][:, :, start:], self.heads(layer)[1]
            S_m = S.masked_fill(A > 0.5, float(attn.IGNORE))                    # every score but the dominant key's
            Z = torch.cat([self.z[layer][:, start:].transpose(1, 2), (S_m.softmax(-1) @ Vh).nan_to_num_(0.0)], 1)
            ZO = torch.einsum("bhpe,hed->bphd", Z, torch.cat([attn.W_O, attn.W_O]))   # Z [B, 2h, n, e] -> [B, n, 2h, d]
            s0 = start
            made = (S.logsumexp(-1), S_m.logsumexp(-1), torch.cat([ZO, self.after[layer][:, start:, None]], 2))
            self._made[("attention", layer)] = s0, made
        k = start - s0
        lse, lse_m, basis = made
        return lse[:, :, k:], lse_m[:, :, k:], basis[:, k:]

    def qkv(self, model, layer: int, x: Tensor) -> Tensor:
        """The layer's queries (times the attention's scale), keys and values of ``x [..., d]`` in
        one matmul: ``[..., 3 h e]``, ``q``, ``k``, ``v`` side by side, each head-major (the weights
        side by side made once: they do not change while the run is continued)."""
        if ("qkv", layer) not in self._made:
            attn = model.blocks[layer].attn
            W = torch.cat([heads_matrix(attn.W_Q) * attn.scale, heads_matrix(attn.W_K), heads_matrix(attn.W_V)], 1)
            b = torch.cat([attn.b_Q.flatten() * attn.scale, attn.b_K.flatten(), attn.b_V.flatten()])
            self._made[("qkv", layer)] = W, b
        return _affine(x, *self._made[("qkv", layer)])

    @classmethod
    def run(cls, model, tokens: Tensor, names: Sequence[str] = ()) -> tuple[Corrupted, dict[str, Tensor]]:
        L = range(model.cfg.n_layers)
        after = "hook_resid_mid" if model.cfg.d_mlp is not None else "hook_resid_post"
        own = ("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores",
               "attn.hook_pattern", "attn.hook_z", after)
        want = [f"blocks.{l}.{n}" for l in L for n in own]
        logits, cache = model.run_with_cache(tokens, names_filter=sorted(set(want) | set(names)))
        mask = model.padding_mask(tokens)
        return cls(logits, *([cache[f"blocks.{l}.{n}"] for l in L] for n in own), attention_mask=mask), cache

    @staticmethod
    def rows_continue(model) -> bool:
        """Whether a change at one position leaves the earlier ones as they were (a causal model
        without padding): what every continuation from a position ``p0 > 0`` and
        :func:`block_rows` rely on. Otherwise variants run every position."""
        return model.cfg.causal_unpadded

    def prefix(self, layer: int, p0: int) -> list | None:
        """``prefix_kv`` for a continuation from ``layer`` and position ``p0``: the corrupted
        keys and values of the earlier positions."""
        if not p0:
            return None
        return [None] * layer + [(k[:, :p0], v[:, :p0]) for k, v in zip(self.k[layer:], self.v[layer:])]

    def metrics(self, model, layer: int, p0: int, c: int, fwd_hooks, metric: Metric) -> list[float]:
        """``metric`` of each of ``c`` copies of the run continued from ``layer`` with
        ``fwd_hooks`` (on ``[c * B, ...]``, copy ``j`` in rows ``j*B..``), which may change
        positions ``p0..`` only: earlier positions keep the corrupted run's keys, values and
        logits (the model is causal) and are not run again."""
        if p0 and not self.rows_continue(model):
            raise QkovError("a continuation from a later position needs a causal model without padding")
        inputs = self.resid[layer][:, p0:].repeat(c, 1, 1)                         # [c*B, P - p0, d]
        mask = None if self.attention_mask is None else self.attention_mask.repeat(c, 1)
        tail = model.run_with_hooks(inputs, fwd_hooks=fwd_hooks, start_at_layer=layer, prefix_kv=self.prefix(layer, p0),
                                    attention_mask=mask)
        tail = tail.view(c, self.logits.shape[0], *tail.shape[1:])               # [c, B, P - p0, V]
        return self.scores(lambda j: tail[j], c, p0, metric)

    def scores(self, logits_of: Callable[[int], Tensor], c: int, rows: int | Tensor, metric: Metric,
               starts: Sequence[int] | None = None) -> list[float]:
        """``metric`` of each variant ``j < c`` whose logits are the corrupted run's but at
        positions ``rows..`` (an int) or at position ``rows[j]`` alone (a tensor ``[c]``), where
        they are ``logits_of(j) [B, n, V]``. With ``starts`` (ascending, at least ``rows``),
        variant ``j``'s logits differ from position ``starts[j]`` on only, and ``logits_of(j)``
        gives those."""
        # One [B, P, V] buffer holds each variant's logits in turn: only its own rows are
        # written, and its metric is read (as a float) before the next variant's. With starts,
        # the variants go from the last start down: each writes over every row its successor wrote.
        if self.buffer is None:
            self.buffer = self.logits.clone()
        buffer, out = self.buffer, [0.0] * c
        for j in (range(c - 1, -1, -1) if starts is not None else range(c)):
            if isinstance(rows, int):
                buffer[:, rows if starts is None else starts[j]:] = logits_of(j)
                out[j] = check_metric_value(metric(buffer))
            else:
                p = int(rows[j])
                buffer[:, p] = logits_of(j)[:, 0]
                out[j] = check_metric_value(metric(buffer))
                buffer[:, p] = self.logits[:, p]
        if isinstance(rows, int):
            buffer[:, rows:] = self.logits[:, rows:]
        return out


@dataclass
class RowEdit:
    """In variant ``j``, the activation ``name`` (``"q"``, ``"k"``, ``"v"``, ``"pattern"``,
    ``"z"``, ``"attn_out"``, ``"resid_mid"``, ``"mlp_out"``) at its changed row takes ``value[j]``
    (``[B, *row]``, ``row`` one position's shape: ``[h, e]``, ``[h, P]`` or ``[d]``) where
    ``mask[j] [*row]`` is True."""

    name: str
    mask: Tensor
    value: Tensor

    def __call__(self, name: str, x: Tensor, at: Tensor | None) -> Tensor:
        """``x [c, B, n, *row]`` with the edit applied at rows ``at [c, n]`` (``x [c, B, *row]``
        and ``at=None`` for the changed row's own key or value)."""
        if name != self.name:
            return x
        if at is None:
            return torch.where(self.mask[:, None], self.value.to(x.dtype), x)
        tail = (None,) * self.mask[0].ndim
        where = at[(slice(None), None, slice(None), *tail)] & self.mask[:, None, None]
        return torch.where(where, self.value.to(x.dtype)[:, :, None], x)


def block_rows(model, run: Corrupted, layer: int, changed: Tensor, start: int | None = None,
               x_new: Tensor | None = None, edit: RowEdit | None = None) -> Tensor:
    """The residual stream after ``layer`` in each variant ``j``, where row ``changed[j]`` has
    the residual stream ``x_new[j] [B, d]`` before the layer (when given) and the activation
    ``edit`` names patched: at that row alone (``[c, B, 1, d]``) or, with ``start``, at rows
    ``start..P-1`` (``[c, B, P - start, d]``; rows before ``changed[j]`` come out as the corrupted
    run's)."""
    if start is not None and x_new is not None and edit is None:
        return _resid_rows(model, run, layer, changed, start, x_new)
    cfg, block = model.cfg, model.blocks[layer]
    attn = block.attn
    X, Q, K, V = run.resid[layer], run.q[layer], run.k[layer], run.v[layer]      # [B, P, d], [B, P, h, e]
    (B, P, h, e), c = K.shape, len(changed)
    if start is None:                                                           # row changed[j] alone
        idx = changed[:, None]                                                  # [c, 1]
        x = X.index_select(1, changed).transpose(0, 1)[:, :, None]              # [c, B, 1, d]
        q = Q.index_select(1, changed).permute(0, 2, 1, 3)[:, :, :, None]       # [B, h, c, 1, e]
    else:                                                                       # rows start.., shared
        idx = torch.arange(start, P, device=changed.device).expand(c, -1)       # [c, n]
        x = X[None, :, start:].expand(c, -1, -1, -1)                            # [c, B, n, d]
        q = Q[:, start:].permute(0, 2, 1, 3)[:, :, None].expand(-1, -1, c, -1, -1)   # [B, h, c, n, e]
    n = idx.shape[1]
    at = idx == changed[:, None]                                                # [c, n]: the changed row
    # The changed row's query, key and value [c, B, h, e] (its query None while it is the corrupted one)
    q_row, (k_new, v_new) = None, (T.index_select(1, changed).transpose(0, 1) for T in (K, V))
    if x_new is not None:
        x_new = x_new.to(X.dtype)
        x = torch.where(at[:, None, :, None], x_new[:, :, None], x)
        ln = block.ln1(x_new) if cfg.normalization == "LN" else x_new          # [c, B, d]
        q_row, k_new, v_new = (_affine(ln, heads_matrix(W), b.flatten()).view(c, B, h, e)
                               for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V)))
    if edit is not None:
        if edit.name == "q":
            q_row = edit("q", Q.index_select(1, changed).transpose(0, 1)[:, :, None], at.new_ones(c, 1))[:, :, 0]
        k_new, v_new = edit("k", k_new, None), edit("v", v_new, None)
    key_changed = x_new is not None or (edit is not None and edit.name == "k")
    value_changed = x_new is not None or (edit is not None and edit.name == "v")
    Kh, Vh = run.heads(layer)                                                   # [B, h, P, e]
    if q_row is not None:
        q_row = q_row.permute(1, 2, 0, 3)                                       # [B, h, c, e]
    later = torch.arange(P, device=idx.device) > idx[..., None]                 # [c, n, P]: the causal mask
    if start is None:   # each variant's own row: one matmul per (example, head) against the corrupted keys
        q = q.reshape(B, h, c, e) if q_row is None else q_row                   # [B, h, c, e]
        scores = ((q @ Kh.transpose(-1, -2)).view(B, h, c, 1, P) * attn.scale).masked_fill_(later, attn.IGNORE)
    else:               # rows start..: the corrupted run's scores (masked already) but in the changed row
        scores = run.attn_scores[layer][:, :, None, start:].expand(-1, -1, c, -1, -1)   # [B, h, c, n, P]
        if q_row is not None:
            row = ((q_row @ Kh.transpose(-1, -2)) * attn.scale).masked_fill_(later[at].view(c, P), attn.IGNORE)
            scores = torch.where(at[None, None, :, :, None], row[:, :, :, None], scores)
    col = changed.view(1, 1, c, 1, 1).expand(B, h, c, n, 1)
    if key_changed:     # the changed key's column (masked in the rows before it)
        k_cols = k_new.permute(1, 2, 3, 0)                                      # [B, h, e, c]
        if start is None:
            own = (q * k_cols.transpose(-1, -2)).sum(-1)[..., None]             # [B, h, c, 1]
        else:           # the corrupted queries against each variant's key; the changed row's own query
            own = (q[:, :, 0] @ k_cols).transpose(-1, -2)                       # [B, h, c, n]
            if q_row is not None:
                mine = (q_row * k_cols.transpose(-1, -2)).sum(-1)               # [B, h, c]
                own = torch.where(at[None, None], mine[..., None], own)
        own = (own * attn.scale).masked_fill_(idx < changed[:, None], attn.IGNORE)
        fresh = start is None or q_row is not None                             # else a view of the cached scores
        scores = (scores if fresh else scores.clone()).scatter_(-1, col, own[..., None])
    pattern = scores.softmax(-1)                                                # [B, h, c, n, P]
    if edit is not None and edit.name == "pattern":
        pattern = edit("pattern", pattern.permute(2, 0, 3, 1, 4), at).permute(1, 3, 0, 2, 4)
    z = (pattern.reshape(B, h, c * n, P) @ Vh).view(B, h, c, n, e)
    if value_changed:   # the changed row's value: sum over the corrupted values, then the difference
        dv = (v_new - V.index_select(1, changed).transpose(0, 1)).permute(1, 2, 0, 3)[:, :, :, None]   # [B, h, c, 1, e]
        z = z + pattern.gather(-1, col) * dv
    z = z.permute(2, 0, 3, 1, 4)                                                # [c, B, n, h, e]
    if edit is not None:
        z = edit("z", z, at)
    attn_out = _affine(z.reshape(c, B, n, h * e), attn.W_O.reshape(h * e, -1), attn.b_O)   # [c, B, n, d]
    if edit is not None:
        attn_out = edit("attn_out", attn_out, at)
    resid = x + attn_out
    if cfg.d_mlp is not None:
        if edit is not None:
            resid = edit("resid_mid", resid, at)
        mlp_out = block.mlp(block.ln2(resid) if cfg.normalization == "LN" else resid, None)
        if edit is not None:
            mlp_out = edit("mlp_out", mlp_out, at)
        resid = resid + mlp_out
    return resid


def _resid_rows(model, run: Corrupted, layer: int, changed: Tensor, start: int, x_new: Tensor) -> Tensor:
    """:func:`block_rows` at rows ``start..`` when variant ``j``'s residual stream at row ``p = changed[j]``
    is ``x_new[j]``: its query, key and value change. Row ``p`` is computed afresh. A later row ``r``
    keeps its query and attends as in the corrupted run but to one changed key and value, so each
    head's output there is the corrupted ``z`` changed in that one term, written from what the
    corrupted run has. With ``a`` the corrupted attention of ``r`` to ``p`` and ``a w`` the new one
    (``w`` the ratio of the new exponentiated score to the old), ``z' - z = α v'_p - β v_p - (α -
    β) z`` (``α = a w / d``, ``β = a / d``, ``d = 1 - a + a w``): to the last digit where ``a <=
    1/2`` (then ``d >= 1/2``). Where ``a > 1/2`` (``p`` is ``r``'s dominant key, ``1 - a`` would
    lose digits and ``d`` may be tiny), ``z' = σ v'_p + (1 - σ) z_m`` instead, ``z_m`` being ``r``'s
    output attending to every key but ``p`` and ``σ`` the sigmoid of the new score less the
    log-sum-exp of the others' (:meth:`Corrupted.attention`). No row is computed again. The residual
    stream after the attention is the corrupted one plus the change through ``W_O``: two small
    matmuls write the whole chunk."""
    cfg, block = model.cfg, model.blocks[layer]
    attn = block.attn
    X = run.resid[layer]                                                        # [B, P, d]
    (B, P, d), h, c = X.shape, cfg.n_heads, len(changed)
    n, dev = P - start, changed.device
    valid = torch.arange(start, P, device=dev) > changed[:, None]               # [c, n]: rows that see row p
    x_new = x_new.to(X.dtype)
    ln = block.ln1(x_new) if cfg.normalization == "LN" else x_new               # [c, B, d]
    q_row, k_new, v_new = run.qkv(model, layer, ln).view(c, B, 3, h, -1).permute(2, 1, 3, 0, 4).contiguous()   # B h c e
    Kh, Vh = run.heads(layer)                                                   # [B, h, P, e]
    lse, lse_m, basis = run.attention(model, layer, start)                     # rows start.. only
    # Later rows: the corrupted queries against each variant's new key at its row p
    q = run.q[layer][:, start:].transpose(1, 2)                                 # [B, h, n, e]
    s_new = (q @ k_new.transpose(-1, -2)).transpose(-1, -2).mul_(attn.scale)   # [B, h, c, n]
    a = run.pattern[layer][:, :, start:].index_select(-1, changed).transpose(-1, -2)   # [B, h, c, n]
    aw = (s_new - lse[:, :, None]).clamp_(max=80.0).exp_()                     # (past e^80: α 1, β 0 to the digit)
    den = (1 - a).add_(aw)
    top = a > 0.5                                                               # [B, h, c, n]: p is r's dominant key
    alpha, beta = aw.div_(den), a.div_(den)
    lead = s_new.sub_(lse_m[:, :, None])
    valid = valid.to(X.dtype)
    first = torch.cat([torch.where(top, lead.sigmoid(), alpha),                # on v'_p
                       torch.where(top, 0.0, -beta)], 1)                        # on v_p
    second = torch.cat([torch.where(top, -1.0, beta - alpha),                   # on z
                        torch.where(top, lead.neg_().sigmoid_(), 0.0),          # on z_m
                        valid.new_ones(B, 1, c, n)], 1)                         # on the stream
    at = (torch.arange(c, device=dev), changed - start)                         # the changed row of each variant
    first.mul_(valid)
    second[:, :2 * h].mul_(valid)                                               # (the changed row is written below)
    W_O = attn.W_O                                                              # [h, e, d]
    v_old = Vh.index_select(2, changed)                                         # [B, h, c, e]
    vo = torch.einsum("bhce,hed->cbhd", torch.cat([v_new, v_old], 1), torch.cat([W_O, W_O]))   # [c, B, 2h, d]: new, old
    out = (second.permute(0, 3, 2, 1) @ basis).permute(2, 0, 1, 3).contiguous()   # [c, B, n, d]: the stream, z's part
    out.view(c * B, n, d).baddbmm_(first.permute(2, 0, 3, 1).reshape(c * B, n, 2 * h), vo.view(c * B, 2 * h, d))
    dv = v_new - v_old
    # The changed row: its own query against the corrupted keys and its own key
    s_row = q_row @ Kh.transpose(-1, -2)                                        # [B, h, c, P] (q_row scaled)
    mine = (q_row * k_new).sum(-1)                                              # [B, h, c]
    col = changed.view(1, 1, c, 1).expand(B, h, c, 1)
    later = torch.arange(P, device=dev) > changed[:, None]                      # [c, P]
    s_row = s_row.scatter_(-1, col, mine[..., None]).masked_fill_(later, attn.IGNORE)
    p_row = s_row.softmax(-1)
    z_row = p_row @ Vh + p_row.gather(-1, col) * dv                             # [B, h, c, e]
    out[at[0], :, at[1]] = x_new + _affine(z_row.permute(2, 0, 1, 3).reshape(c, B, -1), W_O.reshape(-1, d), attn.b_O)
    if cfg.d_mlp is not None:
        out += block.mlp(block.ln2(out) if cfg.normalization == "LN" else out, None)
    return out


def tail_rows(model, run: Corrupted, layer: int, start: int, x: Tensor) -> Tensor:
    """The residual stream after ``layer`` at rows ``start..P-1`` of each variant, ``[c, B, n,
    d]``, from the residual stream before it at those rows, ``x [c, B, n, d]``, every row changed;
    the earlier rows' keys and values are the corrupted run's, shared by every variant (one
    matmul per (example, head) scores all variants' queries against them)."""
    cfg, block = model.cfg, model.blocks[layer]
    attn = block.attn
    Kh, Vh = (T[:, :, :start] for T in run.heads(layer))                      # [B, h, start, e]
    (c, B, n, _), (h, e) = x.shape, Kh.shape[1::2]
    ln = block.ln1(x) if cfg.normalization == "LN" else x
    # Head-major in one copy, which every matmul below reads as it is
    q, k, v = run.qkv(model, layer, ln).view(c, B, n, 3, h, e).permute(3, 1, 4, 0, 2, 5).contiguous()   # [B,h,c,n,e]
    earlier = (q.reshape(B, h, c * n, e) @ Kh.transpose(-1, -2)).view(B, h, c, n, start)
    own = q @ k.transpose(-1, -2)                                               # [B, h, c, n, n]
    later = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)         # the causal mask
    scores = torch.cat([earlier, own.masked_fill_(later, attn.IGNORE)], -1)
    pattern = scores.softmax(-1)                                                # [B, h, c, n, start + n]
    z = (pattern[..., :start].reshape(B, h, c * n, start) @ Vh).view(B * h * c, n, e)
    z = z.baddbmm_(pattern[..., start:].reshape(B * h * c, n, n), v.reshape(B * h * c, n, e))   # + the own rows' values
    z = z.view(B, h, c, n, e).permute(2, 0, 3, 1, 4)                            # [c, B, n, h, e]
    resid = _affine(z.reshape(c, B, n, h * e), attn.W_O.reshape(h * e, -1), attn.b_O).add_(x)
    if cfg.d_mlp is not None:
        resid += block.mlp(block.ln2(resid) if cfg.normalization == "LN" else resid, None)
    return resid


def unembed(model, resid: Tensor) -> Tensor:
    """Logits ``[..., V]`` from the residual stream after the last layer ``[..., d]``, as the
    model's forward ends."""
    if model.cfg.normalization == "LN":
        resid = model.ln_final(resid)
    return _affine(resid, model.unembed.W_U, model.unembed.b_U)


def _affine(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``x @ W + b`` in one pass over the output (``addmm``): the bias is not added as a second
    pass over a large result."""
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), W).view(*x.shape[:-1], W.shape[-1])
