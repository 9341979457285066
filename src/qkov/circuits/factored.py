"""FactoredMatrix: a product ``A @ B`` kept as its two thin factors.

A head's OV circuit through the embedding and unembedding is ``d_vocab × d_vocab_out`` (50257²
floats, 10 GB, for GPT-2), yet its rank is at most ``d_head``. Everything a circuit analysis asks
of it can be read from the factors: eigenvalues from the small ``B @ A``, singular values and the
Frobenius norm from QR decompositions of ``A`` and ``Bᵀ``, and row statistics (top-k, where the
diagonal ranks in its row) by materialising a few hundred rows at a time.

Shapes: ``A [..., ldim, mdim]``, ``B [..., mdim, rdim]``; leading (batch) dimensions broadcast,
so ``FactoredMatrix(W_V, W_O)`` with ``W_V [L, H, d, e]`` holds every head's OV circuit at once.

>>> A, B = torch.randn(5, 2), torch.randn(2, 5)
>>> M = FactoredMatrix(A, B)
>>> torch.allclose(M.norm(), (A @ B).norm(), atol=1e-5)
True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..errors import QkovError

# Row chunks hold at most this many entries (64 MB in float32): 333 rows of a 50257-wide row.
CHUNK_ELEMENTS = 2**24


def _as_tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise QkovError(f"FactoredMatrix factor {name} must be a torch.Tensor; got {type(x).__name__}")
    if x.ndim < 2:
        raise QkovError(f"FactoredMatrix factor {name} must have at least 2 dimensions; got shape {tuple(x.shape)}")
    return x


def _transpose(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


def _one_or_many(i, n: int, what: str):
    """A row or column index as one that keeps its dimension: an int ``i`` becomes ``i:i+1``."""
    if isinstance(i, bool) or not isinstance(i, (int, slice, list, range, Tensor)):
        raise QkovError(f"a FactoredMatrix {what} index must be an int, a slice, a list or a tensor; got {i!r}")
    if isinstance(i, int):
        if not -n <= i < n:
            raise QkovError(f"{what} {i} is out of range for {n} {what}s")
        i %= n
        return slice(i, i + 1)
    return i


class FactoredMatrix:
    """The matrix ``A @ B``, stored as ``A [..., ldim, mdim]`` and ``B [..., mdim, rdim]``.

    Same semantics as TransformerLens's ``FactoredMatrix`` (``.AB``, ``.BA``, ``.T``,
    ``.eigenvalues``, ``.svd()``, ``.norm()``, ``@``), plus streaming row statistics
    (:meth:`topk_rows`, :meth:`diag_rank`, :meth:`diag_topk_fraction`) whose memory is bounded
    by ``CHUNK_ELEMENTS`` whatever the matrix's size.

    Indexing: ``fm[layer, head]`` picks from the leading (batch) dimensions and stays factored;
    indices past them pick rows, then columns, and return a dense tensor built from those rows
    only (``qk[61]`` is row 61, ``qk[61, 3]`` one entry). :meth:`to_dense` (or ``.AB``) is the
    whole matrix.

    >>> fm = FactoredMatrix(torch.arange(6.0).reshape(3, 2), torch.ones(2, 4))
    >>> fm[1]
    tensor([5., 5., 5., 5.])
    >>> fm[1:, 0].tolist(), fm.to_dense().shape
    ([5.0, 9.0], torch.Size([3, 4]))
    """

    def __init__(self, A: Tensor, B: Tensor):
        A, B = _as_tensor(A, "A"), _as_tensor(B, "B")
        if A.shape[-1] != B.shape[-2]:
            raise QkovError(
                f"FactoredMatrix factors do not chain: A {tuple(A.shape)} has {A.shape[-1]} columns "
                f"but B {tuple(B.shape)} has {B.shape[-2]} rows; expected A [..., l, m] and B [..., m, r]"
            )
        try:
            batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            raise QkovError(
                f"FactoredMatrix leading dimensions do not broadcast: A {tuple(A.shape)}, B {tuple(B.shape)}"
            ) from None
        if A.device != B.device:
            raise QkovError(
                f"FactoredMatrix factors live on different devices: A on {A.device}, B on {B.device}; "
                f"move one, e.g. B.to(A.device)"
            )
        if A.dtype != B.dtype:
            dtype = torch.promote_types(A.dtype, B.dtype)
            A, B = A.to(dtype), B.to(dtype)
        self.A = A.broadcast_to(batch + A.shape[-2:])                 # [..., l, m] (a view)
        self.B = B.broadcast_to(batch + B.shape[-2:])                 # [..., m, r] (a view)

    # ------------------------------------------------------------------ shape
    @property
    def ldim(self) -> int:
        """Rows of ``A @ B``."""
        return self.A.shape[-2]

    @property
    def mdim(self) -> int:
        """The inner dimension: the rank ``A @ B`` can have at most."""
        return self.A.shape[-1]

    @property
    def rdim(self) -> int:
        """Columns of ``A @ B``."""
        return self.B.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        """The leading dimensions (e.g. ``[n_layers, n_heads]``)."""
        return self.A.shape[:-2]

    @property
    def shape(self) -> torch.Size:
        """``batch_shape + (ldim, rdim)``: the shape ``A @ B`` would have."""
        return self.batch_shape + (self.ldim, self.rdim)

    @property
    def ndim(self) -> int:
        """``len(shape)``."""
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype."""
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        """Where the factors live (results are computed and returned there)."""
        return self.A.device

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim})"

    # --------------------------------------------------------------- products
    @property
    def AB(self) -> Tensor:
        """The full matrix ``[..., ldim, rdim]``: may be huge (this is what the class avoids)."""
        return self.A @ self.B

    def to_dense(self) -> Tensor:
        """The full matrix ``[..., ldim, rdim]`` as a tensor (the same as :attr:`AB`)."""
        return self.AB

    @property
    def BA(self) -> Tensor:
        """The small reverse product ``[..., mdim, mdim]``; needs a square matrix (ldim == rdim)."""
        self._check_square("BA")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose, still factored: ``Bᵀ @ Aᵀ``."""
        return FactoredMatrix(_transpose(self.B), _transpose(self.A))

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            self._check_chain(self.rdim, other.ldim, other.shape)
            mid = self.B @ other.A                                    # [..., m1, m2]
            if self.mdim <= other.mdim:
                return FactoredMatrix(self.A, mid @ other.B)
            return FactoredMatrix(self.A @ mid, other.B)
        other = self._check_operand(other)
        self._check_chain(self.rdim, other.shape[0] if other.ndim == 1 else other.shape[-2], other.shape)
        if other.ndim == 1:                                           # vector [r] -> [..., l]
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        if self.mdim <= self.rdim:                                    # keep the smaller inner dim
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        other = self._check_operand(other)
        self._check_chain(other.shape[-1], self.ldim, other.shape, left=True)
        if other.ndim == 1:                                           # vector [l] -> [..., r]
            return ((other[None] @ self.A) @ self.B)[..., 0, :]
        if self.mdim <= self.ldim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> FactoredMatrix:
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise QkovError(
                f"FactoredMatrix * x needs a scalar; got a tensor of shape {tuple(scalar.shape)} (use @ for products)"
            )
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __neg__(self) -> FactoredMatrix:
        return self * -1

    def __getitem__(self, idx) -> FactoredMatrix | Tensor:
        """``fm[layer, head]``: a FactoredMatrix (leading dimensions); one or two indices more
        pick rows and columns and give a dense tensor of just those entries (``qk[61]``)."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        nb = len(self.batch_shape)
        if any(i is None or i is Ellipsis for i in idx) or len(idx) > nb + 2:
            raise QkovError(
                f"FactoredMatrix {tuple(self.shape)} takes up to {nb + 2} indices (its {nb} leading "
                f"dimension(s), then row, then column), without ... or None; got {idx!r}"
            )
        if len(idx) <= nb:
            return FactoredMatrix(self.A[idx], self.B[idx])
        fm = self[idx[:nb]] if nb else self
        rows, cols = idx[nb], idx[nb + 1] if len(idx) == nb + 2 else slice(None)
        r, c = _one_or_many(rows, fm.ldim, "row"), _one_or_many(cols, fm.rdim, "column")
        out = fm.A[..., r, :] @ fm.B[..., :, c]                       # [..., rows, cols]
        if isinstance(rows, int):
            out = out.squeeze(-2)
        if isinstance(cols, int):
            out = out.squeeze(-1)
        return out

    def unsqueeze(self, dim: int) -> FactoredMatrix:
        """Add a leading dimension at ``dim`` (counted among the batch dimensions, >= 0)."""
        return FactoredMatrix(self.A.unsqueeze(dim), self.B.unsqueeze(dim))

    # ------------------------------------------------------------ spectrum
    @property
    def eigenvalues(self) -> Tensor:
        """Non-trivial eigenvalues ``[..., mdim]`` (complex): those of ``BA``.

        If ``BAv = λv`` then ``AB(Av) = λ(Av)``, so ``AB`` has the same non-zero eigenvalues as
        the small ``BA``; its other ``ldim - mdim`` eigenvalues are zero.
        """
        BA = self.BA
        if BA.dtype in (torch.float16, torch.bfloat16):
            BA = BA.float()
        return torch.linalg.eigvals(BA)

    def _thin_core(self) -> tuple[Tensor, Tensor, Tensor]:
        """``AB = Qa @ core @ Qbᵀ`` with orthonormal ``Qa [.., l, ka]``, ``Qb [.., r, kb]``."""
        A, B = self.A, self.B
        if A.dtype in (torch.float16, torch.bfloat16):
            A, B = A.float(), B.float()
        Qa, Ra = torch.linalg.qr(A)                                   # [..., l, ka], [..., ka, m]
        Qb, Rb = torch.linalg.qr(_transpose(B))                       # [..., r, kb], [..., kb, m]
        return Qa, Ra @ _transpose(Rb), Qb                            # core [..., ka, kb]

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(U [..., l, k], S [..., k], V [..., r, k])`` with ``AB = U @ diag(S) @ Vᵀ``.

        ``k = min(l, m, r)``; computed from QR of the thin factors and the SVD of a ``k × k``
        core, never from ``AB``. (``V``, not ``Vᴴ``, as TransformerLens returns it.)
        """
        Qa, core, Qb = self._thin_core()
        Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
        return Qa @ Uc, S, Qb @ _transpose(Vhc)

    def norm(self) -> Tensor:
        """Frobenius norm ``[...]``: ``‖AB‖_F = ‖R_A R_Bᵀ‖_F`` from QR of ``A`` and ``Bᵀ``."""
        _, core, _ = self._thin_core()
        return torch.linalg.matrix_norm(core)

    # ---------------------------------------------------------------- entries
    def get_corner(self, k: int = 3) -> Tensor:
        """The top-left ``k × k`` block of every matrix: ``[..., k, k]``."""
        return self.A[..., :k, :] @ self.B[..., :, :k]

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``AB``: ``[..., stop - start, rdim]``."""
        return self.A[..., start:stop, :] @ self.B

    def chunk_rows(self, budget: int | None = None) -> int:
        """How many rows one streamed chunk holds so that it has at most ``budget`` entries."""
        budget = CHUNK_ELEMENTS if budget is None else budget
        per_row = max(1, self.batch_shape.numel() * self.rdim)
        return max(1, budget // per_row)

    def iter_rows(self, chunk: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, rows [..., c, rdim])`` covering ``AB`` top to bottom, ``c <= chunk``."""
        chunk = chunk or self.chunk_rows()
        for start in range(0, self.ldim, chunk):
            yield start, self.rows(start, min(start + chunk, self.ldim))

    def topk_rows(self, k: int, largest: bool = True, chunk: int | None = None) -> tuple[Tensor, Tensor]:
        """Top-``k`` entries of each row: ``(values [..., l, k], indices [..., l, k])``, streamed."""
        if not 1 <= k <= self.rdim:
            raise QkovError(f"topk_rows k={k} must be in 1..{self.rdim} (the number of columns)")
        vals, idxs = [], []
        for _, block in self.iter_rows(chunk):
            v, i = block.topk(k, dim=-1, largest=largest)
            vals.append(v)
            idxs.append(i)
        return torch.cat(vals, dim=-2), torch.cat(idxs, dim=-2)

    def _diag_chunks(self, chunk: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(rows [..., c, rdim], their diagonal entries [..., c])`` for rows ``< min(l, r)``."""
        n = min(self.ldim, self.rdim)
        chunk = chunk or self.chunk_rows()
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = self.rows(start, stop)                            # [..., c, r]
            i = torch.arange(stop - start, device=block.device)
            # Read the diagonal from the same block so that rounding cannot split a tie.
            yield block, block[..., i, start + i]

    def diag_rank(self, chunk: int | None = None) -> Tensor:
        """For each row ``i < min(ldim, rdim)``: how many entries of row ``i`` exceed ``AB[i, i]``.

        ``[..., n]`` int64, ``n = min(ldim, rdim)``; 0 means the diagonal entry is its row's
        maximum (ties count in its favour). For a full OV circuit, row ``i`` is source token
        ``i`` and rank 0 means the head, attending to ``i``, raises logit ``i`` most. Streamed in
        row chunks; for a non-square matrix the rows past ``rdim`` have no diagonal and are skipped.
        """
        out = [(block > diag[..., None]).sum(-1, dtype=torch.int32) for block, diag in self._diag_chunks(chunk)]
        return torch.cat(out, dim=-1).long()

    def diag_in_topk(self, ks: Sequence[int], chunk: int | None = None) -> Tensor:
        """Whether each row's diagonal entry is among its top ``k``, for each ``k`` in ``ks``.

        bool ``[..., n, len(ks)]`` (rows as in :meth:`diag_rank`; equal to ``diag_rank() < k``).
        Cheaper than the full rank: one ``topk(max(ks))`` per streamed chunk, since the diagonal
        is in the top ``k`` exactly when it is at least the row's ``k``-th largest entry.
        """
        ks = list(ks)
        if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
            raise QkovError(f"ks={ks} must be positive integers (k >= {self.rdim} columns always hits)")
        cols = [min(k, self.rdim) - 1 for k in ks]
        index = torch.tensor(cols, device=self.device)                # on the factors' device
        out = []
        for block, diag in self._diag_chunks(chunk):
            kth = block.topk(max(cols) + 1, dim=-1).values[..., index]   # [..., c, len(ks)]
            out.append(diag[..., None] >= kth)
        return torch.cat(out, dim=-2)

    def diag_topk_fraction(self, k: int = 1, chunk: int | None = None) -> Tensor:
        """Fraction of rows whose top-``k`` entries include the diagonal: ``[...]`` (float64)."""
        return self.diag_in_topk([k], chunk)[..., 0].to(torch.float64).mean(-1)

    def diag_argmax_fraction(self, chunk: int | None = None) -> Tensor:
        """Fraction of rows whose maximum is the diagonal entry: ``[...]`` (float64)."""
        return self.diag_topk_fraction(1, chunk)

    # ---------------------------------------------------------------- checks
    def _check_square(self, what: str) -> None:
        if self.ldim != self.rdim:
            raise QkovError(
                f"{what} needs a square matrix, but this FactoredMatrix is {self.ldim} × {self.rdim} "
                f"(shape {tuple(self.shape)}); restrict it to a square part first, e.g. "
                f"FactoredMatrix(A[..., :n, :], B[..., :, :n]) with n = {min(self.ldim, self.rdim)}"
            )

    @staticmethod
    def _check_operand(other) -> Tensor:
        if not isinstance(other, Tensor):
            raise QkovError(f"FactoredMatrix @ needs a tensor or a FactoredMatrix; got {type(other).__name__}")
        if other.ndim == 0:
            raise QkovError("FactoredMatrix @ needs a vector or a matrix, not a scalar (use * for scaling)")
        return other

    def _check_chain(self, left_cols: int, right_rows: int, other_shape, left: bool = False) -> None:
        if left_cols != right_rows:
            a, b = (tuple(other_shape), tuple(self.shape)) if left else (tuple(self.shape), tuple(other_shape))
            raise QkovError(f"cannot multiply {a} @ {b}: inner dimensions {left_cols} and {right_rows} differ")

