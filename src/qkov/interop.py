"""Models to and from TransformerLens: ``from_transformer_lens`` and ``to_transformer_lens``.

qkov's parameter names and shapes are TransformerLens 3.x ``HookedTransformer``'s, so a qkov
model goes to TransformerLens by its state dict: into a ``HookedTransformer`` where TransformerLens
has one (3.x), else into a ``TransformerBridge`` around TransformerLens's own native model
(``TransformerBridge.boot_native``, 4.x; 3.9 has it too), whose parameters are ``nn.Linear``
shaped (:func:`bridge_state` converts). TransformerLens is never imported until asked for.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .circuits.weights import to_qkov_state
from .config import ModelConfig
from .errors import QkovError
from .model import Transformer

__all__ = ["bridge_state", "from_transformer_lens", "tl_config", "to_transformer_lens"]


def from_transformer_lens(model) -> Transformer:
    """A ``qkov.Transformer`` with the weights of a TransformerLens model, giving the same logits.

    Accepts a ``HookedTransformer`` (3.x) or a ``TransformerBridge``. Raises a ``QkovError``
    naming what qkov cannot represent (rotary positions, gated MLPs, other activations, ...).
    The new model has the TransformerLens model's dtype and lives on the CPU.
    """
    config, state = to_qkov_state(model)
    dtype = state["embed.W_E"].dtype
    out = Transformer(ModelConfig.from_dict(config)).to(dtype)
    missing, unexpected = out.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
    buffers = {name for name, _ in out.named_buffers()}
    assert not unexpected and set(missing) <= buffers, (missing, unexpected)
    return out.eval()


def tl_config(cfg: ModelConfig) -> dict[str, Any]:
    """The TransformerLens config of a qkov :class:`ModelConfig`, as keyword arguments that both
    3.x's ``HookedTransformerConfig(**d)`` and 4.x's ``TransformerBridge.boot_native(d)`` take.

    >>> d = tl_config(ModelConfig(n_layers=2, n_heads=4, d_model=64, d_vocab=100, n_ctx=8))
    >>> d["d_head"], d["attn_only"], d["normalization_type"], d["d_vocab_out"]
    (16, True, None, 100)
    """
    return dict(
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.head_dim,
        d_mlp=cfg.d_mlp, d_vocab=cfg.d_vocab, d_vocab_out=cfg.vocab_out, n_ctx=cfg.n_ctx,
        act_fn=cfg.act_fn, attn_only=cfg.attn_only, attention_dir=cfg.attention_dir,
        normalization_type=cfg.normalization,         # None or "LN" (4.x defaults to "LN": always said)
        eps=1e-5, seed=0,                              # qkov's LayerNorm eps; seed: a reproducible init, overwritten
    )


def _heads_to_rows(W: Tensor) -> Tensor:
    """``[h, d, e]`` per-head input weights as one ``nn.Linear`` weight ``[h*e, d]``."""
    h, d, e = W.shape
    return W.permute(0, 2, 1).reshape(h * e, d)


# qkov (TransformerLens 3.x) name suffix -> (bridge suffix, tensor conversion); first match wins.
_BRIDGE_NAMES = [
    (".W_Q", ".q.weight", _heads_to_rows), (".W_K", ".k.weight", _heads_to_rows),
    (".W_V", ".v.weight", _heads_to_rows),
    (".W_O", ".o.weight", lambda W: W.reshape(-1, W.shape[-1]).T),   # [h, e, d] -> [d, h*e]
    (".b_Q", ".q.bias", lambda b: b.reshape(-1)), (".b_K", ".k.bias", lambda b: b.reshape(-1)),
    (".b_V", ".v.bias", lambda b: b.reshape(-1)), (".b_O", ".o.bias", None),
    (".W_in", ".in.weight", lambda W: W.T), (".b_in", ".in.bias", None),
    (".W_out", ".out.weight", lambda W: W.T), (".b_out", ".out.bias", None),
    (".W_U", ".weight", lambda W: W.T), (".b_U", ".bias", None),
    (".W_E", ".weight", None), (".W_pos", ".weight", None),
    (".w", ".weight", None), (".b", ".bias", None),
]


def bridge_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A qkov (TransformerLens 3.x) state dict in the names and ``nn.Linear`` shapes of a
    ``TransformerBridge.boot_native`` model: ``blocks.0.attn.W_Q [h, d, e]`` becomes
    ``blocks.0.attn.q.weight [h*e, d]``, ``unembed.W_U`` becomes ``unembed.weight`` (transposed),
    ``ln1.w`` becomes ``ln1.weight``; the attention buffers (``mask``, ``IGNORE``) are dropped.

    >>> s = bridge_state({"blocks.0.attn.W_O": torch.zeros(2, 3, 5), "blocks.0.attn.mask": torch.ones(1)})
    >>> {k: tuple(v.shape) for k, v in s.items()}
    {'blocks.0.attn.o.weight': (5, 6)}
    """
    out = {}
    for key, t in state.items():
        if key.endswith((".mask", ".IGNORE")):
            continue
        for old, new, convert in _BRIDGE_NAMES:
            if key.endswith(old):
                out[key[: -len(old)] + new] = (convert(t) if convert else t).contiguous()
                break
        else:
            raise QkovError(f"to_transformer_lens does not know where {key!r} goes in a TransformerBridge")
    return out


