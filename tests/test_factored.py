"""FactoredMatrix: every factored result equals the dense computation on random shapes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkov.circuits import FactoredMatrix
from qkov.errors import QkovError

dims = st.integers(1, 7)
batches = st.sampled_from([(), (3,), (2, 3)])
seeds = st.integers(0, 2**31 - 1)
SETTINGS = settings(max_examples=40, deadline=None)


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def make(seed, batch, l, m, r, broadcast=False):
    gen = torch.Generator().manual_seed(seed)
    A = rand(gen, *batch, l, m)
    # Broadcasting: B may lack the leading dims or have size-1 ones.
    B = rand(gen, *(() if broadcast else batch), m, r)
    return FactoredMatrix(A, B), A @ B


def close(x, y, tol=1e-9):
    torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@SETTINGS
@given(seeds, batches, dims, dims, dims, st.booleans())
def test_shape_products_and_transpose(seed, batch, l, m, r, broadcast):
    fm, dense = make(seed, batch, l, m, r, broadcast)
    assert fm.shape == dense.shape and (fm.ldim, fm.mdim, fm.rdim) == (l, m, r)
    assert fm.batch_shape == torch.Size(batch) and fm.ndim == len(batch) + 2
    close(fm.AB, dense)
    close(fm.T.AB, dense.transpose(-2, -1))
    close((fm * 2.5).AB, 2.5 * dense)
    close((-fm).AB, -dense)
    close(fm.get_corner(3), dense[..., :3, :3])
    close(fm.rows(1, 3), dense[..., 1:3, :])
    if l == r:
        close(fm.BA, fm.B @ fm.A)


@SETTINGS
@given(seeds, batches, dims, dims, dims, dims)
def test_matmul_with_matrices_vectors_and_factored(seed, batch, l, m, r, k):
    fm, dense = make(seed, batch, l, m, r)
    gen = torch.Generator().manual_seed(seed + 1)
    right, left = rand(gen, r, k), rand(gen, k, l)
    prod = fm @ right
    assert isinstance(prod, FactoredMatrix) and prod.mdim == min(m, r)
    close(prod.AB, dense @ right)
    prod = left @ fm
    assert isinstance(prod, FactoredMatrix) and prod.mdim == min(m, l)
    close(prod.AB, left @ dense)
    v, u = rand(gen, r), rand(gen, l)
    close(fm @ v, dense @ v)
    close(u @ fm, u @ dense)
    other, other_dense = make(seed + 2, batch, r, k, l)
    both = fm @ other
    assert both.mdim == min(m, k)
    close(both.AB, dense @ other_dense)


@SETTINGS
@given(seeds, batches, dims, dims)
def test_eigenvalues_match_dense_power_sums(seed, batch, n, m):
    fm, dense = make(seed, batch, n, m, n)
    lam = fm.eigenvalues                                              # [..., m]
    assert lam.shape == torch.Size(batch) + (m,)
    # The non-zero spectrum of AB is BA's: equal power sums trace((AB)^p) = Σ λ^p.
    power = torch.eye(n, dtype=dense.dtype).expand_as(dense)
    for p in (1, 2, 3):
        power = power @ dense
        trace = power.diagonal(dim1=-2, dim2=-1).sum(-1)
        torch.testing.assert_close(lam.pow(p).sum(-1).real, trace, rtol=1e-7, atol=1e-7)


@SETTINGS
@given(seeds, batches, dims, dims, dims)
def test_svd_and_norm_from_thin_factors(seed, batch, l, m, r):
    fm, dense = make(seed, batch, l, m, r)
    U, S, V = fm.svd()
    k = min(l, m, r)
    assert U.shape[-2:] == (l, k) and S.shape[-1] == k and V.shape[-2:] == (r, k)
    close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), dense)
    close(S, torch.linalg.svdvals(dense)[..., :k])
    close(U.transpose(-2, -1) @ U, torch.eye(k, dtype=U.dtype).expand(U.shape[:-2] + (k, k)))
    close(fm.norm(), torch.linalg.matrix_norm(dense))


@SETTINGS
@given(seeds, batches, dims, dims, dims, st.integers(1, 4), st.integers(1, 5))
def test_streamed_row_statistics(seed, batch, l, m, r, k, chunk):
    fm, dense = make(seed, batch, l, m, r)
    k = min(k, r)
    vals, idx = fm.topk_rows(k, chunk=chunk)
    ref_vals, ref_idx = dense.topk(k, dim=-1)
    close(vals, ref_vals)
    assert torch.equal(idx, ref_idx)
    n = min(l, r)
    diag = dense[..., torch.arange(n), torch.arange(n)]
    ref_rank = (dense[..., :n, :] > diag[..., None]).sum(-1)
    assert torch.equal(fm.diag_rank(chunk=chunk), ref_rank)
    close(fm.diag_argmax_fraction(chunk=chunk), (ref_rank == 0).double().mean(-1))
    close(fm.diag_topk_fraction(2, chunk=chunk), (ref_rank < 2).double().mean(-1))
    ks = [1, k, r, r + 2]                                             # k > r columns always hits
    hits = fm.diag_in_topk(ks, chunk=chunk)
    assert hits.shape == ref_rank.shape + (4,)
    assert torch.equal(hits, torch.stack([ref_rank < kk for kk in ks], -1))


def test_diag_rank_counts_ties_for_the_diagonal():
    # Row 0 ties its diagonal with another entry; row 1's diagonal is strictly second.
    fm = FactoredMatrix(torch.eye(2), torch.tensor([[1.0, 1.0], [3.0, 2.0]]))
    assert fm.diag_rank().tolist() == [0, 1]
    assert fm.diag_in_topk([1, 2]).tolist() == [[True, True], [False, True]]
    assert fm.diag_argmax_fraction().item() == 0.5


def test_chunks_stay_within_the_budget():
    fm = FactoredMatrix(torch.zeros(4, 1000, 2), torch.zeros(4, 2, 50257))
    rows = fm.chunk_rows()
    assert rows * 4 * 50257 <= 2**24 < (rows + 1) * 4 * 50257
    assert fm.chunk_rows(budget=10) == 1
    assert [s for s, _ in fm.iter_rows(chunk=300)] == [0, 300, 600, 900]


def test_batch_indexing():
    fm, dense = make(0, (2, 3), 4, 2, 5)
    close(fm[1].AB, dense[1])
    close(fm[1, 2].AB, dense[1, 2])
    close(fm.to_dense(), dense)
    with pytest.raises(QkovError, match="up to 4 indices"):
        fm[0, 0, 0, 0, 0]


@given(seeds, batches, dims, dims, dims)
@SETTINGS
def test_row_and_column_indexing_equals_the_dense_matrix(seed, batch, l, m, r):
    fm, dense = make(seed, batch, l, m, r)
    lead = (0,) * len(batch)
    close(fm[lead + (l - 1,)], dense[lead + (l - 1,)])                 # a row: qk[61]
    close(fm[lead + (-1, 0)], dense[lead + (-1, 0)])                   # one entry
    close(fm[lead + (slice(1, None), [0, r - 1])], dense[lead + (slice(1, None),)][..., [0, r - 1]])
    if not batch:
        close(fm[0], dense[0])
        assert isinstance(fm[0], torch.Tensor) and fm[0].shape == (r,)


def test_bad_row_indices_say_the_range():
    fm, _ = make(0, (), 4, 2, 5)
    with pytest.raises(QkovError, match="row 4 is out of range for 4 rows"):
        fm[4]
    with pytest.raises(QkovError, match="column index must be"):
        fm[0, "a"]


def test_errors_say_what_was_given():
    with pytest.raises(QkovError, match=r"A \(3, 4\) has 4 columns but B \(5, 2\) has 5 rows"):
        FactoredMatrix(torch.zeros(3, 4), torch.zeros(5, 2))
    with pytest.raises(QkovError, match="torch.Tensor"):
        FactoredMatrix([[1.0]], torch.zeros(1, 1))
    fm = FactoredMatrix(torch.zeros(3, 2), torch.zeros(2, 5))
    with pytest.raises(QkovError, match=r"square matrix.*3 × 5"):
        _ = fm.eigenvalues
    with pytest.raises(QkovError, match="inner dimensions 5 and 4 differ"):
        fm @ torch.zeros(4, 2)
    with pytest.raises(QkovError, match=r"k=6 must be in 1..5"):
        fm.topk_rows(6)
    with pytest.raises(QkovError, match=r"ks=\[0\] must be positive integers"):
        fm.diag_in_topk([0])
    with pytest.raises(QkovError, match="scalar"):
        fm * torch.zeros(3)
