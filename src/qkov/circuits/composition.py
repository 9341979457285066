"""Q-, K- and V-composition scores between every pair of heads, and MFTC's random baseline.

The score of an earlier head A with a later head B is TransformerLens's
``‖W_A W_B‖_F / (‖W_A‖_F ‖W_B‖_F)`` where ``W_A = W_OV^A`` and ``W_B`` is ``W_QK^B`` (Q),
``W_QKᵀ^B`` (K) or ``W_OV^B`` (V), all ``d_model × d_model`` of rank ``d_head``.

Computed from thin factors only. Write ``W_A = V_A O_A`` and ``W_B = P_B S_Bᵀ`` (each factor
``[d_model, d_head]``). With reduced QR ``V_A = Q R_V`` and ``S_B = Q' R_S``, the orthonormal
``Q, Q'`` drop out of the Frobenius norm::

    ‖W_A W_B‖_F = ‖(R_V O_A) (P_B R_Sᵀ)‖_F  =  ‖L_A R_B‖_F,   L_A [d_head, d_model], R_B [d_model, d_head]

so all pairs with ``layer_A < layer_B`` come out of one matmul per layer ``[H·e, d] @ [d, n·e]``
followed by a sum of squares over each ``e × e`` block: ``O(L² H² e² d)`` flops, against
TransformerLens's SVD of every pair's product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import QkovError
from .factored import FactoredMatrix
from .weights import weights

MODES = ("Q", "K", "V")


def _right_factors(w, mode: str) -> tuple[Tensor, Tensor]:
    """``(P, S)`` with the later head's matrix ``W_B = P Sᵀ``; each ``[L, H, d_model, d_head]``."""
    if mode == "Q":
        return w.W_Q, w.W_K                                           # W_QK   = W_Q W_Kᵀ
    if mode == "K":
        return w.W_K, w.W_Q                                           # W_QKᵀ  = W_K W_Qᵀ
    return w.W_V, w.W_O.transpose(-2, -1)                             # W_OV   = W_V W_O


def _r(x: Tensor) -> Tensor:
    """The triangular factor of a reduced QR: ``[..., k, d_head]``, ``x = Q R``."""
    # In float64: LAPACK's float32 QR was erratically slow on these batches (2.3 s against
    # 0.15 s for GPT-2's 144 heads), and R is more exact.
    return torch.linalg.qr(x.double(), mode="r")[1].to(x.dtype)


def _scores(V: Tensor, O: Tensor, P: Tensor, S: Tensor) -> Tensor:
    """Composition scores of left heads ``V O`` with right heads ``P Sᵀ``: ``[L, H, L, H]``."""
    L, H, d, _ = V.shape
    Lf = _r(V) @ O                                                    # [L, H, k, d]
    Rf = P @ _r(S).transpose(-2, -1)                                  # [L, H, d, k]
    k = Lf.shape[-2]
    l_norm = torch.linalg.matrix_norm(Lf)                             # [L, H] = ‖W_A‖_F
    r_norm = torch.linalg.matrix_norm(Rf)                             # [L, H] = ‖W_B‖_F
    scores = V.new_zeros(L, H, L, H)
    for a in range(L - 1):
        n = L - a - 1                                                 # later layers
        left = Lf[a].reshape(H * k, d)                                # [H·k, d]
        right = Rf[a + 1:].permute(2, 0, 1, 3).reshape(d, n * H * k)  # [d, n·H·k]
        prod = (left @ right).reshape(H, k, n, H, k)
        num = prod.square().sum((1, 4)).sqrt()                        # [H, n, H]
        scores[a, :, a + 1:] = num / (l_norm[a][:, None, None] * r_norm[a + 1:][None])
    return scores


def composition_scores(
    model, mode: str, baseline: bool = False, seed: int = 0, n_samples: int = 64
) -> Tensor:
    """``[L, H, L, H]``: how much head ``[l1, h1]`` composes into head ``[l2, h2]`` by ``mode``.

    ``mode`` is "Q", "K" or "V" (the later head's query, key or value reads the earlier head's
    output). Zero unless ``l1 < l2``. Equal to TransformerLens's ``all_composition_scores``.
    ``baseline=True`` subtracts the mean score of ``n_samples`` pairs of random Gaussian
    matrices with the same factor shapes (the framework's baseline), drawn from
    ``torch.Generator().manual_seed(seed)``; the result is then 0 on average for unrelated heads.
    """
    if mode not in MODES:
        raise QkovError(f"composition mode {mode!r} is not one of 'Q', 'K', 'V'")
    w = weights(model)
    P, S = _right_factors(w, mode)
    scores = _scores(w.W_V, w.W_O, P, S)
    if baseline:
        # A number drawn on the CPU (the same for a model on any device), subtracted where the model is.
        base = random_baseline(w.d_model, w.d_head, seed=seed, n_samples=n_samples, dtype=scores.dtype)
        layers = torch.arange(w.n_layers, device=scores.device)
        later = layers[:, None] < layers[None, :]                     # [L, L]
        scores = torch.where(later[:, None, :, None], scores - base, scores)
    return scores


def random_baseline(
    d_model: int, d_head: int, seed: int = 0, n_samples: int = 64, dtype: torch.dtype = torch.float32
) -> float:
    """Mean composition score of random ``(d_model × d_head)(d_head × d_model)`` matrix pairs.

    Every mode's matrices have these shapes, so one number serves Q, K and V. The matrices are
    drawn and scored on the CPU from ``seed``, so the number is the same whichever device a
    model lives on.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise QkovError(f"n_samples={n_samples!r} must be a positive integer")
    gen = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    A = FactoredMatrix(f(n_samples, d_model, d_head), f(n_samples, d_head, d_model))
    B = FactoredMatrix(f(n_samples, d_model, d_head), f(n_samples, d_head, d_model))
    return float(((A @ B).norm() / (A.norm() * B.norm())).mean())
