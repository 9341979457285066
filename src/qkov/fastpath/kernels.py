"""Hand-written autograd kernels of the fast path: pattern-weighted bags of table rows, and
attention read from a score table followed by the mixing, with their backwards written out."""

from __future__ import annotations

import warnings
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Work tensors larger than this are allocated afresh each call: there the arithmetic dwarfs the
# page faults (the kernel also backs big blocks with huge pages). A Scratch keeps at most
# _SCRATCH_BUDGET bytes: a caller cycling through many batch sizes empties it rather than grows it
# (max keeps ~35 MB: its training batch and two eval chunk sizes).
_SCRATCH_MAX_BYTES = 16 << 20
_SCRATCH_BUDGET = 64 << 20


class Scratch:
    """Work tensors kept from one training step to the next.

    glibc returns freed blocks of a few hundred KB to the system, so each step's fresh
    intermediates (``max``: 0.5-0.8 MB each) came back page-faulted: ~200 faults a step at
    ~2.5 µs each on this machine, 10-20% of a 5 ms step. A forward takes a :meth:`lease` and keeps
    it until its backward has run (it lives in the autograd context); while one is held,
    another forward gets fresh tensors, so two graphs never share a buffer. Only tensors that
    never leave the kernels come from here: what is handed back to autograd is always new.
    """

    def __init__(self) -> None:
        self.bufs: dict[tuple, Tensor] = {}           # (key, shape, dtype) -> tensor
        self.nbytes = 0
        self._held = lambda: None                     # weakref to the live lease

    def lease(self) -> "_Lease | _Fresh":
        if self._held() is not None:
            return FRESH
        lease = _Lease(self)
        self._held = weakref.ref(lease)
        return lease


