"""A uniform, read-only view of a transformer's weights, whichever library built it.

:func:`weights` accepts a ``qkov.Transformer``, a TransformerLens 3.x ``HookedTransformer`` or a
TransformerLens ``TransformerBridge`` (4.x; also in 3.9). All three expose the stacked weight
properties ``W_E, W_Q [n_layers, n_heads, d_model, d_head], ...`` and a ``.cfg``; they are read by
duck typing, so this module imports neither ``qkov.model`` nor ``transformer_lens``.

Models with LayerNorm (qkov ``normalization="LN"``; TransformerLens ``normalization_type`` "LN"
or "LNPre") are returned *folded and centred*, exactly as TransformerLens's ``fold_layer_norm``
+ ``center_writing_weights`` + ``center_unembed`` leave them: each LayerNorm's weight is
multiplied into the matrices that read its output and its bias into their biases; reading
weights are centred over ``d_model``; weights writing to the residual stream (``W_E, W_pos,
W_O, b_O, W_out, b_out``) are centred over ``d_model``; ``W_U`` and ``b_U`` are centred over the
vocabulary. The model then computes the same log-probabilities with every LayerNorm reduced to
"centre and divide by the scale", so circuits read off these weights are the model's circuits up
to that per-position scale. Value biases are *not* folded into ``b_O`` (each head keeps its own).

:func:`to_qkov_state` turns a TransformerLens model into a qkov config dict and state dict
(``qkov.from_transformer_lens`` builds the ``qkov.Transformer`` from them).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from ..errors import QkovError


@dataclass(frozen=True)
class Weights:
    """A model's weights with TransformerLens names and shapes (``x @ W`` convention).

    ``W_pos`` is None for models without learned absolute positions (e.g. rotary);
    the MLP tensors are None for attention-only models.
    """

    W_E: Tensor              # [d_vocab, d_model]
    W_pos: Tensor | None     # [n_ctx, d_model]
    W_Q: Tensor              # [n_layers, n_heads, d_model, d_head]
    W_K: Tensor              # [n_layers, n_heads, d_model, d_head]
    W_V: Tensor              # [n_layers, n_heads, d_model, d_head]
    W_O: Tensor              # [n_layers, n_heads, d_head, d_model]
    b_Q: Tensor              # [n_layers, n_heads, d_head]
    b_K: Tensor              # [n_layers, n_heads, d_head]
    b_V: Tensor              # [n_layers, n_heads, d_head]
    b_O: Tensor              # [n_layers, d_model]
    W_in: Tensor | None      # [n_layers, d_model, d_mlp]
    b_in: Tensor | None      # [n_layers, d_mlp]
    W_out: Tensor | None     # [n_layers, d_mlp, d_model]
    b_out: Tensor | None     # [n_layers, d_model]
    W_U: Tensor              # [d_model, d_vocab_out]
    b_U: Tensor              # [d_vocab_out]
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int | None
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    normalization: str | None  # "LN" when the model normalises (its weights here are folded), else None
    act_fn: str | None
    eps: float = 1e-5
    attn_scale: float = 1.0    # the model divides attention scores by this (sqrt(d_head) by default)
    causal: bool = True        # False for bidirectional attention (every query reads every key)
    folded: bool = False       # True when LayerNorm weights were folded in and weights centred

    @property
    def attn_only(self) -> bool:
        """True when the model has no MLPs."""
        return self.W_in is None

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.W_E.dtype

    @property
    def device(self) -> torch.device:
        """Where the weights live: every circuit of them is computed and returned there."""
        return self.W_E.device

    def __repr__(self) -> str:
        dims = ", ".join(
            f"{f}={getattr(self, f)}"
            for f in ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx",
                      "normalization")
        )
        return f"Weights({dims}, folded={self.folded})"

    # ---------------------------------------------------------- argument checks
    def check_layer(self, layer: Any) -> int:
        """``layer`` as an index into ``0..n_layers-1``, or a QkovError."""
        return _check_index("layer", layer, self.n_layers, "n_layers")

    def check_head(self, head: Any) -> int:
        """``head`` as an index into ``0..n_heads-1``, or a QkovError."""
        return _check_index("head", head, self.n_heads, "n_heads")

    def check_pos(self, pos: Any, name: str = "pos") -> int:
        """``pos`` as an index into ``0..n_ctx-1``; a QkovError when out of range or when the
        model has no learned positional embeddings."""
        if self.W_pos is None:
            raise QkovError(
                f"{name}={pos} needs learned positional embeddings (W_pos), but this model has none "
                f"(e.g. rotary positions); call without {name}"
            )
        return _check_index(name, pos, self.n_ctx, "n_ctx")

    def need_mlp(self, what: str) -> None:
        """A QkovError naming ``what`` when the model has no MLP."""
        if self.W_in is None:
            raise QkovError(f"{what} needs an MLP, but this model is attention-only (d_mlp=None)")


def _check_index(name: str, value: Any, n: int, dim: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)                                 # ints, numpy ints, 0-d int tensors
    except TypeError:
        raise QkovError(f"{name}={value!r} must be an integer in 0..{n - 1}") from None
    if not 0 <= value < n:
        raise QkovError(f"{name}={value} is out of range: this model has {dim}={n}, so {name} must be in 0..{n - 1}")
    return value


# ---------------------------------------------------------------------- reading
def _is_qkov(model) -> bool:
    cfg = getattr(model, "cfg", None)
    return cfg is not None and hasattr(cfg, "normalization") and hasattr(cfg, "head_dim")


def _is_tl(model) -> bool:
    cfg = getattr(model, "cfg", None)
    return cfg is not None and hasattr(cfg, "normalization_type") and hasattr(model, "W_E")


def _t(x) -> Tensor | None:
    return None if x is None else x.detach()


def _ln(module) -> tuple[Tensor | None, Tensor | None]:
    """``(w, b)`` of a LayerNorm-like module, or ``(None, None)`` when it has no parameters."""
    if module is None:
        return None, None
    w = getattr(module, "w", None)
    b = getattr(module, "b", None)
    w = w if isinstance(w, Tensor) else None
    b = b if isinstance(b, Tensor) else None
    return _t(w), _t(b)


def _stack_ln(model, name: str, n_layers: int) -> tuple[Tensor | None, Tensor | None]:
    ws, bs = [], []
    for l in range(n_layers):
        w, b = _ln(getattr(model.blocks[l], name, None))
        if w is None:
            return None, None
        ws.append(w)
        bs.append(b if b is not None else torch.zeros_like(w))
    return torch.stack(ws), torch.stack(bs)


def _expand_kv(x: Tensor | None, n_heads: int) -> Tensor | None:
    """Grouped-query K/V weights [L, n_kv, ...] repeated up to [L, n_heads, ...]."""
    if x is None or x.shape[1] == n_heads:
        return x
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


def _read_raw(model) -> dict[str, Any]:
    """Every tensor and dimension, unfolded, plus the LayerNorm parameters (``ln*_w/b``)."""
    if _is_qkov(model):
        raw = _qkov_dims(model.cfg, model)
    elif _is_tl(model):
        raw = _tl_dims(model.cfg, model)
    else:
        raise QkovError(
            f"qkov.circuits reads a qkov.Transformer or a TransformerLens model (HookedTransformer, "
            f"TransformerBridge); got {type(model).__name__}, which has no .cfg and weight properties"
        )
    _read_tensors(model, raw)
    return raw


def _qkov_dims(cfg, model) -> dict[str, Any]:
    """A qkov model's dimensions and settings (and its ``W_pos``)."""
    mlp = cfg.d_mlp is not None
    return dict(
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.head_dim,
        d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, d_vocab_out=cfg.vocab_out, n_ctx=cfg.n_ctx,
        normalization=cfg.normalization, act_fn=cfg.act_fn if mlp else None, eps=1e-5,
        attn_scale=math.sqrt(cfg.head_dim), W_pos=_t(model.W_pos), causal=cfg.causal,
    )


