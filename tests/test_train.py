"""The trainer: determinism, bit-exact resume, run directories, NaN handling."""

import json

import pytest
import torch

import qkov
from qkov import QkovError, get_task, store
from qkov.evaluation import Evaluator
from qkov.tasks import configure


def small_max(steps=60, **train):
    task, model_cfg, train_cfg = configure("max", {"eval_every": 20, "checkpoint_every": 20, **train}, steps)
    return task, model_cfg, train_cfg


def weights(model):
    return {k: v.clone() for k, v in store.model_tensors(model).items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_same_weights_different_seed_different():
    task, m, t = small_max(30)
    a = qkov.train(task, seed=1, model_config=m, train_config=t, quiet=True)
    b = qkov.train(task, seed=1, model_config=m, train_config=t, quiet=True)
    c = qkov.train(task, seed=2, model_config=m, train_config=t, quiet=True)
    assert_same(weights(a.model), weights(b.model))
    assert not torch.equal(a.model.W_E, c.model.W_E)


@pytest.mark.parametrize("name,sets", [("max", {}), ("modadd", {"p": 7, "train_frac": 0.5, "batch_size": 8})])
def test_resume_is_bit_exact(tmp_path, name, sets):
    # A constant learning rate, so that a run of 40 steps extended to 60 follows the same
    # schedule as a run of 60 (a cosine schedule is stretched over the steps asked for).
    sets = {"eval_every": 10, "checkpoint_every": 20, "lr_schedule": "constant", **sets}
    task, m, t = configure(name, sets, steps=60)
    straight = qkov.train(task, out=tmp_path / "a", model_config=m, train_config=t, quiet=True)
    # The same run stopped at step 40, then resumed to 60.
    qkov.train(task, out=tmp_path / "b", model_config=m, train_config=t.replace(steps=40), quiet=True)
    resumed = qkov.resume(tmp_path / "b", steps=60, quiet=True)
    assert_same(weights(straight.model), weights(resumed.model))
    assert_same(weights(straight.model), weights(qkov.load(tmp_path / "b")))
    assert [r["step"] for r in resumed.metrics] == [r["step"] for r in straight.metrics]
    assert resumed.metrics[-1]["loss"] == straight.metrics[-1]["loss"]


def test_resume_from_an_interrupted_run_uses_the_last_checkpoint(tmp_path, monkeypatch):
    task, m, t = small_max(60, eval_every=10)  # the reference cosine schedule
    straight = qkov.train(task, out=tmp_path / "a", model_config=m, train_config=t, quiet=True)
    # Kill a run of the same setup at its step-50 eval, ten steps after its last checkpoint.
    evaluate = Evaluator.__call__

    def dies_at_50(self, state, *args):
        if state.step == 50:
            raise KeyboardInterrupt
        return evaluate(self, state, *args)

    monkeypatch.setattr(Evaluator, "__call__", dies_at_50)
    with pytest.raises(KeyboardInterrupt):
        qkov.train(task, out=tmp_path / "b", model_config=m, train_config=t, quiet=True)
    monkeypatch.setattr(Evaluator, "__call__", evaluate)
    with pytest.raises(QkovError, match="did not finish.*--resume"):
        qkov.load(tmp_path / "b")
    resumed = qkov.resume(tmp_path / "b", quiet=True)
    assert_same(weights(straight.model), weights(resumed.model))
    assert [r["step"] for r in resumed.metrics] == [r["step"] for r in straight.metrics]


def test_run_directory_layout_and_round_trip(tmp_path):
    task, m, t = small_max(40)
    run = qkov.train(task, out=tmp_path, model_config=m, train_config=t, quiet=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["task"] == {"name": "max", "vocab": 64, "min_len": 2, "max_len": 6}
    assert cfg["model"]["d_model"] == 32 and cfg["train"]["steps"] == 40 and cfg["qkov_version"] == qkov.__version__
    assert [s for s, _ in store.checkpoint_paths(tmp_path)] == [0, 20, 40]
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 20, 40] and "by_length" in rows[-1]
    loaded = qkov.load(tmp_path)
    assert loaded.cfg == run.model.cfg
    assert_same(weights(run.model), weights(loaded))
    tokens = torch.randint(0, 64, (8, 6))
    torch.testing.assert_close(loaded(tokens), run.model(tokens))
    assert not list(tmp_path.rglob("*.tmp")), "temporary files left behind"


def test_target_accuracy_stops_early():
    task, m, t = small_max(2000, target_accuracy=0.9, eval_every=50, lr=3e-3)
    run = qkov.train(task, model_config=m, train_config=t, quiet=True)
    assert run.final["step"] < 2000
    assert run.final["accuracy"] >= 0.9
    assert min(g["accuracy"] for g in run.final["by_length"].values()) >= 0.9


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    task, m, t = small_max(50, lr=1e30, checkpoint_every=1)
    with pytest.raises(QkovError, match=r"NaN at step \d+.*lower the learning rate.*last good checkpoint"):
        qkov.train(task, out=tmp_path, model_config=m, train_config=t, quiet=True)
    ckpts = store.checkpoint_paths(tmp_path)
    assert ckpts, "the last good checkpoint must stay"
    model = store.load_checkpoint(ckpts[-1][1], m)
    assert all(torch.isfinite(v).all() for v in store.model_tensors(model).values())
    assert not (tmp_path / store.MODEL).exists()


def test_refuses_to_mix_runs_in_one_directory(tmp_path):
    task, m, t = small_max(20)
    qkov.train(task, out=tmp_path, model_config=m, train_config=t, quiet=True)
    with pytest.raises(QkovError, match="different setup"):
        qkov.train(task, out=tmp_path, seed=5, model_config=m, train_config=t, quiet=True)
    assert qkov.load(tmp_path) is not None  # the run that was there is untouched


def test_resume_errors(tmp_path):
    task, m, t = small_max(20)
    qkov.train(task, out=tmp_path, model_config=m, train_config=t, quiet=True)
    with pytest.raises(QkovError, match="already ran 20 steps.*--steps"):
        qkov.resume(tmp_path)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch_optim(monkeypatch, fused):
    """qkov's AdamW (no torch.optim wrapping) updates exactly as torch.optim.AdamW(fused=True)
    does, and its foreach fallback (torch < 2.4) agrees to float rounding."""
    from qkov import optim

    if fused and not optim._FUSED:
        pytest.skip("this torch has no fused CPU AdamW kernel")
    monkeypatch.setattr(optim, "_FUSED", fused)
    task = get_task("max")
    ours, ref = (qkov.Transformer(task.model_config(), seed=0) for _ in range(2))
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    opts = [(ours, optim.AdamW(params(ours), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.5)),
            (ref, torch.optim.AdamW(params(ref), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.5,
                                    **({"fused": True} if optim._FUSED else {})))]
    gen = torch.Generator().manual_seed(0)
    pos = task.scored_positions
    for step in range(30):
        batch = task.sample(64, gen)
        for model, opt in opts:
            for g in opt.param_groups:
                g["lr"] = 1e-2 * (1 - step / 30)
            opt.zero_grad(set_to_none=True)
            task.loss(model(batch.tokens)[:, pos], batch.targets[:, pos]).backward()
            opt.step()
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        if fused:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_thread_counts_are_refused():
    with pytest.raises(QkovError, match="threads=-1 must be an integer >= 0"):
        get_task("max").train_config().replace(threads=-1)


@pytest.mark.slow
def test_multithreaded_runs_repeat_bit_exactly():
    """Same seed, configs and thread count -> identical weights, also with two threads and the
    plain forward (induction): the embedding's backward once summed in a varying order."""
    task = get_task("induction")
    cfg = task.train_config().replace(steps=30, eval_every=30, threads=2)
    a, b = (qkov.train(task, seed=0, train_config=cfg, quiet=True) for _ in range(2))
    assert_same(weights(a.model), weights(b.model))


def test_nll_and_prediction_match_log_softmax_and_argmax_ties_included():
    from qkov.tasks import nll_and_prediction as _nll_and_prediction

    gen = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(200, 5, 64, generator=gen)
    logits[:20] = logits[:20].round()                                           # many exact ties
    logits[20:30] = 0.0                                                         # all tied: argmax 0
    targets = torch.randint(0, 64, (200, 5), generator=gen)
    nll, pred = _nll_and_prediction(logits, targets)
    torch.testing.assert_close(nll, -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0])
    assert torch.equal(pred, logits.argmax(-1))


def test_evaluating_through_the_fast_path_equals_the_model():
    """The trainer evaluates max through its plan (the C kernel or the table path, at the scored
    positions only); the metrics equal task.evaluate(model) on the full forward."""
    from qkov.fastpath import plan

    task = get_task("max")
    model = qkov.Transformer(task.model_config(), seed=0)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.mul_(3.0)                                      # a less uniform pattern
    fast_plan = plan(model, task)
    assert fast_plan.kind != "plain" and fast_plan.positions == task.scored_positions
    fast, full = task.evaluate(fast_plan), task.evaluate(model)
    assert fast.keys() == full.keys() and fast["by_length"].keys() == full["by_length"].keys()
    assert fast["accuracy"] == full["accuracy"] and fast["n"] == full["n"]
    assert fast["loss"] == pytest.approx(full["loss"], rel=1e-5)
    for length, g in full["by_length"].items():
        assert fast["by_length"][length]["accuracy"] == g["accuracy"]
    with pytest.raises(QkovError, match="reads others"):
        task._measure(fast_plan, task.eval_batch(), [torch.ones_like(task.eval_batch().scored)])
