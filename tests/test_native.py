"""The C kernel (qkov.fastpath._native) computes what the table path and the plain forward do,
on generated shapes, and is never handed a tensor it cannot read."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tl_copies import perturb_biases

import qkov
from qkov.config import ModelConfig
from qkov.fastpath import Plan, native, plan
from qkov.fastpath.factored import Buffers, build_tables
from qkov.model import Transformer
from qkov.tasks import IGNORE, Batch, get_task


@pytest.fixture
def kernels():
    """``kernels(on)`` switches the C kernels on or off for the rest of the test."""
    old = native.use_native(True)
    yield native.use_native
    native.use_native(old)


def _random_model(cfg: ModelConfig, seed: int) -> Transformer:
    model = Transformer(cfg, seed=seed)
    perturb_biases(model, seed)
    return model


def _loss_and_grads(model, p: Plan, batch: Batch):
    model.zero_grad(set_to_none=True)
    loss = p.loss_and_grads(batch)
    return loss, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}


def _batch(tokens, targets, positions) -> Batch:
    """A batch whose targets at ``positions`` are ``targets`` (IGNORE elsewhere)."""
    full = torch.full_like(tokens, IGNORE)
    full[:, positions] = targets
    return Batch(tokens, full, full != IGNORE)


def _plans(model, positions, kernels):
    """The C plan, the table plan and the plain plan of one model."""
    kernels(True)
    c = plan(model, positions)
    kernels(False)
    tables = plan(model, positions)
    kernels(True)
    assert (c.kind, tables.kind) == ("native", "tables")
    return c, tables, Plan(model, positions, tables._loss)


def _assert_same_loss_and_grads(model, plans, batch, rtol=1e-4, atol=1e-6):
    (c_loss, c_grads), *others = [_loss_and_grads(model, p, batch) for p in plans]
    for loss, grads in others:
        if torch.isnan(loss):
            assert torch.isnan(c_loss)
            continue
        torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
        assert c_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(c_grads[name], grads[name], rtol=rtol, atol=atol,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_the_c_kernels_were_built():
    assert native._native is not None, (
        "qkov.fastpath._native is missing: qkov was installed without a C compiler; "
        "install gcc (or cc) and reinstall with pip install -e ."
    )
    assert native.available()


CASES = [
    # (model config, scored positions, batch): heads, non-consecutive queries, d_vocab_out < d_vocab,
    # a batch that is not a multiple of the kernels' block of 32
    (dict(n_heads=1, d_model=32, d_vocab=64, n_ctx=6), [1, 2, 3, 4, 5], 512),
    (dict(n_heads=3, d_model=12, d_head=4, d_vocab=7, d_vocab_out=5, n_ctx=7), [1, 3, 4], 45),
    (dict(n_heads=2, d_model=16, d_vocab=9, n_ctx=4), [0, 1, 2, 3], 70),
    (dict(n_heads=2, d_model=16, d_vocab=20, n_ctx=5, use_bias=False), [2, 4], 33),
]


@pytest.mark.parametrize("cfg, positions, batch", CASES)
@pytest.mark.parametrize("ignored", [False, True])
def test_loss_and_gradients_equal_the_table_path_and_the_plain_forward(kernels, cfg, positions, batch, ignored):
    cfg = ModelConfig(n_layers=1, d_mlp=None, **cfg)
    model = _random_model(cfg, seed=batch)
    gen = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, cfg.d_vocab, (batch, cfg.n_ctx), generator=gen)
    targets = torch.randint(0, cfg.vocab_out, (batch, len(positions)), generator=gen)
    if ignored:
        targets[::3, 0] = IGNORE
        targets[1] = IGNORE
    _assert_same_loss_and_grads(model, _plans(model, positions, kernels), _batch(tokens, targets, positions))


@pytest.mark.parametrize("cfg, positions, batch", CASES)
def test_eval_nll_and_argmax_equal_the_plain_forward(kernels, cfg, positions, batch):
    cfg = ModelConfig(n_layers=1, d_mlp=None, **cfg)
    model = _random_model(cfg, seed=batch)
    gen = torch.Generator().manual_seed(batch + 1)
    tokens = torch.randint(0, cfg.d_vocab, (batch, cfg.n_ctx), generator=gen)
    targets = torch.randint(0, cfg.vocab_out, (batch, len(positions)), generator=gen)
    targets[::4] = IGNORE                                      # read as class 0
    nll, pred = plan(model, positions).nll_and_prediction(tokens, targets)
    logits = model(tokens, positions=positions).detach()
    assert torch.equal(pred, logits.argmax(-1))
    want = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(nll, want, rtol=1e-5, atol=1e-5)


@st.composite
def _problems(draw):
    """A random attention-only model, scored positions and a batch: heads 1-4, key positions
    1-8, vocabularies 2-70, batches 1-100 (rarely a multiple of 32), ignored targets."""
    n_ctx = draw(st.integers(1, 8))
    n_heads = draw(st.integers(1, 4))
    d_vocab = draw(st.integers(2, 70))
    cfg = ModelConfig(n_layers=1, d_mlp=None, n_heads=n_heads, d_model=4 * n_heads, d_vocab=d_vocab,
                      d_vocab_out=draw(st.integers(2, 70)), n_ctx=n_ctx, use_bias=draw(st.booleans()))
    positions = sorted(draw(st.sets(st.integers(0, n_ctx - 1), min_size=1, max_size=n_ctx)))
    batch = draw(st.integers(1, 100))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (batch, n_ctx + draw(st.integers(0, 1)) if n_ctx < 8 else n_ctx), generator=gen)
    targets = torch.randint(0, cfg.vocab_out, (batch, len(positions)), generator=gen)
    ignored = torch.rand(targets.shape, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    return cfg.replace(n_ctx=tokens.shape[1]), positions, tokens, targets.masked_fill(ignored, IGNORE), seed


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=_problems())
def test_generated_shapes_agree_across_all_three_paths(kernels, problem):
    """Property: on every generated shape the C kernel's loss, gradients, NLL and argmax equal
    the table path's and the plain forward's."""
    cfg, positions, tokens, targets, seed = problem
    model = _random_model(cfg, seed)
    plans = _plans(model, positions, kernels)
    _assert_same_loss_and_grads(model, plans, _batch(tokens, targets, positions), rtol=1e-3, atol=1e-5)
    nll, pred = plans[0].nll_and_prediction(tokens, targets)
    logits = model(tokens, positions=positions).detach()
    want = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(nll, want, rtol=1e-4, atol=1e-4)
    top = logits.amax(-1)
    # The first argmax, or a logit within rounding of the maximum (near-ties may break either way).
    assert bool(((pred == logits.argmax(-1)) | (logits.gather(-1, pred[..., None])[..., 0] >= top - 1e-5)).all())


def test_frozen_parameters_get_no_gradient(kernels):
    """use_bias=False freezes the biases: the C plan leaves their .grad None, as autograd does."""
    task = get_task("max")
    model = Transformer(task.model_config().replace(use_bias=False), seed=0)
    batch = task.sample(64, torch.Generator().manual_seed(0))
    p = plan(model, task)
    assert p.kind == "native"
    p.loss_and_grads(batch)
    for name, q in model.named_parameters():
        assert (q.grad is None) == (not q.requires_grad), name


def test_a_model_on_another_device_never_reaches_the_c_kernel(kernels, monkeypatch):
    """A model not on the CPU gets the table path; a CPU plan whose model was moved afterwards
    is stopped by the one check before any address is taken."""
    task = get_task("max")
    model = Transformer(task.model_config(), seed=0)
    stale = plan(model, task)
    assert stale.kind == "native"
    calls = []
    monkeypatch.setattr(native, "_native", type("Spy", (), {
        "loss_and_grads": lambda *a: calls.append(a), "nll_and_prediction": lambda *a: calls.append(a)}))
    model.to("meta")
    assert plan(model, task).kind == "tables"
    batch = task.sample(8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="reads CPU tensors only; scores is on meta"):
        stale.loss_and_grads(batch)
    with pytest.raises(ValueError, match="CPU tensors only"):
        native.nll_and_prediction(tuple(torch.zeros(1, 2, 2, device="meta") for _ in range(3)),
                                  batch.tokens, batch.targets, torch.tensor([0]))
    assert calls == []


def test_argmax_breaks_ties_at_the_first_maximum_as_torch_does(kernels):
    """With the unembedding zeroed every logit is equal: torch's argmax says 0, the NLL is log w."""
    task = get_task("max")
    model = Transformer(task.model_config(), seed=0)
    with torch.no_grad():
        model.unembed.W_U.zero_()
        model.unembed.b_U.zero_()
        model.unembed.b_U[[7, 40]] = 1.0                      # two tied maxima: the first wins
    batch = task.sample(100, torch.Generator().manual_seed(0))
    targets = batch.targets[:, task.scored_positions]
    nll, pred = plan(model, task).nll_and_prediction(batch.tokens, targets)
    assert torch.equal(pred, torch.full_like(pred, 7))
    logits = model(batch.tokens, positions=task.scored_positions).detach()
    assert torch.equal(logits.argmax(-1), pred)
    torch.testing.assert_close(nll, -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0])


