"""The C kernels (qkov.fastpath._native) compute what the torch kernels and the plain forward do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import qkov
from qkov.config import ModelConfig
from qkov.fastpath import native, scored_logits_fn, scored_loss_fn
from qkov.fastpath.attn_only import _tables
from qkov.model import Transformer
from qkov.tasks import IGNORE, get_task


@pytest.fixture
def kernels():
    """``kernels(on)`` switches the C kernels on or off for the rest of the test."""
    old = native.use_native(True)
    yield native.use_native
    native.use_native(old)


def _random_model(cfg: ModelConfig, seed: int) -> Transformer:
    model = Transformer(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _loss_and_grads(model, fn, tokens, targets):
    model.zero_grad(set_to_none=True)
    loss = fn(tokens, targets)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


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
def test_loss_and_gradients_equal_the_torch_kernels_and_the_plain_forward(kernels, cfg, positions, batch, ignored):
    cfg = ModelConfig(n_layers=1, d_mlp=None, **cfg)
    model = _random_model(cfg, seed=batch)
    gen = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, cfg.d_vocab, (batch, cfg.n_ctx), generator=gen)
    targets = torch.randint(0, cfg.vocab_out, (batch, len(positions)), generator=gen)
    if ignored:
        targets[::3, 0] = IGNORE
        targets[1] = IGNORE
    task = get_task("max")          # a task whose loss is the base cross-entropy
    fn = scored_loss_fn(model, task, scored_logits_fn(model, positions), grads=True)
    results = {}
    for on in (True, False):
        kernels(on)
        results[on] = _loss_and_grads(model, fn, tokens, targets)
    plain = task.loss(model(tokens, positions=positions), targets)
    model.zero_grad(set_to_none=True)
    plain.backward()
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[True][0], plain.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(results[True][1][name], results[False][1][name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
            torch.testing.assert_close(results[True][1][name], p.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("cfg, positions, batch", CASES)
def test_eval_nll_and_argmax_equal_the_plain_forward(kernels, cfg, positions, batch):
    cfg = ModelConfig(n_layers=1, d_mlp=None, **cfg)
    model = _random_model(cfg, seed=batch)
    gen = torch.Generator().manual_seed(batch + 1)
    tokens = torch.randint(0, cfg.d_vocab, (batch, cfg.n_ctx), generator=gen)
    targets = torch.randint(0, cfg.vocab_out, (batch, len(positions)), generator=gen)
    targets[::4] = IGNORE                                      # read as class 0
    nll, pred = scored_logits_fn(model, positions).nll_and_prediction(tokens, targets)
    logits = model(tokens, positions=positions).detach()
    assert torch.equal(pred, logits.argmax(-1))
    want = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(nll, want, rtol=1e-5, atol=1e-5)


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
    nll, pred = scored_logits_fn(model, task).nll_and_prediction(batch.tokens, targets)
    assert torch.equal(pred, torch.full_like(pred, 7))
    logits = model(batch.tokens, positions=task.scored_positions).detach()
    assert torch.equal(logits.argmax(-1), pred)
    torch.testing.assert_close(nll, -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0])


def _max_tables(batch: int = 8):
    task = get_task("max")
    model = Transformer(task.model_config(), seed=0)
    fn = scored_logits_fn(model, task)
    with torch.no_grad():
        tabs, _ = _tables(fn, fn._attn_only_params(), fn.scratch.lease())
    b = task.sample(batch, torch.Generator().manual_seed(0))
    return task, fn, tabs, b.tokens, b.targets[:, task.scored_positions].clone()


def test_out_of_range_targets_and_tokens_raise_instead_of_reading_outside_the_tables(kernels):
    task, fn, tabs, tokens, targets = _max_tables()
    grads = [torch.empty_like(t) for t in tabs]
    bad = targets.clone()
    bad[3, 2] = 64
    with pytest.raises(IndexError, match=r"a target is outside 0\.\.63"):
        native.loss_and_grads(*tabs, tokens, bad, fn.pos_idx, *grads)
    with pytest.raises(IndexError, match=r"a target is outside 0\.\.63"):
        native.nll_and_prediction(*tabs, tokens, bad, fn.pos_idx)
    bad_tokens = tokens.clone()
    bad_tokens[0, 0] = -1
    with pytest.raises(ValueError, match=r"a token is outside 0\.\.63"):
        native.loss_and_grads(*tabs, bad_tokens, targets, fn.pos_idx, *grads)
    with pytest.raises(ValueError, match="do not fit"):
        native.loss_and_grads(*tabs, tokens, targets[:, :2], fn.pos_idx, *grads)
    with pytest.raises(ValueError, match="does not match its table"):
        native.loss_and_grads(*tabs, tokens, targets, fn.pos_idx, grads[1], grads[0], grads[2])


def test_no_target_at_all_gives_nan_as_cross_entropy_does(kernels):
    _, fn, tabs, tokens, targets = _max_tables()
    grads = [torch.empty_like(t) for t in tabs]
    loss = native.loss_and_grads(*tabs, tokens, torch.full_like(targets, IGNORE), fn.pos_idx, *grads)
    want = torch.nn.functional.cross_entropy(torch.zeros(3, 4), torch.full((3,), IGNORE), ignore_index=IGNORE)
    assert torch.isnan(torch.tensor(loss)) and torch.isnan(want)
    assert all(int(g.count_nonzero()) == 0 for g in grads)


def test_the_max_model_trains_to_its_target_with_either_kernel(kernels):
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