def _tl_dims(cfg, model) -> dict[str, Any]:
    """A TransformerLens model's dimensions and settings (and its ``W_pos``, None for rotary)."""
    norm = cfg.normalization_type
    if norm not in (None, "LN", "LNPre"):
        raise QkovError(
            f"qkov reads models with LayerNorm ('LN', 'LNPre') or no normalization; this "
            f"TransformerLens model has normalization_type={norm!r}"
        )
    mlp = not getattr(cfg, "attn_only", False)
    W_pos = None
    if getattr(cfg, "positional_embedding_type", "standard") == "standard":
        W_pos = getattr(model, "W_pos", None)
        if W_pos is None and hasattr(model, "pos_embed"):
            W_pos = getattr(model.pos_embed, "W_pos", None)
    scale = getattr(cfg, "attn_scale", -1.0)
    scale = float(scale) if scale is not None and scale > 0 else math.sqrt(cfg.d_head)
    return dict(
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
        d_mlp=cfg.d_mlp if mlp else None, d_vocab=cfg.d_vocab,
        d_vocab_out=cfg.d_vocab_out if (getattr(cfg, "d_vocab_out", None) or -1) > 0 else cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        normalization="LN" if norm in ("LN", "LNPre") else None,
        act_fn=getattr(cfg, "act_fn", None) if mlp else None, eps=float(getattr(cfg, "eps", 1e-5)),
        attn_scale=scale if getattr(cfg, "use_attn_scale", True) else 1.0, W_pos=_t(W_pos),
        causal=getattr(cfg, "attention_dir", "causal") != "bidirectional",
    )