def _max_tables(batch: int = 8):
    task = get_task("max")
    model = Transformer(task.model_config(), seed=0)
    path = plan(model, task).path
    with torch.no_grad():
        tables, _ = build_tables(path, plan(model, task)._params(), Buffers())
    b = task.sample(batch, torch.Generator().manual_seed(0))
    return path, tables, b.tokens, b.targets[:, task.scored_positions].clone()


def test_out_of_range_indices_and_bad_tensors_are_refused_before_the_kernel(kernels):
    path, tables, tokens, targets = _max_tables()
    grads = [torch.empty_like(t) for t in tables]
    pos = path.pos_idx
    bad = targets.clone()
    bad[3, 2] = 64
    with pytest.raises(ValueError, match=r"targets from \d+ to 64 are outside 0\.\.63"):
        native.loss_and_grads(tables, tokens, bad, pos, grads)
    with pytest.raises(ValueError, match=r"targets from \d+ to 64 are outside 0\.\.63"):
        native.nll_and_prediction(tables, tokens, bad, pos)
    bad_tokens = tokens.clone()
    bad_tokens[0, 0] = -1
    with pytest.raises(ValueError, match=r"token ids from -1 to \d+ are outside 0\.\.63"):
        native.loss_and_grads(tables, bad_tokens, targets, pos, grads)
    with pytest.raises(ValueError, match="do not fit"):
        native.loss_and_grads(tables, tokens, targets[:, :2], pos, grads)
    with pytest.raises(ValueError, match="does not match its table"):
        native.loss_and_grads(tables, tokens, targets, pos, [grads[1], grads[0], grads[2]])
    with pytest.raises(ValueError, match="must be int64"):
        native.nll_and_prediction(tables, tokens.int(), targets, pos)
    with pytest.raises(ValueError, match="contiguous float32"):
        native.nll_and_prediction((tables[0].double(), tables[1], tables[2]), tokens, targets, pos)
    with pytest.raises(ValueError, match="contiguous float32"):
        native.nll_and_prediction((tables[0].transpose(1, 2), tables[1], tables[2]), tokens, targets, pos)
    with pytest.raises(ValueError, match="outside the 6 key positions"):
        native.nll_and_prediction(tables, tokens, targets, pos + 1)


