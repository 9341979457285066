"""Loading run directories: what happens when files are missing, truncated or altered."""

import json
import shutil

import pytest
import torch

import qkov
from qkov import QkovError, store
from qkov.tasks import configure


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    task, m, t = configure("max", {"eval_every": 10}, steps=10)
    qkov.train(task, out=path, model_config=m, train_config=t, quiet=True)
    return path


def copy_run(src, dst):
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
         "truncated or damaged"),
        (lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:50]), "not valid JSON"),
        (lambda d: (d / "model.safetensors").write_bytes(
            (lambda b: b[:-4] + bytes(x ^ 0xFF for x in b[-4:]))((d / "model.safetensors").read_bytes())),
         "does not match the sha256"),
        (lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()),
                        "model": {**json.loads((d / "config.json").read_text())["model"], "d_model": 48}})),
         "different runs or were edited"),
        (lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()),
                        "model": {**json.loads((d / "config.json").read_text())["model"], "n_heads": "two"}})),
         "n_heads='two' must be a positive integer"),
    ],
    ids=["no-model", "no-config", "truncated-model", "truncated-config", "tampered-model", "wrong-shape",
         "bad-value"],
)
def test_damaged_runs_give_one_clear_error(run_dir, tmp_path, damage, message):
    d = copy_run(run_dir, tmp_path)
    damage(d)
    with pytest.raises(QkovError, match=message) as info:
        qkov.load(d)
    assert "\n" not in str(info.value)


def test_missing_directory(tmp_path):
    with pytest.raises(QkovError, match="does not exist"):
        qkov.load(tmp_path / "nope")


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    f = tmp_path / "x.json"
    store.atomic_write_text(f, "old")

    with pytest.raises(TypeError):
        store.atomic_write_bytes(f, object())  # fails mid-write
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "run"
    task, m, t = configure("max", {"eval_every": 5, "checkpoint_every": 5}, steps=15)
    return qkov.train(task, out=path, model_config=m, train_config=t, quiet=True)


def test_checkpoints_yield_fresh_models_in_step_order(ckpt_run):
    pairs = list(store.checkpoints(ckpt_run.path))
    assert [step for step, _ in pairs] == [0, 5, 10, 15]
    assert len({id(model) for _, model in pairs}) == 4               # safe to keep: one model each
    for step, model in pairs:
        f = ckpt_run.path / "checkpoints" / f"step_{step}.safetensors"
        same = store.load_checkpoint(f, ckpt_run.config.model)
        for k, v in store.model_tensors(model).items():
            assert torch.equal(v, store.model_tensors(same)[k])
        assert not model.training
    final = store.model_tensors(ckpt_run.model)
    assert all(torch.equal(v, final[k]) for k, v in store.model_tensors(pairs[-1][1]).items())
    assert not any(torch.equal(v, final[k]) for k, v in store.model_tensors(pairs[0][1]).items()
                   if k == "embed.W_E")                               # step 0 is the initialisation


