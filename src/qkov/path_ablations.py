"""Interventions along one path of the model, the kind a circuit story names.

- :func:`ablate_path`: one head's output removed (zero, mean or resample) from the query, key
  or value input of later heads only; every other reader of that head still sees it (e.g. the
  previous-token head taken out of an induction head's keys: MFTC's K-composition, cut).
- :func:`copying_ov`: a head's direct contribution to the logits replaced by pure copying,
  each attended token adding its own diagonal entry of the head's full OV circuit to its own
  logit (if accuracy holds, the OV circuit is a copier and nothing more is needed).
- :func:`neuron_inputs_on_frequencies`: the token part of what a head feeds each MLP neuron
  (``W_E W_V W_O W_in``, the map :mod:`qkov.fourier` reads frequencies from) projected onto a
  straight line plus the named frequencies of the token value, or those frequencies removed.

Each returns an :class:`~qkov.interventions.Intervention`; run it with ``qkov.interventions.run``
or ``evaluate``.

>>> import qkov
>>> task = qkov.get_task("add", max_sum=20)
>>> model = qkov.Transformer(task.model_config())
>>> neuron_inputs_on_frequencies(model, [1, 2], n_tokens=task.d_vocab).text
'neuron inputs from the attended token projected onto a line and frequencies [1, 2]'
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import circuits
from .errors import QkovError
from .interventions import Hooks, Intervention, check_how, reference_activations, replacement


def ablate_path(model, sender: tuple[int, int], receivers: Sequence[tuple[int, int]], inputs: str = "k",
                how: str = "mean", reference: Tensor | None = None, seed: int = 0) -> Intervention:
    """Head ``sender``'s output (``hook_result``) ablated in the ``inputs`` (``q``/``k``/``v``)
    of the ``receivers`` heads only: their ``hook_{inputs}_input`` gets ``x - out + ablated``."""
    check_how(how)
    if inputs not in ("q", "k", "v"):
        raise QkovError(f"inputs={inputs!r}: a path ends at a head's 'q', 'k' or 'v' input")
    ls, hs = (int(i) for i in sender)
    by_layer: dict[int, list[int]] = {}
    for l, h in receivers:
        if not ls < int(l) < model.cfg.n_layers or not 0 <= int(h) < model.cfg.n_heads:
            raise QkovError(f"receiver head {l}.{h} must exist and sit in a layer after the sender's ({ls})")
        by_layer.setdefault(int(l), []).append(int(h))
    name = f"blocks.{ls}.attn.hook_result"
    ref = None if how == "zero" else reference_activations(model, reference, [name])[name][:, :, hs]   # [n, p, d]

    def make(tokens: Tensor) -> Hooks:
        seen: dict[str, Tensor] = {}

        def keep(x: Tensor, hook) -> None:
            seen["out"] = x[:, :, hs]                                          # [b, p, d]

        def receive(heads: list[int]):
            def hook(x: Tensor, hook) -> Tensor:                               # [b, p, h, d]
                out = seen["out"]
                x = x.clone()
                x[:, :, heads] += (replacement(how, out, ref, seed) - out)[:, :, None]
                return x
            return hook
        return [(name, keep)] + [(f"blocks.{l}.hook_{inputs}_input", receive(h)) for l, h in by_layer.items()]
    who = ", ".join(f"{l}.{h}" for l, hh in by_layer.items() for h in hh)
    return Intervention(f"head {ls}.{hs} {how}-ablated in the {inputs} input of head{'s' * (',' in who)} {who} only",
                        make)


def _head_logits(model, result: Tensor, scale: Tensor | None) -> Tensor:
    """What a head's output ``result [b, p, d]`` adds to the logits along the direct path (for
    LayerNorm models, through this forward's final scale)."""
    if scale is not None:
        result = (result - result.mean(-1, keepdim=True)) / scale * model.ln_final.w
    return result @ model.unembed.W_U                                           # [b, p, v]


def _keeper(seen: dict[str, Tensor], key: str):
    """A hook that only keeps the activation, as ``seen[key]``."""
    return lambda x, hook: seen.__setitem__(key, x)