def _read_tensors(model, raw: dict[str, Any]) -> None:
    """Add the weights, biases (zeros where the model has none) and LayerNorm parameters to ``raw``."""
    H = raw["n_heads"]
    raw.update(W_E=_t(model.W_E), W_U=_t(model.W_U), W_Q=_t(model.W_Q), W_O=_t(model.W_O))
    raw["W_K"] = _expand_kv(_t(model.W_K), H)
    raw["W_V"] = _expand_kv(_t(model.W_V), H)
    L, d, e = raw["n_layers"], raw["d_model"], raw["d_head"]
    zeros = raw["W_E"].new_zeros
    for name in ("b_Q", "b_K", "b_V"):
        b = _t(getattr(model, name, None))
        # Some bridged models keep head biases flat, [L, n_heads * d_head].
        raw[name] = zeros(L, H, e) if b is None else _expand_kv(b.reshape(L, -1, e), H)
    b_O = _t(getattr(model, "b_O", None))
    raw["b_O"] = zeros(L, d) if b_O is None else b_O
    b_U = _t(getattr(model, "b_U", None))
    raw["b_U"] = zeros(raw["d_vocab_out"]) if b_U is None else b_U
    if raw["d_mlp"] is not None:
        raw["W_in"], raw["W_out"] = _t(model.W_in), _t(model.W_out)
        b_in, b_out = _t(getattr(model, "b_in", None)), _t(getattr(model, "b_out", None))
        raw["b_in"] = zeros(L, raw["d_mlp"]) if b_in is None else b_in
        raw["b_out"] = zeros(L, d) if b_out is None else b_out
    else:
        raw.update(W_in=None, b_in=None, W_out=None, b_out=None)
    if raw["normalization"] == "LN":
        raw["ln1_w"], raw["ln1_b"] = _stack_ln(model, "ln1", L)
        raw["ln2_w"], raw["ln2_b"] = _stack_ln(model, "ln2", L) if raw["d_mlp"] is not None else (None, None)
        if raw["ln2_w"] is None and getattr(model.cfg, "parallel_attn_mlp", False):
            raw["ln2_w"], raw["ln2_b"] = raw["ln1_w"], raw["ln1_b"]   # the MLP reads ln1 too (GPT-J)
        raw["lnf_w"], raw["lnf_b"] = _ln(getattr(model, "ln_final", None))


def _centre(x: Tensor | None, dim: int) -> Tensor | None:
    return None if x is None else x - x.mean(dim, keepdim=True)