def test_checkpoints_errors(ckpt_run, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(ckpt_run.path, bare, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(QkovError, match="checkpoints holds no step_N.safetensors checkpoints; train with "
                                        "checkpoints, e.g. qkov train modadd --set checkpoint_every=1000"):
        store.checkpoints(bare)                                       # raised at the call, not later

    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt_run.path, damaged)
    f = damaged / "checkpoints" / "step_10.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    pairs = store.checkpoints(damaged)
    assert [next(pairs)[0], next(pairs)[0]] == [0, 5]
    with pytest.raises(QkovError, match="step_10.safetensors is not a readable safetensors file .* truncated"):
        next(pairs)

    wider = ckpt_run.config.model.replace(d_model=48)
    with pytest.raises(QkovError, match=r"checkpoints/step_0.safetensors has embed.W_E \(64, 32\) but the "
                                        r"model config needs \(64, 48\); the checkpoints come from another run"):
        list(store.checkpoints(ckpt_run.path, wider))


# ------------------------------------------------------------------ saving a run
def test_save_final_records_the_hash_that_load_run_checks(ckpt_run, tmp_path):
    rc = store.read_config(ckpt_run.path)
    digest = store.save_final(tmp_path, rc, ckpt_run.model, steps_done=15)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_sha256"] == digest == rc.extra["model_sha256"] and saved["steps_done"] == 15
    run = store.load_run(tmp_path)
    assert isinstance(run, store.Run) and run.path == tmp_path and run.task.name == "max"
    assert run.metrics == [] and run.final == {}
    trained = store.model_tensors(ckpt_run.model)
    assert all(torch.equal(v, trained[k]) for k, v in store.model_tensors(run.model).items())


def test_save_checkpoint_is_what_checkpoints_reads(ckpt_run, tmp_path):
    store.write_config(tmp_path, ckpt_run.config)
    store.save_checkpoint(tmp_path, 7, ckpt_run.model)
    [(step, model)] = store.checkpoints(tmp_path)
    assert step == 7 and torch.equal(model.W_E, ckpt_run.model.W_E)


# ------------------------------------------------------------------ training state
def _optimizer_state(model):
    """AdamW-shaped state whose step counts are views of one tensor, as qkov's AdamW keeps them."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    counts = torch.full((len(names),), 3.0).unbind()
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    return {n: {"step": c, "exp_avg": torch.randn(params[n].shape, generator=gen),
                "exp_avg_sq": torch.rand(params[n].shape, generator=gen)} for n, c in zip(names, counts)}


def test_train_state_round_trip(ckpt_run, tmp_path):
    model, cfg = ckpt_run.model, ckpt_run.config.model
    optim = _optimizer_state(model)
    rng = torch.Generator().manual_seed(5).get_state()
    store.save_train_state(tmp_path, 12, model, optim, rng)
    state = store.load_train_state(tmp_path, cfg)
    assert isinstance(state, store.TrainState) and state.step == 12
    assert torch.equal(state.rng_state, rng)
    assert state.model.cfg == cfg and state.model is not model
    for k, v in store.model_tensors(model).items():
        assert torch.equal(store.model_tensors(state.model)[k], v)
    assert state.optimizer_state.keys() == optim.keys()
    for name, s in optim.items():
        assert state.optimizer_state[name].keys() == s.keys()
        assert all(torch.equal(state.optimizer_state[name][key], v) for key, v in s.items())


def test_train_state_errors(ckpt_run, tmp_path):
    cfg, rng = ckpt_run.config.model, torch.Generator().get_state()
    with pytest.raises(QkovError, match="has no train_state.safetensors to resume from"):
        store.load_train_state(tmp_path, cfg)
    store.save_train_state(tmp_path, 12, ckpt_run.model, _optimizer_state(ckpt_run.model), rng)
    with pytest.raises(QkovError, match=r"train_state.safetensors: blocks.0.attn.\w+ has shape .* different runs"):
        store.load_train_state(tmp_path, cfg.replace(d_head=8))
    store.save_train_state(tmp_path, 12, ckpt_run.model, {"embed.W_E": {"exp_avg": torch.zeros(3)}},
                           torch.Generator().get_state())
    with pytest.raises(QkovError, match=r"optim.embed.W_E.exp_avg has shape \(3,\) but embed.W_E has \(64, 32\)"):
        store.load_train_state(tmp_path, cfg)
    store.save_train_state(tmp_path, 12, ckpt_run.model, {"blocks.9.mlp.W_in": {"step": torch.zeros(())}},
                           torch.Generator().get_state())
    with pytest.raises(QkovError, match="optimizer state for blocks.9.mlp.W_in, which the model does not have"):
        store.load_train_state(tmp_path, cfg)
    store.save_train_state(tmp_path, 12, ckpt_run.model, _optimizer_state(ckpt_run.model), rng)
    f = tmp_path / "train_state.safetensors"
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(QkovError, match="truncated or damaged: retrain the run") as info:
        store.load_train_state(tmp_path, cfg)
    assert "\n" not in str(info.value)
    store.save_tensors(f, {"rng": torch.Generator().get_state()})         # no step, no weights
    with pytest.raises(QkovError, match="lacks its step or RNG state"):
        store.load_train_state(tmp_path, cfg)


def test_train_state_from_a_training_run_resumes(ckpt_run):
    """A trainer's own train_state.safetensors (today's format) loads: step, weights, AdamW state."""
    state = store.load_train_state(ckpt_run.path, ckpt_run.config.model)
    assert state.step == 15
    assert {k for s in state.optimizer_state.values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}
    assert all(float(s["step"]) == 15 for s in state.optimizer_state.values())