def copying_ov(model, layer: int, head: int) -> Intervention:
    """Head ``layer.head``'s direct contribution to the logits replaced by copying: the token it
    attends to with weight ``a`` adds ``a * OV[t, t]`` (the diagonal of its full OV circuit) to
    logit ``t`` and nothing to the others. For a head in an earlier layer only its direct path
    is replaced; what later layers read from it is unchanged."""
    fov = circuits.full_ov(model, layer, head)                                 # [d_vocab, d_vocab_out]
    n = min(fov.shape[-2], fov.shape[-1])
    diag = (fov.A[:n] * fov.B[:, :n].T).sum(-1)                                # [n]
    ln = model.cfg.normalization == "LN"
    names = {"pattern": f"blocks.{layer}.attn.hook_pattern", "result": f"blocks.{layer}.attn.hook_result"}
    if ln:
        names["scale"] = "ln_final.hook_scale"

    def make(tokens: Tensor) -> Hooks:
        seen: dict[str, Tensor] = {}
        keep = {key: _keeper(seen, key) for key in names}

        def logits_hook(logits: Tensor, hook) -> Tensor:                       # [b, q, v]
            pattern = seen["pattern"][:, head]                                 # [b, q, k]
            own = tokens < n                                                   # [b, k]: tokens with a diagonal entry
            d = diag.to(logits.dtype)[tokens.clamp(max=n - 1)] * own           # [b, k]
            copy = torch.zeros_like(logits).scatter_add_(
                2, tokens.clamp(max=n - 1)[:, None, :].expand_as(pattern), pattern * d[:, None, :])
            return logits - _head_logits(model, seen["result"][:, :, head], seen.get("scale")) + copy
        return [(names[k], keep[k]) for k in names] + [("unembed.hook_out", logits_hook)]
    return Intervention(f"head {layer}.{head}'s logits replaced by copying (the diagonal of its full OV circuit)",
                        make)


def frequency_basis(n: int, freqs: Sequence[int], dtype=torch.float64) -> Tensor:
    """``[n, 2 + 2·len(freqs)]`` orthonormal columns over token values ``t = 0..n-1``: the
    constant, the straight line in ``t``, then cos and sin of ``2πkt/n`` for each ``k``
    (Gram-Schmidt in that order, so the columns after the first two are the frequencies' part
    that a line does not explain)."""
    bad = [k for k in freqs if not 1 <= int(k) <= n // 2]
    if bad:
        raise QkovError(f"frequencies {bad} are out of range for {n} token values; expected 1..{n // 2}")
    t = torch.arange(n, dtype=torch.float64)
    cols = [torch.ones(n, dtype=torch.float64), t]
    for k in freqs:
        cols += [torch.cos(2 * math.pi * int(k) * t / n), torch.sin(2 * math.pi * int(k) * t / n)]
    q, _ = torch.linalg.qr(torch.stack(cols, 1))
    return q.to(dtype)


def neuron_inputs_on_frequencies(model, freqs: Sequence[int], n_tokens: int, remove: bool = False,
                                 layer: int = 0) -> Intervention:
    """Layer 0's neuron inputs from the attended token (each head's ``W_E W_V W_O W_in``, over
    token values ``0..n_tokens-1``) projected onto a line plus ``freqs`` (``remove=False``), or
    with ``freqs``' part beyond the line taken out (``remove=True``); positions, biases and the
    skip path are left as they are."""
    cfg = model.cfg
    if cfg.d_mlp is None or layer != 0 or cfg.normalization is not None:
        raise QkovError("neuron inputs are projected in layer 0 of an MLP model without LayerNorm, where the "
                        "head reads the token embedding directly")
    if not 3 <= n_tokens <= cfg.d_vocab:
        raise QkovError(f"n_tokens={n_tokens} must be in 3..{cfg.d_vocab} (the model's d_vocab)")
    Q = frequency_basis(n_tokens, freqs)                                       # [n, r]
    Q = Q[:, 2:] if remove else Q
    delta = torch.zeros(cfg.n_heads, cfg.d_vocab, cfg.d_mlp, dtype=torch.float64)   # [h, v, m]
    for h in range(cfg.n_heads):
        ni = circuits.neuron_inputs(model, 0, head=h).double().cpu()[:n_tokens]     # [n, m]
        proj = Q @ (Q.T @ ni)
        delta[h, :n_tokens] = -proj if remove else proj - ni
    delta = delta.to(device=model.W_E.device, dtype=model.W_E.dtype)

    def make(tokens: Tensor) -> Hooks:
        seen: dict[str, Tensor] = {}

        def pre_hook(pre: Tensor, hook) -> Tensor:                             # [b, q, m]
            d = delta[:, tokens]                                               # [h, b, k, m]
            return pre + torch.einsum("bhqk,hbkm->bqm", seen["pattern"].to(d.dtype), d).to(pre.dtype)
        return [("blocks.0.attn.hook_pattern", lambda p, hook: seen.__setitem__("pattern", p)),
                ("blocks.0.mlp.hook_pre", pre_hook)]
    what = (f"with frequencies {list(freqs)} removed" if remove
            else f"projected onto a line and frequencies {list(freqs)}")
    return Intervention(f"neuron inputs from the attended token {what}", make)