def _fold(raw: dict[str, Any], center_unembed: bool) -> dict[str, Any]:
    """TransformerLens's fold_layer_norm + center_writing_weights (+ center_unembed)."""
    r = dict(raw)
    ln1_w, ln1_b = r.get("ln1_w"), r.get("ln1_b")
    for X in "QKV":
        W, b = r[f"W_{X}"], r[f"b_{X}"]
        if ln1_w is not None:
            b = b + torch.einsum("lhde,ld->lhe", W, ln1_b)            # LN bias, through the raw W
            W = W * ln1_w[:, None, :, None]
        r[f"W_{X}"], r[f"b_{X}"] = _centre(W, -2), b                  # centre over d_model
    if r["W_in"] is not None:
        W_in, b_in = r["W_in"], r["b_in"]
        if r.get("ln2_w") is not None:
            b_in = b_in + torch.einsum("ldm,ld->lm", W_in, r["ln2_b"])
            W_in = W_in * r["ln2_w"][:, :, None]
        r["W_in"], r["b_in"] = _centre(W_in, -2), b_in
        r["W_out"], r["b_out"] = _centre(r["W_out"], -1), _centre(r["b_out"], -1)
    W_U, b_U = r["W_U"], r["b_U"]
    if r.get("lnf_w") is not None:
        b_U = b_U + r["lnf_b"] @ W_U
        W_U = W_U * r["lnf_w"][:, None]
    W_U = _centre(W_U, 0)
    if center_unembed:
        W_U, b_U = _centre(W_U, -1), _centre(b_U, -1)
    r["W_U"], r["b_U"] = W_U, b_U
    r["W_E"], r["W_pos"] = _centre(r["W_E"], -1), _centre(r["W_pos"], -1)
    r["W_O"], r["b_O"] = _centre(r["W_O"], -1), _centre(r["b_O"], -1)
    r["folded"] = True
    return r


_FIELDS = frozenset(f.name for f in fields(Weights))


def weights(model, *, center_unembed: bool = True) -> Weights:
    """The weights of ``model`` (qkov or TransformerLens) as a :class:`Weights`.

    LayerNorm models come back folded and centred (see the module docstring): this is what
    every ``qkov.circuits`` function analyses. ``center_unembed=False`` keeps ``W_U`` and ``b_U``
    uncentred over the vocabulary, so that logits computed from them equal the model's own
    (used by :func:`qkov.circuits.logit_attribution`). Passing a :class:`Weights` returns it
    unchanged, so callers can read a model once and pass the result to many functions.
    """
    if isinstance(model, Weights):
        return model
    raw = _read_raw(model)
    if raw["normalization"] == "LN":
        raw = _fold(raw, center_unembed)
    return Weights(**{k: v for k, v in raw.items() if k in _FIELDS})


# ------------------------------------------------------------ TransformerLens -> qkov
def _unsupported(cfg) -> list[str]:
    """What about a TransformerLens config a qkov.Transformer cannot reproduce."""
    bad = []
    g = lambda k, d=None: getattr(cfg, k, d)  # noqa: E731
    if g("normalization_type") not in (None, "LN", "LNPre"):
        bad.append(f"normalization_type={g('normalization_type')!r} (qkov has LayerNorm or none)")
    if g("positional_embedding_type", "standard") != "standard":
        bad.append(f"positional_embedding_type={g('positional_embedding_type')!r} (qkov learns absolute positions)")
    if not g("attn_only", False):
        if g("act_fn") not in ("relu", "gelu"):
            bad.append(f"act_fn={g('act_fn')!r} (qkov has relu and gelu)")
        if g("gated_mlp", False):
            bad.append("gated_mlp=True (qkov's MLP is not gated)")
        if g("num_experts"):
            bad.append(f"num_experts={g('num_experts')} (qkov has no mixture of experts)")
    flags = ("parallel_attn_mlp", "use_local_attn", "use_qk_norm", "final_rms", "post_embedding_ln",
             "use_normalization_before_and_after", "rotary_adjacent_pairs")
    bad += [f"{f}=True" for f in flags if g(f, False)]
    kv = g("n_key_value_heads")
    if kv is not None and kv != cfg.n_heads:
        bad.append(f"n_key_value_heads={kv} (grouped-query attention)")
    for cap in ("attn_scores_soft_cap", "output_logits_soft_cap"):
        if (g(cap, -1.0) or -1.0) > 0:
            bad.append(f"{cap}={g(cap)}")
    if not g("use_attn_scale", True):
        bad.append("use_attn_scale=False (qkov divides scores by sqrt(d_head))")
    elif (g("attn_scale", -1.0) or -1.0) > 0 and not math.isclose(cfg.attn_scale, math.sqrt(cfg.d_head), rel_tol=1e-6):
        bad.append(f"attn_scale={cfg.attn_scale} (qkov uses sqrt(d_head)={math.sqrt(cfg.d_head):g})")
    if g("normalization_type") in ("LN", "LNPre") and not math.isclose(g("eps", 1e-5), 1e-5):
        bad.append(f"eps={g('eps')} (qkov's LayerNorm uses 1e-5)")
    return bad


