"""A task of one's own: defined in a file outside src/, trained by path, reloaded in a new process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qkov
from qkov.errors import QkovError
from qkov.tasks import loading, resolve, task_from_dict

TASK_FILE = textwrap.dedent('''
    import torch
    from qkov import ModelConfig, Task, TrainConfig
    from qkov.tasks import IGNORE, Batch


    class LastSeen(Task):
        """At every position after the first, the token one before it (a previous-token task)."""

        name = "lastseen"
        defaults = {"vocab": 12, "length": 6}

        @property
        def seq_len(self):
            return self.length

        @property
        def d_vocab(self):
            return self.vocab

        @property
        def scored_positions(self):
            return list(range(1, self.length))

        def sample(self, n, generator):
            tokens = torch.randint(0, self.vocab, (n, self.length), generator=generator)
            targets = torch.full_like(tokens, IGNORE)
            targets[:, 1:] = tokens[:, :-1]
            return Batch(tokens, targets, targets != IGNORE)

        def group_name(self):
            return "position"

        def answer_positions(self, tokens):
            return list(range(1, len(tokens)))

        def expected(self, tokens):
            return [int(t) for t in tokens[:-1]]

        def model_config(self):
            return ModelConfig(n_layers=1, n_heads=1, d_model=32, d_mlp=None, d_vocab=self.vocab, n_ctx=self.length)

        def train_config(self):
            return TrainConfig(steps=400, batch_size=256, lr=1e-2, lr_schedule="cosine", eval_every=100)

        @torch.no_grad()
        def facts(self, model):
            tokens = self.eval_batch().tokens[:256]
            _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
            p = cache["blocks.0.attn.hook_pattern"][:, 0]                  # [b, q, k]
            return {"weight_on_previous": round(float(p.diagonal(-1, 1, 2).mean()), 4)}

        def findings(self, summary):
            w = summary["attention"]["weight_on_previous"]
            return [{"id": "weight_on_previous", "value": w, "text": f"Attention to the previous token: {w:.3f}."}]
''')


@pytest.fixture
def task_file(tmp_path) -> Path:
    f = tmp_path / "mytasks.py"
    f.write_text(TASK_FILE)
    return f


def _qkov(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qkov", *map(str, args)], cwd=cwd, capture_output=True, text=True)


def test_a_task_in_a_file_loads_by_path_and_records_its_source(task_file, tmp_path):
    cls = resolve(f"{task_file}:LastSeen")
    task = cls(vocab=8)
    d = task.to_dict()
    assert d == {"name": "lastseen", "source": f"{task_file.resolve()}:LastSeen", "vocab": 8, "length": 6}
    again = task_from_dict(json.loads(json.dumps(d)))
    assert type(again).__name__ == "LastSeen" and again.params == task.params
    assert qkov.get_task("max").to_dict() == {"name": "max", "vocab": 64, "min_len": 2, "max_len": 6}


def test_module_paths_and_entry_points_resolve(monkeypatch):
    assert resolve("qkov.tasks.lists:MinTask") is qkov.tasks.MinTask

    class EP:
        value = "qkov.tasks.lists:MinTask"

        def load(self):
            return qkov.tasks.MinTask

    monkeypatch.setattr(loading, "_entry_points", lambda: {"smallest": EP()})
    assert resolve("smallest") is qkov.tasks.MinTask


@pytest.mark.parametrize("spec, says", [
    ("nosuch", "unknown task 'nosuch'"),
    ("nosuch_pkg_xyz.tasks:Sort", "module 'nosuch_pkg_xyz' is not installed"),
    ("./missing_file.py:Sort", "does not exist"),
    ("qkov.tasks.lists:Nope", "has no 'Nope'"),
    ("qkov.tasks.lists:torch", "not a qkov.Task subclass"),
])
def test_a_task_that_cannot_be_found_says_what_to_pass(spec, says):
    with pytest.raises(QkovError, match=says) as e:
        resolve(spec)
    assert "\n" not in str(e.value)


def test_a_moved_task_file_says_what_to_put_back(task_file):
    d = resolve(f"{task_file}:LastSeen")().to_dict()
    d["source"] = str(task_file.parent / "gone.py") + ":LastSeen"
    with pytest.raises(QkovError, match="trained from .*gone.py:LastSeen.*put the file back") as e:
        task_from_dict(d)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_train_by_file_then_load_eval_analyze_report_show_in_new_processes(task_file, tmp_path):
    run = tmp_path / "run"
    out = _qkov("train", "./mytasks.py:LastSeen", "--out", run, "--quiet", cwd=task_file.parent)
    assert out.returncode == 0, out.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (f"import qkov; r = qkov.load_run({str(run)!r}); m = qkov.load({str(run)!r}); "
            f"print(type(r.task).__name__, r.task.evaluate(m)['accuracy'])")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    name, acc = loaded.stdout.split()
    assert name == "LastSeen" and float(acc) >= 0.99
    assert "accuracy" in _qkov("eval", run, cwd=elsewhere).stdout
    summary = json.loads(_qkov("analyze", run, "--json", cwd=elsewhere).stdout)
    found = {f["id"]: f["value"] for f in summary["findings"]}
    assert found["weight_on_previous"] > 0.9
    report = _qkov("report", run, "--out", tmp_path / "r.html", cwd=elsewhere)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "r.html").stat().st_size > 0
    show = _qkov("show", run, "3 9 4 1", cwd=elsewhere)
    assert show.returncode == 0, show.stderr
    assert "answer    3 9 4" in show.stdout and "(correct)" in show.stdout


def test_the_registry_reads_a_task_of_your_own_against_its_defaults(task_file):
    from qkov.registry import settings_of
    from qkov.store import RunConfig

    task = resolve(f"{task_file}:LastSeen")(vocab=10)
    rc = RunConfig(task, task.model_config(), task.train_config().replace(lr=3e-3), 0)
    assert settings_of(rc) == {"vocab": 10, "lr": 3e-3}


def test_a_classifier_names_its_classes_in_show_and_the_report():
    """``output_labels`` labels the logits: a classifier's classes, not the input tokens."""
    from qkov.report import data
    from qkov.show import show
    from qkov.tasks.arithmetic import MaxTask

    class Parity(MaxTask):
        name = "parity_of_max"

        @property
        def d_vocab_out(self):
            return 2

        def output_labels(self):
            return ["even", "odd"]

    task = Parity()
    model = qkov.Transformer(qkov.ModelConfig(d_model=16, d_vocab=64, d_vocab_out=2, n_ctx=6))
    (shown,) = show(model, task, "3 5 8")
    assert sorted(t["label"] for t in shown.top[0]) == ["even", "odd"]
    assert data._labels(task, 2, None, output=True) == ["even", "odd"]
    assert data._labels(task, 3, None)[:3] == ["0", "1", "2"]
