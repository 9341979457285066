"""The Fourier picture of arithmetic networks (Nanda et al. 2023, *Progress measures for grokking*).

A one-layer transformer that has grokked ``(a + b) mod p`` computes in the Fourier basis of Z_p:
its embedding is sparse in a few *key frequencies* w_k = 2πk/p, each MLP neuron reads one of
them (its activation over the (a, b) grid is a quadratic form in cos/sin(w_k a), cos/sin(w_k b)),
and the logits are close to ``Σ_k α_k cos(w_k (a + b − c))``. This module holds:

- the real orthonormal Fourier basis of Z_n and 1-D/2-D transforms of tensors indexed by tokens
  or token pairs (:func:`fourier_basis`, :func:`fft1d`, :func:`fft2d`);
- per-neuron key frequencies and the fraction of variance they explain, neuron clusters and the
  model's key-frequency set (:func:`neuron_frequencies`, :func:`key_frequencies`);
- the logits' fit by ``cos/sin(w_k(a+b−c))`` (:func:`logit_fve`) and the restricted and excluded
  losses (:func:`restricted_loss`, :func:`excluded_loss`), with the paper's definitions;
- for models of non-modular tasks (``add``, ``fib``): the spectrum of each neuron's input as a
  function of the attended token, its dominant frequencies, and the overlap of two models'
  spectra (:func:`neuron_input_spectrum`, :func:`frequency_overlap`);
- :func:`mlp_summary`, the JSON-able numbers ``qkov analyze`` reports.

Fourier coefficient layout (1-D, length n): index 0 is the constant, then ``2k-1`` is cos and
``2k`` is sin of frequency k = 1..⌊n/2⌋. For even n the last frequency n/2 has only a cosine
(its sine vanishes on the integers), so the basis always has exactly n rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .circuits.mlp import neuron_inputs
from .devices import model_device
from .errors import QkovError
from .mlp_acts import neuron_activations

__all__ = [
    "FVE_THRESHOLD", "InputSpectrum", "NeuronFrequencies", "basis_names", "excluded_logits", "excluded_loss",
    "fft1d", "fft2d", "fourier_basis", "frequency_overlap", "frequency_rows", "key_frequencies", "logit_fve",
    "mlp_summary", "modular_analysis", "neuron_frequencies", "neuron_grid", "neuron_input_spectrum", "pair_logits",
    "restricted_logits", "restricted_loss", "train_mask",
]

FVE_THRESHOLD = 0.85  # the paper's bar for a neuron "well explained" by one frequency


# ----------------------------------------------------------------------------- basis
def fourier_basis(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """``[n, n]`` orthonormal real Fourier basis of Z_n, one basis vector per row, on ``device``.

    Built on the CPU in float64 and moved, so it is the same matrix on every device.

    >>> B = fourier_basis(6)
    >>> torch.allclose(B @ B.T, torch.eye(6, dtype=B.dtype))
    True
    """
    if not isinstance(n, int) or n < 1:
        raise QkovError(f"n={n!r} must be a positive integer (the size of Z_n)")
    x = torch.arange(n, dtype=torch.float64)
    rows = [torch.ones(n, dtype=torch.float64)]
    for k in range(1, n // 2 + 1):
        rows.append(torch.cos(2 * math.pi * k * x / n))
        if 2 * k != n:
            rows.append(torch.sin(2 * math.pi * k * x / n))
    basis = torch.stack(rows)
    return (basis / basis.norm(dim=1, keepdim=True)).to(dtype=dtype, device=device)


def basis_names(n: int) -> list[str]:
    """Labels of :func:`fourier_basis` rows: ``const, cos 1, sin 1, ...``."""
    names = ["const"]
    for k in range(1, n // 2 + 1):
        names.append(f"cos {k}")
        if 2 * k != n:
            names.append(f"sin {k}")
    return names


def frequency_rows(k: int, n: int) -> list[int]:
    """Basis rows of frequency ``k`` (1..⌊n/2⌋): ``[cos, sin]``, or ``[cos]`` for k = n/2."""
    if not 1 <= k <= n // 2:
        raise QkovError(f"frequency k={k} is out of range for n={n}; expected 1..{n // 2}")
    return [2 * k - 1] if 2 * k == n else [2 * k - 1, 2 * k]


def fft1d(x: Tensor, dim: int = 0) -> Tensor:
    """Coefficients of ``x`` along ``dim`` (length n) in :func:`fourier_basis` (same shape)."""
    B = fourier_basis(x.shape[dim], x.dtype if x.is_floating_point() else torch.float64, x.device)
    return torch.movedim(torch.tensordot(B, torch.movedim(x.to(B.dtype), dim, 0), dims=1), 0, dim)


def fft2d(x: Tensor) -> Tensor:
    """Coefficients of ``x [n, n, ...]`` (indexed by a token pair) in the 2-D basis, same shape.

    Entry ``[i, j]`` is the component along ``basis[i] ⊗ basis[j]`` (i for the first token).
    """
    if x.ndim < 2 or x.shape[0] != x.shape[1]:
        raise QkovError(f"fft2d needs a tensor indexed by token pairs, shaped [n, n, ...]; got {tuple(x.shape)}")
    return fft1d(fft1d(x, 0), 1)


# ----------------------------------------------------------- the (a, b) grid of a residue task
def _residue_p(task) -> int:
    """p for a task whose inputs are residue pairs ``[a, b, =]`` with answers mod p (the task's
    ``residue_modulus``); else an error."""
    p = getattr(task, "residue_modulus", None)
    if not isinstance(p, int) or isinstance(p, bool):
        raise QkovError(
            f"Fourier analysis over Z_p needs a task indexed by residues mod p (a task whose "
            f"residue_modulus is p, such as modadd); task '{getattr(task, 'name', task)}' is not. "
            f"For add/fib use neuron_input_spectrum(model)"
        )
    return p


def _all_pairs(task) -> tuple[Tensor, Tensor, int]:
    """Tokens of every (a, b) pair in a-major order and the scored position."""
    p = _residue_p(task)
    data = task.dataset("all")
    a, b = data.tokens[:, 0], data.tokens[:, 1]
    if not torch.equal(a * p + b, torch.arange(p * p)):
        raise QkovError(f"task {task!r} does not list its (a, b) pairs in a-major order; cannot form the p x p grid")
    return data.tokens, data.targets, task.scored_positions[-1]


@torch.no_grad()
def pair_logits(model, task) -> Tensor:
    """``[p, p, p]`` logits over every ``(a, b)`` pair at the answer position: ``[a, b, c]``."""
    tokens, _, pos = _all_pairs(task)
    p = _residue_p(task)
    return model(tokens.to(model_device(model)))[:, pos, :p].reshape(p, p, p).double()


def neuron_grid(model, task, layer: int = 0) -> Tensor:
    """``[p, p, d_mlp]``: MLP activations (``hook_post``) at the answer position for every (a, b)."""
    _all_pairs(task)
    p = _residue_p(task)
    _, acts = neuron_activations(model, task, layer)                             # [p*p, 1, m]
    return acts[:, -1].reshape(p, p, -1).double()


# ----------------------------------------------------------- neurons and key frequencies
@dataclass
class NeuronFrequencies:
    """Each neuron's key frequency (0 for a dead neuron) and the share of its variance explained."""

    freq: Tensor            # [d_mlp] long
    fve: Tensor             # [d_mlp] fraction of the neuron's variance at that frequency
    share: Tensor           # [n_freqs, d_mlp] share of variance at every frequency 1..⌊p/2⌋
    dead: Tensor            # [d_mlp] bool: constant over all inputs

    def clusters(self, threshold: float = FVE_THRESHOLD) -> dict[int, list[int]]:
        """Neurons grouped by key frequency, keeping those explained to at least ``threshold``."""
        out: dict[int, list[int]] = {}
        for n in torch.nonzero(~self.dead & (self.fve >= threshold)).flatten().tolist():
            out.setdefault(int(self.freq[n]), []).append(n)
        return dict(sorted(out.items()))