def to_qkov_state(model) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A TransformerLens model as ``(ModelConfig dict, qkov state dict)`` with the same function.

    Raises a :class:`QkovError` listing what qkov cannot represent (rotary positions, a gated
    MLP, other activation functions, grouped-query attention, ...). Weights are copied unfolded,
    so the qkov model's logits equal the TransformerLens model's. ``LNPre`` becomes a LayerNorm
    with unit weight and zero bias.
    """
    if _is_qkov(model):
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model.cfg.to_dict(), sd
    if not _is_tl(model):
        raise QkovError(
            f"to_qkov_state needs a TransformerLens model (HookedTransformer or TransformerBridge); "
            f"got {type(model).__name__}"
        )
    bad = _unsupported(model.cfg)
    if bad:
        raise QkovError(
            "this TransformerLens model has an architecture qkov.Transformer cannot represent: "
            + "; ".join(bad) + ". Analyse it directly with qkov.circuits instead"
        )
    raw = _read_raw(model)
    L, d = raw["n_layers"], raw["d_model"]
    ln = raw["normalization"] == "LN"
    config = dict(
        n_layers=L, n_heads=raw["n_heads"], d_model=d, d_head=raw["d_head"], d_mlp=raw["d_mlp"],
        d_vocab=raw["d_vocab"], d_vocab_out=None if raw["d_vocab_out"] == raw["d_vocab"] else raw["d_vocab_out"],
        n_ctx=raw["n_ctx"], act_fn=raw["act_fn"] or "relu", normalization="LN" if ln else None,
        use_bias=True, attention_dir="causal" if raw["causal"] else "bidirectional",
    )
    ones, zeros = raw["W_E"].new_ones(d), raw["W_E"].new_zeros(d)

    def ln_params(w, b, i=None):
        if w is None:                                                 # LNPre: identity affine
            return ones.clone(), zeros.clone()
        return (w[i], b[i]) if i is not None else (w, b)

    sd: dict[str, Tensor] = {"embed.W_E": raw["W_E"], "pos_embed.W_pos": raw["W_pos"]}
    for l in range(L):
        p = f"blocks.{l}."
        if ln:
            sd[p + "ln1.w"], sd[p + "ln1.b"] = ln_params(raw["ln1_w"], raw["ln1_b"], l)
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
            sd[p + "attn." + name] = raw[name][l]
        if raw["d_mlp"] is not None:
            if ln:
                sd[p + "ln2.w"], sd[p + "ln2.b"] = ln_params(raw["ln2_w"], raw["ln2_b"], l)
            for name in ("W_in", "b_in", "W_out", "b_out"):
                sd[p + "mlp." + name] = raw[name][l]
    if ln:
        sd["ln_final.w"], sd["ln_final.b"] = ln_params(raw["lnf_w"], raw["lnf_b"])
    sd["unembed.W_U"], sd["unembed.b_U"] = raw["W_U"], raw["b_U"]
    return config, {k: v.detach().clone().contiguous() for k, v in sd.items()}