class _Fresh:
    """The allocator for tensors that leave the kernels: a new tensor every time."""

    @staticmethod
    def empty(key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return like.new_empty(shape)


FRESH = _Fresh()


class _Lease:
    """A :class:`Scratch`'s buffers, one per ``(key, shape, dtype)``, for one forward/backward."""

    __slots__ = ("_scratch", "__weakref__")

    def __init__(self, scratch: Scratch):
        self._scratch = scratch

    def empty(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        scratch = self._scratch
        k = (key, tuple(shape), like.dtype)
        buf = scratch.bufs.get(k)
        if buf is None:
            buf = like.new_empty(shape)
            size = buf.numel() * buf.element_size()
            if size <= _SCRATCH_MAX_BYTES:
                if scratch.nbytes + size > _SCRATCH_BUDGET:   # tensors handed out stay valid
                    scratch.bufs.clear()
                    scratch.nbytes = 0
                scratch.bufs[k] = buf
                scratch.nbytes += size
        return buf


class _WeightedBag(torch.autograd.Function):
    """``out[i] = Σ_j weights[i, j] · table[rows[i, j]]`` for each table: ``F.embedding_bag`` (sum).

    Torch's own backward for ``per_sample_weights`` is slow on CPU, so this one is written out:
    the weights' gradient is ``grad @ tableᵀ`` sampled at the bag entries (a sparse
    ``sampled_addmm``), and a table's gradient is itself an embedding_bag, with one bag per
    table row holding the examples that read it. ``rows`` must increase along each bag. Several
    tables mixed by the same bags give separate outputs (no concatenated output to split).
    """

    @staticmethod
    def forward(ctx, weights: Tensor, rows: Tensor, *tables: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(weights, rows, *tables)
        return tuple(F.embedding_bag(rows, t, per_sample_weights=weights, mode="sum") for t in tables)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        weights, rows, *tables = ctx.saved_tensors
        n, s = rows.shape
        n_rows = tables[0].shape[0]
        flat = rows.reshape(-1)
        g_weights = None
        if ctx.needs_input_grad[0]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                bags = torch.sparse_csr_tensor(torch.arange(0, n * s + 1, s), flat, weights.reshape(-1), size=(n, n_rows))
                for grad, table in zip(grads, tables):
                    g = torch.sparse.sampled_addmm(bags, grad.contiguous(), table.T, beta=0.0).values()
                    g_weights = g if g_weights is None else g_weights + g
            g_weights = g_weights.view(n, s)
        g_tables = [None] * len(tables)
        if any(ctx.needs_input_grad[2:]):
            order = flat.argsort()
            offsets = torch.zeros(n_rows, dtype=torch.long)
            offsets[1:] = torch.bincount(flat, minlength=n_rows)[:-1].cumsum(0)
            bag_of, w = order // s, weights.reshape(-1)[order]
            for i, grad in enumerate(grads):
                if ctx.needs_input_grad[2 + i]:
                    g_tables[i] = F.embedding_bag(bag_of, grad.contiguous(), offsets, mode="sum", per_sample_weights=w)
        return (g_weights, None, *g_tables)


class _AttendMix(torch.autograd.Function):
    """Attention read from a score table, then pattern-weighted sums of value-table rows, with
    the backward written out by hand.

    Forward, per example ``b`` and scored position ``p``::

        pattern[b, k, h, p] = softmax over causal keys k of s_flat[idx[b, k, h, p]]
        out_i[b, p] = Σ_(k,h) pattern[b, k, h, p] · ov_i[k_rows[b, k], h] + skip_i[q_rows[b, p]]

    Autograd on the same ops records ~40 small nodes (gathers, permutes, masks, softmax, bmm);
    here the backward is the chain rule in a dozen calls (:func:`_softmax_mix_backward`, then
    one ``index_add_`` into the score table). ``tables`` are ``(ov_i [k*V, h*w_i], skip_i [p*V,
    w_i])`` pairs, flattened; outputs are ``[b, p, w_i]``.
    """

    @staticmethod
    def forward(ctx, scratch: Scratch, s_flat: Tensor, idx: Tensor, masked: Tensor, k_rows: Tensor,
                q_rows: Tensor, *tables: Tensor) -> tuple[Tensor, ...]:
        scores = s_flat.index_select(0, idx.view(-1)).view(idx.shape)           # [b, k, h, p]
        outs, state = _softmax_mix_forward(scores, masked, k_rows, q_rows, tables, scratch.lease())
        ctx.state = (state, idx, s_flat.shape[0])
        return outs

    @staticmethod
    def backward(ctx, *grads: Tensor):
        state, idx, n_scores = ctx.state
        del ctx.state
        g_s, g_tables = _softmax_mix_backward(state, grads)
        g_flat = g_s.new_zeros(n_scores).index_add_(0, idx.view(-1), g_s.view(-1))
        return (None, g_flat, None, None, None, None, *g_tables)


def _softmax_mix_forward(scores: Tensor, masked: Tensor, k_rows: Tensor, q_rows: Tensor,
                         tables: Sequence[Tensor], scratch: _Lease | _Fresh = FRESH,
                         outs_from: _Lease | _Fresh = FRESH) -> tuple[tuple[Tensor, ...], tuple]:
    """Softmax of ``scores [b, k, h, p]`` over causal keys (in place), then the mixing of
    :class:`_AttendMix`: the outputs ``[b, p, w_i]`` and what :func:`_softmax_mix_backward`
    needs. Work tensors come from ``scratch``, the outputs from ``outs_from`` (a caller that keeps
    them internal may pass its lease).

    The layout puts (key, head) before the query position, so each example's pattern is the
    ``[k*h, p]`` matrix that the mixing's ``bmm`` reads transposed and its backward reads as it
    is: no permuted copies.
    """
    B, nk, h, P = scores.shape
    pattern = torch.softmax(scores.masked_fill_(masked, float("-inf")), dim=1)  # one kernel, not five ops
    mix_t = pattern.view(B, nk * h, P)                                         # [b, k*h, p]
    outs, saved_rows = [], []
    for i, (ov, sk) in enumerate(zip(tables[0::2], tables[1::2])):
        w = sk.shape[-1]
        rows = torch.index_select(ov, 0, k_rows.reshape(-1), out=scratch.empty(f"rows{i}", (B * nk, h * w), ov))
        out = torch.index_select(sk, 0, q_rows.reshape(-1), out=outs_from.empty(f"out{i}", (B * P, w), sk))
        outs.append(out.view(B, P, w).baddbmm_(mix_t.transpose(1, 2), rows.view(B, nk * h, w)))
        saved_rows.append(rows.view(B, nk * h, w))                             # [b, k*h, w]
    shapes = [(ov.shape, sk.shape) for ov, sk in zip(tables[0::2], tables[1::2])]
    return tuple(outs), (shapes, k_rows, q_rows, pattern, saved_rows, scratch)


def _softmax_mix_backward(state: tuple, grads: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """:func:`_softmax_mix_forward`'s backward: the scores' gradient ``[b, k, h, p]`` and each
    table's (new tensors)."""
    shapes, k_rows, q_rows, pattern, rows, scratch = state
    B, nk, h, P = pattern.shape
    mix_t = pattern.view(B, nk * h, P)
    g_tables, g_mix = [], None
    for i, (g, r, (ov_shape, sk_shape)) in enumerate(zip(grads, rows, shapes)):
        g = g.contiguous()                                                     # [b, p, w]
        gm = torch.bmm(r, g.transpose(1, 2))                                   # [b, k*h, p]
        g_mix = gm if g_mix is None else g_mix.add_(gm)
        g_rows = torch.bmm(mix_t, g, out=r)           # [b, k*h, w], into the rows (not read again)
        g_ov = g.new_zeros(ov_shape).index_add_(0, k_rows.reshape(-1), g_rows.view(B * nk, -1))
        g_sk = g.new_zeros(sk_shape).index_add_(0, q_rows.reshape(-1), g.view(B * P, -1))
        g_tables += [g_ov, g_sk]
    # Softmax backward, pattern * (g_pattern - Σ_k pattern · g_pattern), in torch's one kernel
    # (a stable internal op since 1.11); masked keys have pattern 0 and so get 0.
    g_s = torch._softmax_backward_data(g_mix.view(B, nk, h, P), pattern, 1, pattern.dtype)
    return g_s, g_tables
