"""The fast one-layer training path computes the plain forward's logits and gradients."""

from __future__ import annotations

import pytest
import torch

from qkov.config import ModelConfig
from qkov.fastpath import native, scored_logits_fn, scored_loss_fn
from qkov.model import Transformer
from qkov.tasks import IGNORE, get_task


@pytest.fixture(params=["native", "torch"])
def kernels(request):
    """Run the test with the C kernels (``fastpath/native.py``), then with the torch kernels."""
    old = native.use_native(request.param == "native")
    if request.param == "native":
        assert native.available(), "the C kernels were not built: reinstall qkov where a C compiler is present"
    yield request.param
    native.use_native(old)


@pytest.fixture
def torch_kernels():
    old = native.use_native(False)
    yield
    native.use_native(old)


def _randomised(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> Transformer:
    """A model with every parameter random, biases and LayerNorm weights included."""
    model = Transformer(cfg, seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.split(".")[-1].startswith("W_"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=dtype))
    return model


def _logits_and_grads(model, fn, tokens, weights):
    model.zero_grad(set_to_none=True)
    logits = fn(tokens)
    (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


CONFIGS = [
    # (config, scored positions)
    (dict(n_heads=3, d_model=12, d_head=5, d_mlp=24, d_vocab=11, d_vocab_out=7, n_ctx=5, act_fn="gelu"), [1, 3]),
    (dict(n_heads=2, d_model=16, d_mlp=None, d_vocab=9, n_ctx=4), [0, 1, 2, 3]),
    (dict(n_heads=2, d_model=16, d_mlp=20, d_vocab=9, n_ctx=4, normalization="LN"), [2]),
    (dict(n_heads=1, d_model=8, d_mlp=None, d_vocab=6, n_ctx=6, normalization="LN"), [1, 5]),
    (dict(n_heads=4, d_model=16, d_head=4, d_mlp=32, d_vocab=12, d_vocab_out=11, n_ctx=3, use_bias=False), [2]),
    (dict(n_heads=3, d_model=12, d_head=4, d_mlp=None, d_vocab=7, d_vocab_out=5, n_ctx=7), [1, 3, 4]),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cfg, positions", CONFIGS)
@pytest.mark.parametrize("batch", [64, 2])  # 64: scores from the score table; 2: per-example dot products
def test_fast_path_equals_plain_forward(cfg, positions, seed, dtype, batch):
    cfg = ModelConfig(n_layers=1, **cfg)
    model = _randomised(cfg, dtype, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    tokens = torch.randint(0, cfg.d_vocab, (batch, cfg.n_ctx), generator=gen)
    weights = torch.randn(batch, len(positions), cfg.vocab_out, generator=gen, dtype=dtype)
    fast = scored_logits_fn(model, positions)
    assert fast is not None
    plain_logits, plain_grads = _logits_and_grads(model, lambda t: model(t, positions=positions), tokens, weights)
    fast_logits, fast_grads = _logits_and_grads(model, fast, tokens, weights)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast_logits, plain_logits, **tol)
    assert fast_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_reference_modadd_logits_and_grads_match():
    """The grokking model, the case the fast path exists for, at float32 (allclose 1e-5)."""
    task = get_task("modadd", p=23, train_frac=0.6)
    model = Transformer(task.model_config(), seed=0)
    fn = scored_logits_fn(model, task)
    batch = task.dataset("train")
    plain = model(batch.tokens, positions=task.scored_positions)
    fast = fn(batch.tokens)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    grads = []
    for logits in (plain, fast):
        model.zero_grad(set_to_none=True)
        task.loss(logits, batch.targets[:, task.scored_positions]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-5)


def test_fast_path_reads_live_parameters():
    task = get_task("modadd", p=7)
    model = Transformer(task.model_config(), seed=0)
    fn = scored_logits_fn(model, task)
    tokens = task.dataset("all").tokens
    with torch.no_grad():
        model.blocks[0].mlp.W_in.mul_(2.0)
        model.embed.W_E.add_(0.1)
    torch.testing.assert_close(fn(tokens), model(tokens, positions=[2]), rtol=1e-5, atol=1e-5)


def test_not_applicable_returns_none():
    two_layers = Transformer(ModelConfig(n_layers=2, d_vocab=8, n_ctx=4))
    assert scored_logits_fn(two_layers, [3]) is None
    induction = get_task("induction", n_ctx=8, max_seg=4)
    assert scored_logits_fn(Transformer(ModelConfig(d_vocab=8, n_ctx=4)), induction) is None
    assert scored_logits_fn(Transformer(ModelConfig(d_vocab=8, n_ctx=4)), [4]) is None
    assert scored_logits_fn(torch.nn.Linear(2, 2), [0]) is None


def test_gradients_train_the_same_model():
    """Ten AdamW steps through either path end at the same weights (float64)."""
    task = get_task("modadd", p=11, train_frac=0.5)
    cfg = task.model_config().replace(d_model=32, d_head=8, d_mlp=64)
    batch = task.dataset("train")
    finals = []
    for fast in (False, True):
        model = Transformer(cfg, seed=0).double()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1.0)
        fn = scored_logits_fn(model, task) if fast else (lambda t, model=model: model(t, positions=[2]))
        for _ in range(10):
            loss = torch.nn.functional.cross_entropy(fn(batch.tokens)[:, 0], batch.targets[:, 2])
            opt.zero_grad()
            loss.backward()
            opt.step()
        finals.append(model.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=1e-8, atol=1e-9)


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ignored", [False, True])
def test_fused_attention_only_loss_equals_cross_entropy_of_the_plain_forward(seed, ignored, kernels):
    """The max model's training loss (cross-entropy fused into the hand-written kernel) and its
    gradients equal task.loss of model(tokens, positions=...), with and without ignored targets."""
    task = get_task("max")
    pos = task.scored_positions
    model = _randomised(task.model_config().replace(n_heads=2, d_head=8), torch.float32, seed)
    batch = task.sample(256, torch.Generator().manual_seed(seed))
    targets = batch.targets[:, pos].clone()
    if ignored:
        targets[::3, 1] = IGNORE
        targets[5] = IGNORE
    fused_fn = scored_loss_fn(model, task)
    assert type(fused_fn(batch.tokens, targets).grad_fn).__name__ == "_AttnOnlyLossBackward"
    plain_loss, plain_grads = _loss_and_grads(model, lambda: task.loss(model(batch.tokens, positions=pos), targets))
    fused_loss, fused_grads = _loss_and_grads(model, lambda: fused_fn(batch.tokens, targets))
    # grads=True: the trainer's form, gradients written by the kernel itself (no autograd).
    model.zero_grad(set_to_none=True)
    direct_loss = scored_loss_fn(model, task, grads=True)(batch.tokens, targets)
    assert direct_loss.grad_fn is None and not direct_loss.requires_grad
    direct_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(direct_loss, fused_loss, rtol=0, atol=0)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys() == direct_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(direct_grads[name], fused_grads[name], rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_loss_fn_falls_back_to_the_task_loss_where_nothing_is_fused():
    """An MLP model (add) and a float64 max model go through task.loss of the fast logits."""
    add = get_task("add", max_sum=20)
    model = Transformer(add.model_config(), seed=0)
    batch = add.dataset("train")
    t = batch.targets[:, add.scored_positions]
    want = add.loss(model(batch.tokens, positions=add.scored_positions), t)
    torch.testing.assert_close(scored_loss_fn(model, add)(batch.tokens, t), want)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(scored_loss_fn(model, add, grads=True)(batch.tokens, t), want.detach())
    assert model.blocks[0].mlp.W_in.grad is not None
    task = get_task("max")
    model = Transformer(task.model_config(), seed=0).double()
    batch = task.sample(128, torch.Generator().manual_seed(0))
    t = batch.targets[:, task.scored_positions]
    want = task.loss(model(batch.tokens, positions=task.scored_positions), t)
    torch.testing.assert_close(scored_loss_fn(model, task)(batch.tokens, t), want)


def test_reused_work_buffers_never_mix_two_pending_backwards(kernels):
    """Two forwards before either backward: the second cannot borrow the first's work tensors
    (Scratch leases), so both give their own gradients, equal to separate runs."""
    task = get_task("max")
    pos = task.scored_positions
    model = Transformer(task.model_config(), seed=0)
    fn = scored_loss_fn(model, task)
    b1, b2 = (task.sample(512, torch.Generator().manual_seed(s)) for s in (1, 2))
    singles = [_loss_and_grads(model, lambda b=b: fn(b.tokens, b.targets[:, pos]))[1] for b in (b1, b2)]
    model.zero_grad(set_to_none=True)
    l1 = fn(b1.tokens, b1.targets[:, pos])
    l2 = fn(b2.tokens, b2.targets[:, pos])
    l2.backward()
    l1.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, singles[0][name] + singles[1][name], rtol=1e-5, atol=1e-7)


def test_work_buffers_stay_within_their_budget_across_many_batch_sizes(torch_kernels):
    """The fast path reuses work tensors between calls; calling it with ever new batch sizes
    neither grows them without bound nor changes a result. (The torch kernels: the C kernels'
    buffers do not depend on the batch.)"""
    from qkov.fastpath.kernels import _SCRATCH_BUDGET

    task = get_task("max")
    model = Transformer(task.model_config(), seed=0)
    fn = scored_logits_fn(model, task)
    gen = torch.Generator().manual_seed(0)
    kept = []
    for batch in range(300, 3000, 97):
        sample = task.sample(batch, gen)
        tokens, targets = sample.tokens, sample.targets[:, task.scored_positions]
        nll, pred = fn.nll_and_prediction(tokens, targets)
        logits = model(tokens, positions=task.scored_positions)
        assert torch.equal(pred, logits.argmax(-1))
        want = -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        torch.testing.assert_close(nll, want, rtol=1e-4, atol=1e-5)
        kept.append(fn.scratch.nbytes)
        assert fn.scratch.nbytes == sum(b.numel() * b.element_size() for b in fn.scratch.bufs.values())
    assert max(kept) <= _SCRATCH_BUDGET
    assert any(b < a for a, b in zip(kept, kept[1:]))          # it was emptied, not grown