def test_no_target_at_all_gives_nan_as_cross_entropy_does(kernels):
    path, tables, tokens, targets = _max_tables()
    grads = [torch.empty_like(t) for t in tables]
    loss = native.loss_and_grads(tables, tokens, torch.full_like(targets, IGNORE), path.pos_idx, grads)
    want = torch.nn.functional.cross_entropy(torch.zeros(3, 4), torch.full((3,), IGNORE), ignore_index=IGNORE)
    assert torch.isnan(torch.tensor(loss)) and torch.isnan(want)
    assert all(int(g.count_nonzero()) == 0 for g in grads)


def test_the_max_model_trains_to_its_target_with_or_without_the_c_kernel(kernels):
    task = get_task("max")
    cfg = task.train_config().replace(target_accuracy=0.999, checkpoint_every=0)
    finals = {}
    for on in (True, False):
        kernels(on)
        run = qkov.train(task, seed=0, train_config=cfg, quiet=True)
        finals[on] = run.final
        assert min(g["accuracy"] for g in run.final["by_length"].values()) >= 0.999
    assert finals[True]["step"] == finals[False]["step"]
    assert abs(finals[True]["loss"] - finals[False]["loss"]) < 0.05 * finals[False]["loss"]


def test_qkov_native_0_switches_the_c_kernels_off():
    code = "from qkov.fastpath import native; print(native.available())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "QKOV_NATIVE": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