def _probe(model: Transformer) -> Tensor:
    """A fixed batch of tokens ``[2, n_ctx]`` covering many ids, for comparing two models."""
    n, v = model.cfg.n_ctx, model.cfg.d_vocab
    return (torch.arange(2 * n).reshape(2, n) * 7 + 3) % v


def _check_same_logits(model: Transformer, tl_model, kind: str) -> None:
    tokens = _probe(model)
    with torch.no_grad():
        ours = model(tokens.to(model.embed.W_E.device))                 # [2, n_ctx, v]
        theirs = tl_model(tokens.to(model.embed.W_E.device))
    tol = 1e-4 if ours.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    scale = max(1.0, float(ours.abs().max()))
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=tol, atol=tol * scale):
        diff = (theirs - ours).abs().max() if theirs.shape == ours.shape else f"shape {tuple(theirs.shape)}"
        raise QkovError(
            f"the TransformerLens {kind} built from this model gives different logits ({diff} apart): this "
            f"TransformerLens version computes something qkov does not; please report it with its version"
        )


def _to_hooked(model: Transformer, dtype: torch.dtype, device: torch.device):
    import transformer_lens as tl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # 3.9 marks HookedTransformer deprecated in favour of 4.x
        cfg = tl.HookedTransformerConfig(**tl_config(model.cfg), dtype=dtype, device=str(device))
        out = tl.HookedTransformer(cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out.load_state_dict(state, strict=True)
    return out.eval()


def _to_bridge(model: Transformer, dtype: torch.dtype, device: torch.device):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_native(tl_config(model.cfg), device=device, dtype=dtype)
    state = bridge_state({k: v.detach().clone() for k, v in model.state_dict().items()})
    missing, unexpected = bridge.load_state_dict(state, strict=False)
    # A native model without an unembedding bias can still take a model whose b_U is zero.
    lost = [k for k in unexpected if bool(state[k].any())]
    if missing or lost:
        raise QkovError(
            f"TransformerBridge.boot_native built a model that does not hold this one: missing {missing}, "
            f"no place for the non-zero {lost}; install transformer-lens 3.x for a HookedTransformer instead"
        )
    return bridge.eval()


def to_transformer_lens(model: Transformer, kind: str | None = None):
    """A TransformerLens model with the weights of a ``qkov.Transformer``, giving the same logits.

    ``kind``: ``"hooked"`` (a 3.x ``HookedTransformer``), ``"bridge"`` (a ``TransformerBridge``
    from ``TransformerBridge.boot_native``, TransformerLens 4.x) or None: ``"hooked"`` where the
    installed TransformerLens has ``HookedTransformer``, else ``"bridge"``. The copy has the
    model's dtype and device; its logits are checked against the model's on a fixed batch
    before it is returned. ``qkov.from_transformer_lens`` brings it back.

    >>> import qkov
    >>> model = qkov.Transformer(qkov.ModelConfig(n_layers=1, n_heads=2, d_model=16, d_vocab=10, n_ctx=4))
    >>> tl_model = to_transformer_lens(model)                        # a HookedTransformer with TransformerLens 3.x
    >>> tokens = torch.tensor([[1, 2, 3]])
    >>> torch.allclose(tl_model(tokens), model(tokens), atol=1e-5)
    True
    """
    if not isinstance(model, Transformer):
        raise QkovError(
            f"to_transformer_lens takes a qkov.Transformer; got {type(model).__name__} "
            f"(a TransformerLens model is already one)"
        )
    try:
        import transformer_lens
    except ImportError:
        raise QkovError("to_transformer_lens needs TransformerLens: pip install transformer-lens") from None
    if kind is None:
        kind = "hooked" if hasattr(transformer_lens, "HookedTransformer") else "bridge"
    if kind not in ("hooked", "bridge"):
        raise QkovError(f"kind={kind!r} must be 'hooked' (HookedTransformer), 'bridge' (TransformerBridge) or None")
    W_E = model.embed.W_E
    build = _to_hooked if kind == "hooked" else _to_bridge
    out = build(model, W_E.dtype, W_E.device)
    _check_same_logits(model, out, "HookedTransformer" if kind == "hooked" else "TransformerBridge")
    return out