def neuron_frequencies(acts: Tensor) -> NeuronFrequencies:
    """Key frequency of each neuron from its activations over the ``[p, p, d_mlp]`` grid.

    As in the grokking analysis: centre each neuron over all inputs, take the 2-D Fourier
    transform, and for each frequency k count the terms ``const × {cos,sin}(w_k b)``,
    ``{cos,sin}(w_k a) × const`` and the four quadratic ones ``{cos,sin}(w_k a){cos,sin}(w_k b)``;
    the neuron's frequency is the k with the largest share of its variance (every k = 1..⌊p/2⌋).
    """
    if acts.ndim != 3 or acts.shape[0] != acts.shape[1]:
        raise QkovError(f"neuron activations must be shaped [p, p, d_mlp]; got {tuple(acts.shape)}")
    p = acts.shape[0]
    acts = acts.double()
    coef = fft2d(acts - acts.mean(dim=(0, 1), keepdim=True)).pow(2)            # [p, p, m]
    total = coef.sum(dim=(0, 1))                                                # [m]
    dead = total <= 1e-20 * total.max().clamp(min=1e-300) if total.numel() else total.bool()
    mass = []
    for k in range(1, p // 2 + 1):
        r = frequency_rows(k, p)
        mass.append(coef[0, r].sum(0) + coef[r, 0].sum(0) + coef[r][:, r].sum((0, 1)))
    share = torch.stack(mass) / total.clamp(min=1e-300)                         # [K, m]
    share = torch.where(dead, 0.0, share)
    fve, best = share.max(dim=0)
    freq = torch.where(dead, 0, best + 1)
    return NeuronFrequencies(freq=freq, fve=fve, share=share, dead=dead)


def key_frequencies(nf: NeuronFrequencies, threshold: float = 0.5, min_share: float = 0.02) -> list[int]:
    """The model's key frequencies: those that a cluster of neurons reads.

    A frequency counts when at least ``min_share`` of the live neurons (and at least 2) have it
    as their key frequency with FVE ≥ ``threshold`` (by default: most of the neuron's variance is
    at that one frequency). Stray neurons do not make a frequency.
    """
    live = int((~nf.dead).sum())
    need = max(2, math.ceil(min_share * live))
    return [k for k, members in nf.clusters(threshold).items() if len(members) >= need]


# ----------------------------------------------------------------------- logits
def _apb_directions(p: int, freqs: Sequence[int], device: torch.device) -> Tensor:
    """``[n_dirs, p*p]`` unit vectors cos(w_k(a+b)), sin(w_k(a+b)) over the (a, b) grid, on ``device``."""
    s = torch.arange(p, dtype=torch.float64, device=device)
    apb = (s[:, None] + s[None, :]).reshape(-1)                                 # [p*p]
    dirs = []
    for k in freqs:
        for f in (torch.cos, torch.sin):
            v = f(2 * math.pi * k * apb / p)
            if v.norm() > 1e-6:  # sin(π(a+b)) vanishes for k = p/2
                dirs.append(v / v.norm())
    return torch.stack(dirs) if dirs else torch.zeros(0, p * p, dtype=torch.float64, device=device)


def _check_freqs(freqs: Sequence[int], p: int) -> list[int]:
    freqs = [int(k) for k in freqs]
    bad = [k for k in freqs if not 1 <= k <= p // 2]
    if bad:
        raise QkovError(f"key frequencies {bad} are out of range for p={p}; expected integers in 1..{p // 2}")
    return sorted(set(freqs))


def logit_fve(logits: Tensor, freqs: Sequence[int]) -> float:
    """Fraction of the logits' variance explained by ``cos/sin(w_k(a + b − c))`` for ``k`` in ``freqs``.

    ``logits [p, p, p]`` are indexed ``[a, b, c]`` and centred over ``c`` first (softmax ignores a
    shift per input); each term is a unit direction of the ``p³`` cube, and the directions of
    different frequencies are orthogonal, so the explained variance is a sum of squared projections.
    """
    p = logits.shape[0]
    freqs = _check_freqs(freqs, p)
    L = logits.double() - logits.double().mean(-1, keepdim=True)
    s = torch.arange(p, dtype=torch.float64, device=logits.device)
    abc = s[:, None, None] + s[None, :, None] - s[None, None, :]               # [p, p, p]
    explained = 0.0
    for k in freqs:
        for f in (torch.cos, torch.sin):
            v = f(2 * math.pi * k * abc / p)
            if v.norm() > 1e-6:
                explained += float((L * v).sum() ** 2 / v.pow(2).sum())
    total = float(L.pow(2).sum())
    return explained / total if total > 0 else 0.0


def restricted_logits(logits: Tensor, freqs: Sequence[int]) -> Tensor:
    """Logits keeping only the ``cos/sin(w_k(a+b))`` directions of ``freqs`` (2 per frequency).

    For each output ``c`` the ``[p, p]`` map over (a, b) is projected onto those directions, then
    the mean over inputs that the projection lost is added back (the paper's bias correction).
    """
    p = logits.shape[0]
    D = _apb_directions(p, _check_freqs(freqs, p), logits.device)               # [n, p*p]
    L = logits.double().reshape(p * p, -1)                                       # [(a b), c]
    kept = D.T @ (D @ L)                                                         # [(a b), c]
    kept = kept + (L - kept).mean(0, keepdim=True)
    return kept.reshape(logits.shape)


def excluded_logits(logits: Tensor, freqs: Sequence[int]) -> Tensor:
    """Logits with the ``cos/sin(w_k(a+b))`` directions of ``freqs`` removed (no bias correction)."""
    p = logits.shape[0]
    D = _apb_directions(p, _check_freqs(freqs, p), logits.device)
    L = logits.double().reshape(p * p, -1)
    return (L - D.T @ (D @ L)).reshape(logits.shape)


def _loss(logits: Tensor, mask: Tensor | None = None) -> float:
    """Mean cross-entropy of ``[p, p, p]`` logits against ``(a + b) mod p``, over ``mask``."""
    p = logits.shape[0]
    s = torch.arange(p, device=logits.device)
    target = ((s[:, None] + s[None, :]) % p).reshape(-1)
    lp = F.log_softmax(logits.double().reshape(p * p, p), dim=-1)
    nll = (-lp.gather(1, target[:, None])[:, 0]).clamp(min=0)                  # a loss is never below 0
    return float(nll.mean() if mask is None else nll[mask.reshape(-1).to(logits.device)].mean())


def train_mask(task) -> Tensor:
    """``[p, p]`` bool: which (a, b) pairs are in the task's training split."""
    p = _residue_p(task)
    train = task.dataset("train").tokens
    mask = torch.zeros(p, p, dtype=torch.bool)
    mask[train[:, 0], train[:, 1]] = True
    return mask


def restricted_loss(logits: Tensor, freqs: Sequence[int]) -> float:
    """Loss over all ``p²`` inputs of :func:`restricted_logits` (the paper's restricted loss)."""
    return _loss(restricted_logits(logits, freqs))


def excluded_loss(logits: Tensor, freqs: Sequence[int], train: Tensor) -> float:
    """Loss on the training pairs (``train [p, p]`` bool) of :func:`excluded_logits`."""
    return _loss(excluded_logits(logits, freqs), train)


# ------------------------------------------------- non-modular tasks: input spectra
@dataclass
class InputSpectrum:
    """Fourier power of each neuron's input as a function of the attended token (0..n_tokens-1)."""

    n_tokens: int
    power: Tensor           # [n_freqs, d_mlp] power at frequencies 1..⌊n/2⌋ (mean, and trend if removed)
    dominant: Tensor        # [d_mlp] each neuron's strongest frequency (0: constant input)
    dominant_share: Tensor  # [d_mlp] the share of that neuron's power it holds
    spectrum: Tensor        # [n_freqs] the model's power per frequency, summing to 1
    linear_share: Tensor    # [d_mlp] share of each neuron's input variance that is a straight line in t

    def top(self, n: int = 5) -> list[dict[str, float]]:
        """The ``n`` frequencies with most power: ``{k, period, share, neurons}`` each."""
        order = self.spectrum.argsort(descending=True)[:n].tolist()
        counts = torch.bincount(self.dominant, minlength=len(self.spectrum) + 1)
        return [
            {"k": i + 1, "period": round(self.n_tokens / (i + 1), 3), "share": round(float(self.spectrum[i]), 4),
             "neurons": int(counts[i + 1])}
            for i in order
        ]


def neuron_input_spectrum(
    model, n_tokens: int | None = None, layer: int = 0, head: int | None = None, detrend: bool = True
) -> InputSpectrum:
    """Frequencies in the neuron-input map ``W_E W_V W_O W_in`` as a function of the token value.

    Each neuron's column of the map is a function of the attended token ``t = 0..n_tokens-1``
    (default: the whole vocabulary). Token values are not residues, so a straight line in t is
    not periodic, yet its transform leaks power into every frequency (as 1/k²): by default the
    least-squares line is removed first (its share of the variance is ``linear_share``). The
    real Fourier transform over t of what remains gives the power at each frequency k (period
    ``n_tokens / k`` tokens).
    """
    ni = neuron_inputs(model, layer=layer, head=head).double()                  # [v, m]
    n = ni.shape[0] if n_tokens is None else int(n_tokens)
    if not 3 <= n <= ni.shape[0]:
        raise QkovError(f"n_tokens={n_tokens} must be in 3..{ni.shape[0]} (the model's d_vocab)")
    ni = ni[:n] - ni[:n].mean(0)                                                 # [n, m]
    t = torch.arange(n, dtype=torch.float64, device=ni.device)
    t = (t - t.mean()) / (t - t.mean()).norm()                                  # unit, orthogonal to constants
    line = t[:, None] * (t @ ni)[None]                                           # [n, m]
    var = ni.pow(2).sum(0)
    linear_share = torch.where(var > 0, line.pow(2).sum(0) / var.clamp(min=1e-300), 0.0)
    if detrend:
        ni = ni - line
    coef = fft1d(ni, dim=0).pow(2)                                               # [n, m]
    power = torch.stack([coef[frequency_rows(k, n)].sum(0) for k in range(1, n // 2 + 1)])   # [K, m]
    total = power.sum(0)                                                         # [m]
    share, best = power.max(0)
    live = total > 1e-20 * total.max().clamp(min=1e-300)
    dominant = torch.where(live, best + 1, 0)
    dominant_share = torch.where(live, share / total.clamp(min=1e-300), 0.0)
    spectrum = power.sum(1) / power.sum().clamp(min=1e-300)
    return InputSpectrum(n, power, dominant, dominant_share, spectrum, linear_share)


def frequency_overlap(a, b, n_tokens: int | None = None) -> float:
    """Overlap of two models' neuron-input spectra: ``Σ_k min(S_a[k], S_b[k])`` in [0, 1].

    ``a`` and ``b`` are models (their :func:`neuron_input_spectrum` over ``n_tokens``) or
    :class:`InputSpectrum` results. 1 means the same distribution of power over frequencies, 0
    means disjoint frequencies.
    """
    sa = a if isinstance(a, InputSpectrum) else neuron_input_spectrum(a, n_tokens)
    sb = b if isinstance(b, InputSpectrum) else neuron_input_spectrum(b, n_tokens)
    if sa.n_tokens != sb.n_tokens:
        raise QkovError(
            f"spectra over different token ranges ({sa.n_tokens} and {sb.n_tokens} tokens) are not comparable; "
            f"pass the same n_tokens for both"
        )
    return float(torch.minimum(sa.spectrum, sb.spectrum).sum())


# ------------------------------------------------------------------------ summary
def modular_analysis(model, task, layer: int = 0) -> dict[str, Any]:
    """Neuron frequencies, key frequencies, logit FVE and restricted/excluded loss for ``modadd``."""
    p = _residue_p(task)
    nf = neuron_frequencies(neuron_grid(model, task, layer))
    keys = key_frequencies(nf)
    logits = pair_logits(model, task)
    train = train_mask(task)
    live = ~nf.dead
    fve = nf.fve[live]
    in_keys = torch.isin(nf.freq, torch.tensor(keys, dtype=nf.freq.dtype, device=nf.freq.device)) & live
    return {
        "kind": "fourier_zp",
        "p": p,
        "key_frequencies": keys,
        # neurons whose key frequency is k, for each key frequency k (any FVE)
        "clusters": {str(k): int(((nf.freq == k) & live).sum()) for k in keys},
        "neurons": {
            "n": int(nf.freq.numel()),
            "dead": int(nf.dead.sum()),
            "fve_mean": round(float(fve.mean()), 4) if fve.numel() else 0.0,
            "fve_median": round(float(fve.median()), 4) if fve.numel() else 0.0,
            "frac_fve_ge_0.85": round(float((nf.fve >= FVE_THRESHOLD).float().mean()), 4),
            "frac_in_key_frequencies": round(float(in_keys.float().mean()), 4),
        },
        "logit_fve": round(logit_fve(logits, keys), 4) if keys else 0.0,
        "loss_all": _sig(_loss(logits)),
        "train_loss": _sig(_loss(logits, train)),
        "test_loss": _sig(_loss(logits, ~train)) if (~train).any() else None,
        "restricted_loss": _sig(restricted_loss(logits, keys)) if keys else None,
        "excluded_loss": _sig(excluded_loss(logits, keys, train)) if keys else None,
    }


def _sig(x: float, digits: int = 5) -> float:
    """Round to significant digits (losses span 1e-9 to 1e1)."""
    return float(f"{x:.{digits}g}")


def mlp_summary(model, task, layer: int = 0) -> dict[str, Any]:
    """The JSON-able MLP section of ``qkov analyze``.

    A task over residue pairs (``residue_modulus`` set: ``modadd``): :func:`modular_analysis`.
    Other tasks (``add``, ``fib``): the neuron-input
    spectrum over the task's token values (straight-line trend removed): top frequencies with
    their periods and power share, how many neurons each dominates, the median share of a
    neuron's input that is a straight line in the token, and the full spectrum (for
    :func:`frequency_overlap`).
    """
    if getattr(task, "residue_modulus", None) is not None:
        return modular_analysis(model, task, layer)
    spec = neuron_input_spectrum(model, n_tokens=task.d_vocab, layer=layer)
    return {
        "kind": "token_spectrum",
        "n_tokens": spec.n_tokens,
        "dominant_frequencies": spec.top(5),
        "neuron_dominant_share_median": round(float(spec.dominant_share.median()), 4),
        "linear_share_median": round(float(spec.linear_share.median()), 4),
        "spectrum": [round(float(x), 6) for x in spec.spectrum],
    }
