"""The C kernels on random table shapes, against a naive float64 torch reference.

tools/sanitize_native.sh (run by .ci/run) runs this file and tests/test_native.py against a build
of ``_native.c`` with AddressSanitizer and UndefinedBehaviorSanitizer; the shapes here reach what
the model-level tests do not (one head or four, one key position or eight, two tokens or 70,
one output class, batches of 1 to 100 around the kernels' block of 32, strided targets, ignored
targets), each table in its own allocation so that a read past its end lands in a redzone.
In the plain suite they are a cheap check of the kernels' maths at the table level.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

IGNORE = -100

# The module itself, not fastpath/native.py's wrapper: the raw calls documented in _native.c's
# method table, on inputs that are valid by construction.
_native = pytest.importorskip("qkov.fastpath._native", reason="qkov.fastpath._native was not built")


def _args(s2, ov, skip, tokens, targets, pos) -> tuple:
    h, R, C = s2.shape
    P, w = len(pos), skip.shape[1]
    V = C - P
    return (s2.data_ptr(), ov.data_ptr(), skip.data_ptr(), tokens.data_ptr(), *tokens.stride(),
            targets.data_ptr(), *targets.stride(), pos.data_ptr(), len(tokens), R // V, P, V, h, w)


def loss_and_grads(s2, ov, skip, tokens, targets, pos, g_s2, g_ov, g_skip) -> float:
    args = _args(s2, ov, skip, tokens, targets, pos)
    return _native.loss_and_grads(*args, g_s2.data_ptr(), g_ov.data_ptr(), g_skip.data_ptr(), 0)


def nll_and_prediction(s2, ov, skip, tokens, targets, pos):
    nll = torch.empty(targets.shape, dtype=torch.float32)
    pred = torch.empty(targets.shape, dtype=torch.int64)
    _native.nll_and_prediction(*_args(s2, ov, skip, tokens, targets, pos), nll.data_ptr(), pred.data_ptr(), 0, 0)
    return nll, pred


def _shapes(n: int, seed: int = 0) -> list[tuple[int, int, int, int, int, int]]:
    """(h, nk, V, w, P, B): the corners, then random ones."""
    g = torch.Generator().manual_seed(seed)

    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    out = [(1, 1, 2, 1, 1, 1), (4, 8, 70, 70, 8, 100), (2, 3, 5, 7, 2, 32), (3, 6, 64, 64, 5, 33),
           (1, 2, 2, 70, 1, 64), (4, 1, 70, 2, 1, 31)]
    while len(out) < n:
        nk = r(1, 8)
        out.append((r(1, 4), nk, r(2, 70), r(1, 70), r(1, nk), r(1, 100)))
    return out


def _problem(h, nk, V, w, P, B, seed):
    g = torch.Generator().manual_seed(seed)
    s2 = torch.randn(h, nk * V, V + P, generator=g)
    ov = torch.randn(nk * V, h * w, generator=g)
    skip = torch.randn(P * V, w, generator=g)
    n_ctx = nk + int(torch.randint(0, 3, (1,), generator=g))        # tokens may run past the keys
    tokens = torch.randint(0, V, (B, n_ctx), generator=g)
    pos = torch.randperm(nk, generator=g)[:P].sort().values
    targets = torch.randint(0, w, (P, B), generator=g).t()           # strided: [B, P] with strides (1, B)
    targets[torch.rand(B, P, generator=g) < 0.3] = IGNORE
    if B > 1:
        targets[int(torch.randint(0, B, (1,), generator=g))] = IGNORE  # an example with no target
    return s2, ov, skip, tokens, targets, pos


def _reference_logits(s2, ov, skip, tokens, pos):
    """[B, P, w] straight from the tables' definitions in _native.c, one scored position at a time."""
    h, R, C = s2.shape
    P = len(pos)
    V, w = C - P, skip.shape[1]
    nk = R // V
    B = len(tokens)
    krow = torch.arange(nk) * V + tokens[:, :nk]                      # [B, nk]
    heads = torch.arange(h)[:, None, None]
    out = []
    for p, q in enumerate(pos.tolist()):
        keys, tq = krow[:, : q + 1], tokens[:, q]
        score = s2[heads, keys[None], tq[None, :, None]] + s2[heads, keys[None], V + p]   # [h, B, q+1]
        pattern = score.softmax(-1)
        values = ov[keys].view(B, q + 1, h, w)
        out.append(skip[p * V + tq] + torch.einsum("hbj,bjhw->bw", pattern, values))
    return torch.stack(out, 1)


@pytest.mark.parametrize("case", range(40))
def test_loss_gradients_nll_and_argmax_equal_a_naive_reference_on_random_shapes(case):
    h, nk, V, w, P, B = shape = _shapes(40)[case]
    s2, ov, skip, tokens, targets, pos = _problem(*shape, seed=case)
    grads = [torch.full_like(t, float("nan")) for t in (s2, ov, skip)]   # the kernel zeroes them itself
    loss = loss_and_grads(s2, ov, skip, tokens, targets, pos, *grads)

    tables = [t.double().requires_grad_() for t in (s2, ov, skip)]
    logits = _reference_logits(*tables, tokens, pos)
    want = F.cross_entropy(logits.reshape(B * P, w), targets.reshape(-1), ignore_index=IGNORE)
    if bool((targets == IGNORE).all()):
        assert loss != loss and all(int(g.count_nonzero()) == 0 for g in grads)
    else:
        want.backward()
        torch.testing.assert_close(torch.tensor(loss, dtype=torch.float64), want.detach(), rtol=1e-5, atol=1e-5)
        for name, got, t in zip(("s2", "ov", "skip"), grads, tables):
            assert bool(torch.isfinite(got).all()), f"{shape}: non-finite gradient of {name}"
            torch.testing.assert_close(got.double(), t.grad, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"{shape} {name}: {m}")

    nll, pred = nll_and_prediction(s2, ov, skip, tokens, targets, pos)
    logits = logits.detach()
    want_nll = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(nll.double(), want_nll, rtol=1e-5, atol=1e-4)
    assert bool(((pred >= 0) & (pred < w)).all())
    at_pred = logits.gather(-1, pred[..., None])[..., 0]              # the first argmax up to float32 rounding
    assert bool((at_pred >= logits.max(-1).values - 1e-4).all()), f"{shape}: a prediction is not a maximum"
