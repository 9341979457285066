"""Loading run directories: what happens when files are missing, truncated or altered."""

import json

import pytest

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
