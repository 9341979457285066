"""The table path computes the plain forward's logits and gradients; plan() chooses once."""

from __future__ import annotations

import pytest
import torch
from tl_copies import perturb_biases

from qkov.config import ModelConfig
from qkov.fastpath import Plan, native, plan
from qkov.model import Transformer
from qkov.tasks import get_task


@pytest.fixture
def no_native():
    """The C kernel off: plans made in the test take the table path."""
    old = native.use_native(False)
    yield
    native.use_native(old)


def _randomised(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> Transformer:
    """A model with every parameter random, biases and LayerNorm weights included."""
    model = Transformer(cfg, seed=seed).to(dtype)
    perturb_biases(model, seed)
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
@pytest.mark.parametrize("batch", [64, 2])
def test_table_path_equals_plain_forward(cfg, positions, seed, dtype, batch, no_native):
    cfg = ModelConfig(n_layers=1, **cfg)
    model = _randomised(cfg, dtype, seed)
    gen = torch.Generator().manual_seed(100 + seed)
    tokens = torch.randint(0, cfg.d_vocab, (batch, cfg.n_ctx), generator=gen)
    weights = torch.randn(batch, len(positions), cfg.vocab_out, generator=gen, dtype=dtype)
    fast = plan(model, positions)
    assert fast.kind == "tables"
    plain_logits, plain_grads = _logits_and_grads(model, lambda t: model(t, positions=positions), tokens, weights)
    fast_logits, fast_grads = _logits_and_grads(model, fast.logits, tokens, weights)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fast_logits, plain_logits, **tol)
    assert fast_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_reference_modadd_logits_and_grads_match():
    """The grokking model, the case the fast path exists for, at float32 (allclose 1e-5)."""
    task = get_task("modadd", p=23, train_frac=0.6)
    model = Transformer(task.model_config(), seed=0)
    fast_plan = plan(model, task)
    assert fast_plan.kind == "tables"
    batch = task.dataset("train")
    plain = model(batch.tokens, positions=task.scored_positions)
    fast = fast_plan.logits(batch.tokens)
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
    fast = plan(model, task)
    tokens = task.dataset("all").tokens
    with torch.no_grad():
        model.blocks[0].mlp.W_in.mul_(2.0)
        model.embed.W_E.add_(0.1)
    torch.testing.assert_close(fast.logits(tokens), model(tokens, positions=[2]), rtol=1e-5, atol=1e-5)


def test_plan_chooses_once_by_model_and_task():
    """The plain forward wherever the tables do not apply; the C kernel only for float32
    attention-only models on the CPU with the standard loss, where it was built."""
    two_layers = Transformer(ModelConfig(n_layers=2, d_vocab=8, n_ctx=4))
    assert plan(two_layers, [3]).kind == "plain"
    induction = get_task("induction", n_ctx=8, max_seg=4)
    assert plan(Transformer(ModelConfig(d_vocab=8, n_ctx=8)), induction).kind == "plain"   # positions vary
    assert plan(Transformer(ModelConfig(d_vocab=8, n_ctx=4)), [4]).kind == "plain"          # outside n_ctx
    assert plan(torch.nn.Linear(2, 2), [0]).kind == "plain"
    max_task = get_task("max")
    model = Transformer(max_task.model_config())
    assert plan(model, max_task).kind == ("native" if native.available() else "tables")
    assert plan(model.double(), max_task).kind == "tables"                                # float64 weights
    assert plan(Transformer(get_task("add").model_config()), get_task("add")).kind == "tables"
    assert plan(Transformer(max_task.model_config().replace(normalization="LN")), max_task).kind == "tables"
    assert isinstance(plan(model, max_task), Plan)


def test_plain_plan_loss_reads_only_rows_with_a_target():
    """Positions that vary by example (induction): the loss is the task's loss over every target."""
    task = get_task("induction", n_ctx=12, max_seg=4, vocab=16)
    model = Transformer(task.model_config().replace(d_model=16, n_heads=2), seed=0)
    batch = task.sample(8, torch.Generator().manual_seed(0))
    p = plan(model, task)
    assert p.kind == "plain" and p.positions is None
    want = task.loss(model(batch.tokens), batch.targets)
    torch.testing.assert_close(p.loss(batch), want)


def test_gradients_train_the_same_model():
    """Ten AdamW steps through either path end at the same weights (float64)."""
    task = get_task("modadd", p=11, train_frac=0.5)
    cfg = task.model_config().replace(d_model=32, d_head=8, d_mlp=64)
    batch = task.dataset("train")
    finals = []
    for fast in (False, True):
        model = Transformer(cfg, seed=0).double()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1.0)
        fn = plan(model, task).logits if fast else (lambda t, model=model: model(t, positions=[2]))
        for _ in range(10):
            loss = torch.nn.functional.cross_entropy(fn(batch.tokens)[:, 0], batch.targets[:, 2])
            opt.zero_grad()
            loss.backward()
            opt.step()
        finals.append(model.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], rtol=1e-8, atol=1e-9)


def test_table_plan_loss_and_grads_equal_the_plain_plan(no_native):
    """An MLP model (add) and a float64 max model: the task's loss of the table logits."""
    for name, dtype in (("add", torch.float32), ("max", torch.float64)):
        task = get_task(name, max_sum=20) if name == "add" else get_task(name)
        model = Transformer(task.model_config(), seed=0).to(dtype)
        batch = task.dataset("train") if task.finite else task.sample(128, torch.Generator().manual_seed(0))
        results = []
        for p in (plan(model, task), Plan(model, task.scored_positions, task.loss)):
            model.zero_grad(set_to_none=True)
            loss = p.loss_and_grads(batch)
            assert loss.grad_fn is None
            results.append((loss, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}))
        (fast, fast_grads), (plain, plain_grads) = results
        torch.testing.assert_close(fast, plain)
        assert fast_grads.keys() == plain_grads.keys()
        for n in plain_grads:
            torch.testing.assert_close(fast_grads[n], plain_grads[n], rtol=1e-4, atol=1e-6)


def test_losses_are_never_below_zero_even_when_the_model_is_sure():
    # A converged model puts nearly all its mass on the answer; rounding once made its NLL
    # -4e-6 (and a converged modadd run recorded a loss of -7.8e-8).
    import torch.nn.functional as F

    from qkov.tasks import nll_and_prediction

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 23, generator=g) * 3
    logits[:, 5] += 20 + 40 * torch.rand(20000, generator=g)
    targets = torch.full((20000,), 5)
    nll, _ = nll_and_prediction(logits, targets)
    assert (nll >= 0).all()
    ref = F.cross_entropy(logits.double(), targets, reduction="none")
    torch.testing.assert_close(nll.double(), ref, atol=1e-5, rtol=0)
    # Every plan, on a max model made sure of its own predictions (the C kernel where it is built).
    task = get_task("max")
    model = Transformer(task.model_config(), seed=0)
    with torch.no_grad():
        model.unembed.W_U.mul_(300)
    batch = task.sample(512, g)
    answers = model(batch.tokens, positions=task.scored_positions).argmax(-1)      # [b, p]
    for p in (plan(model, task), Plan(model, task.scored_positions, task.loss)):
        nll, pred = p.nll_and_prediction(batch.tokens, answers)
        assert (nll >= 0).all() and (pred == answers).all(), p.kind
