"""Hostile input: every command, fed generated arguments, ``--set`` values and damaged run
directories, ends in exit 0 or exit 2 with at most one line on stderr (exactly one, ``qkov: ...``,
on exit 2), never a traceback, never a ``.tmp`` file left behind, and in bounded memory.

The fuzzers run in-process (``qkov.cli.main(argv)``) with a fixed seed and a bounded number of
examples; ``QKOV_FUZZ_EXAMPLES=N`` runs N per fuzzer by hand (the README's reliability paragraph
quotes such a run). ``qkov sweep`` and ``qkov tour`` are fuzzed with their steps faked (a point or
a tour run 'trains' at once), so every check they make before and around training runs, in the
fast tier; on exit 2 nothing under the test's folder may have changed.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import resource
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import qkov
from qkov import store
from qkov.cli import main

EXAMPLES = int(os.environ.get("QKOV_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 60, deadline=None, database=None, derandomize=not EXAMPLES,
                suppress_health_check=list(HealthCheck))


def cli(argv: list[str]) -> tuple[int, str, str]:
    """``qkov argv`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's --help
            code = e.code if isinstance(e.code, int) else 0
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, err: str, where: Path | None = None) -> None:
    """Exit 0 with at most one line on stderr, or exit 2 with exactly one ``qkov: `` line; no
    ``.tmp`` file left in ``where``."""
    lines = err.splitlines()
    assert "Traceback" not in err, err
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("qkov: "), err
    else:
        assert code == 0 and len(lines) <= 1, (code, err)
    if where is not None and where.exists():
        assert not [p for p in where.rglob("*.tmp")], sorted(where.rglob("*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny finished runs with checkpoints: ``max`` and a ``max`` of another width."""
    root = tmp_path_factory.mktemp("hostile")
    task = qkov.get_task("max")
    tc = task.train_config().replace(steps=4, eval_every=2, checkpoint_every=2, batch_size=32)
    qkov.train(task, out=root / "a", train_config=tc, quiet=True)
    qkov.train(task, out=root / "b", train_config=tc, model_config=task.model_config().replace(d_model=16),
               quiet=True)
    return {"a": root / "a", "b": root / "b"}


@pytest.fixture
def fake_training(monkeypatch, runs):
    """``train``/``resume`` that return the finished run at once: the CLI's checks still run
    (arguments, configs, memory, the lock), the steps do not."""
    trainer = sys.modules["qkov.train"]
    done = store.load_run(runs["a"])
    monkeypatch.setattr(trainer, "train", lambda *a, **k: done)
    monkeypatch.setattr(trainer, "resume", lambda *a, **k: done)


# --------------------------------------------------------------- the four that were tracebacks
@pytest.mark.parametrize("argv,message", [
    (["train", "max", "--out", "/proc/x", "--steps", "2"], "cannot create the folder /proc/x"),
    (["train", "max", "--set", "d_model=100000000"], "needs about"),
])
def test_train_tracebacks_are_one_line(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(argv)
    assert code == 2 and message in err, err
    assert_clean(code, err, tmp_path)


def test_report_where_it_cannot_be_written(runs):
    code, _, err = cli(["report", str(runs["a"]), "-o", "/proc/nope.html"])
    assert code == 2 and "cannot write /proc/nope.html" in err, err
    assert_clean(code, err)


def test_edited_n_ctx_never_allocates(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    d = json.loads((run / "config.json").read_text())
    d["model"]["n_ctx"] = 10**12
    (run / "config.json").write_text(json.dumps(d))
    for argv in (["eval", str(run)], ["show", str(run), "1 2 3"], ["train", "--resume", str(run), "--steps", "8"]):
        code, _, err = cli(argv)
        assert code == 2 and "needs about" in err and "available" in err, (argv, err)
    d["model"]["n_ctx"] = 7  # fits, but the weights are for 6: refused from the header, before loading
    (run / "config.json").write_text(json.dumps(d))
    code, _, err = cli(["eval", str(run)])
    assert code == 2 and "W_pos has shape (6, 32) but config.json's model needs (7, 32)" in err, err


def test_memory_estimate_counts_every_parameter():
    from qkov.memory import param_count

    for cfg in (qkov.ModelConfig(), qkov.ModelConfig(n_layers=2, n_heads=4, d_model=64, d_mlp=100, d_head=5,
                                                     normalization="LN", d_vocab_out=7)):
        model = qkov.Transformer(cfg)
        assert param_count(cfg) == sum(p.numel() for p in model.parameters())


def test_a_data_set_is_sized_before_it_is_built():
    """modadd's p**2 examples are counted from p, and the count bounds what building them takes."""
    from qkov.memory import dataset_bytes, n_examples, train_examples

    task = qkov.get_task("modadd", p=37)
    built = [task.dataset(split) for split in ("all", "train", "test")]
    held = sum(t.nbytes for b in built for t in (b.tokens, b.targets, b.scored))
    assert n_examples(task) == len(built[0]) == 37 * 37 and train_examples(task) == len(built[1])
    assert held <= dataset_bytes(task) <= 2 * held
    assert dataset_bytes(qkov.get_task("max")) == 0          # a sampled task holds no set


@pytest.mark.parametrize("name, params", [("add", {}), ("add", {"max_sum": 10}), ("fib", {}),
                                          ("fib", {"max_value": 50, "length": 3}), ("fib", {"length": 7})])
def test_add_and_fib_count_their_examples_without_building_them(name, params):
    task = qkov.get_task(name, **params)
    count = task.n_examples()
    assert count == len(task.dataset("all"))
    huge = qkov.get_task(name, **{**params, ("max_sum" if name == "add" else "max_value"): 10**7})
    assert huge.n_examples() > 10**9 if name == "add" else huge.n_examples() > 10**7   # counted, not built


@pytest.fixture
def small_machine(monkeypatch):
    """A machine with 1 GB available (``qkov.memory`` reads it); nothing here can allocate more."""
    monkeypatch.setattr(sys.modules["qkov.memory"], "available_bytes", lambda: 10**9)
    built = []
    monkeypatch.setattr(qkov.tasks.ModAddTask, "_all", lambda self: built.append(self) or 1 / 0)
    return built


def test_a_data_set_too_big_is_refused_before_it_is_built(tmp_path, monkeypatch, small_machine):
    task = qkov.get_task("modadd", p=3000)     # 9,000,000 examples: 1.45 GB of data set alone
    with pytest.raises(qkov.QkovError) as python:
        qkov.train(task, out=tmp_path / "py", train_config=task.train_config().replace(batch_size=64), quiet=True)
    message = str(python.value)
    assert "data set 1.45 GB for 9,000,000 examples" in message and "1 GB available" in message, message
    assert "fewer examples" in message
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["train", "modadd", "--set", "p=3000", "--set", "batch_size=64"])
    assert code == 2 and err == f"qkov: {message}\n", err     # the CLI and Python say the same line
    assert small_machine == [] and list(tmp_path.iterdir()) == []   # never built, nothing written


def test_python_train_and_resume_check_memory_first(tmp_path, monkeypatch, runs):
    monkeypatch.setattr(sys.modules["qkov.memory"], "available_bytes", lambda: 10**6)   # not even max fits
    monkeypatch.setattr(qkov.Transformer, "__init__", lambda *a, **k: 1 / 0)          # never reached
    with pytest.raises(qkov.QkovError, match=r"^training max needs about .* but this machine has 0.001 GB"):
        qkov.train("max", out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    run = tmp_path / "copy"
    shutil.copytree(runs["a"], run)
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    with pytest.raises(qkov.QkovError, match=f"^resuming {run} needs about .*config.json was edited"):
        qkov.resume(run, steps=8, quiet=True)
    code, _, err = cli(["train", "--resume", str(run), "--steps", "8"])
    assert code == 2 and f"resuming {run} needs about" in err, err
    assert before == {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}


def test_a_data_set_no_machine_holds_is_refused_by_the_command(tmp_path):
    """``qkov train modadd --set p=1000000`` (10**12 examples) in a process that cannot allocate more
    than 4 GB: one line, exit 2, nothing written."""
    import subprocess

    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # noqa: E731
    done = subprocess.run([sys.executable, "-m", "qkov", "train", "modadd", "--set", "p=1000000"], cwd=tmp_path,
                          capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "for 1,000,000,000,000 examples" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_resume_reads_metrics_without_elapsed_s(tmp_path, runs):
    """A metrics.jsonl edited by hand: the last row without ``elapsed_s`` resumes from the row before
    that has it (the clock goes on from there), and with none at all from 0."""
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    rows = store.read_metrics(run)
    rows[-2]["elapsed_s"] = 1000.0
    del rows[-1]["elapsed_s"]
    (run / store.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(["train", "--resume", str(run), "--steps", "6", "--quiet"])
    assert code == 0, err
    after = store.read_metrics(run)
    assert [r["step"] for r in after] == [0, 2, 4, 6] and after[-1]["elapsed_s"] >= 1000.0
    for r in after:
        r.pop("elapsed_s", None)
    (run / store.METRICS).write_text("".join(json.dumps(r) + "\n" for r in after))
    resumed = qkov.resume(run, steps=8, quiet=True)
    assert resumed.final["step"] == 8 and 0 <= resumed.final["elapsed_s"] < 1000.0


def test_a_second_writer_of_one_out_refuses(tmp_path, fake_training):
    out = tmp_path / "run"
    with store.run_lock(out):
        code, _, err = cli(["train", "max", "--out", str(out), "--steps", "2"])
        assert code == 2 and "another qkov process is writing" in err, err
    code, _, err = cli(["train", "max", "--out", str(out), "--steps", "2"])
    assert code == 0, err


@pytest.mark.parametrize("where", ["a_file", "a_dir_as_file"])
def test_a_file_or_folder_in_the_way(tmp_path, runs, where):
    if where == "a_file":
        (tmp_path / "f").write_text("x")
        argv = ["train", "max", "--out", str(tmp_path / "f" / "run"), "--steps", "2"]
    else:
        (tmp_path / "r.html").mkdir()
        argv = ["report", str(runs["a"]), "-o", str(tmp_path / "r.html")]
    code, _, err = cli(argv)
    assert code == 2 and str(tmp_path) in err, err
    assert_clean(code, err, tmp_path)


# --------------------------------------------------------------- generated arguments
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
NUMBERS = st.one_of(
    st.integers(-(10**30), 10**30).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-0", "1e-320", "1e308", "nan", "inf", "-1", "", " ", "None", "true", "0x10", "1_000"]),
)
VALUE = st.one_of(NUMBERS, TEXT, st.sampled_from(["relu", "gelu", "LN", "cpu", "cuda:7", "mps", "cosine"]))
KEYS = ["steps", "batch_size", "lr", "weight_decay", "betas", "warmup_steps", "lr_schedule", "eval_every",
        "checkpoint_every", "target_accuracy", "threads", "device", "n_layers", "n_heads", "d_model", "d_head",
        "d_mlp", "d_vocab", "d_vocab_out", "n_ctx", "act_fn", "normalization", "use_bias", "init_std",
        "min_len", "max_len", "model.n_ctx", "train.steps"]
SET = st.tuples(st.one_of(st.sampled_from(KEYS), TEXT), VALUE).map(lambda kv: f"{kv[0]}={kv[1]}")


@pytest.mark.slow
@seed(17)
@FUZZ
@given(sets=st.lists(SET, max_size=4), task=st.sampled_from(["max", "add", "fib", "induction", "modadd", "mx"]))
def test_fuzz_set_values(tmp_path_factory, fake_training, sets, task):
    out = tmp_path_factory.mktemp("set")
    argv = ["train", task, "--out", str(out / "run"), "--steps", "3"]
    for s in sets:
        argv += ["--set", s]
    code, _, err = cli(argv)
    assert_clean(code, err, out)


def _options(run: str) -> dict[str, list]:
    return {
        "train": ["max", "--out", "--seed", "--steps", "--set", "--show-config", "--resume", run, "--quiet"],
        "eval": [run, "--x"],
        "show": [run, "1 2 3", "--json", "--html", "9 9 9 9 9 9 9 9 9", "-1", "64", "", "--", "a b"],
        "report": [run, "-o", "--png", "--inputs", "1 2", "--output"],
        "certify": [run, "--json", "--length", "--exact-limit", "2", "1000"],
        "runs": [run, "--where", "--sort", "--json", "--csv", "--rebuild", "status=ok", "step>1"],
    }


@pytest.mark.slow
@seed(18)
@FUZZ
@given(data=st.data(), command=st.sampled_from(["train", "eval", "show", "report", "certify", "runs", "nope", ""]))
def test_fuzz_command_lines(tmp_path_factory, runs, fake_training, data, command):
    work = tmp_path_factory.mktemp("argv")
    run = work / "run"
    shutil.copytree(runs["a"], run)
    opts = _options(str(run)).get(command, ["--help", "-h"])
    token = st.one_of(st.sampled_from(opts), NUMBERS, TEXT, st.just(str(work / "out.html")))
    args = data.draw(st.lists(token, max_size=6))
    if command == "certify":  # keep brute force small: the exact limit is checked, not its run time
        args = [a for a in args if a != "--exact-limit"] + ["--exact-limit", "1000"]
    old = os.getcwd()
    os.chdir(work)
    try:
        code, _, err = cli([command, *args] if command else args)
    finally:
        os.chdir(old)
    assert_clean(code, err, work)


# --------------------------------------------------------------- generated damage
FILES = ["config.json", "model.safetensors", "metrics.jsonl", "train_state.safetensors",
         "checkpoints/step_2.safetensors"]
JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20),
                                 st.floats(allow_nan=False), TEXT),
                       lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
                       max_leaves=6)


def damage(data, run: Path, other: Path) -> str:
    """Apply one generated kind of damage to one file of ``run``; returns what was done."""
    name = data.draw(st.sampled_from(FILES))
    f = run / name
    raw = f.read_bytes()
    kind = data.draw(st.sampled_from(["truncate", "flip", "swap", "huge_header", "dtype", "shape", "json"]))
    if kind == "truncate":
        f.write_bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))])
    elif kind == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        f.write_bytes(raw[:i] + bytes([raw[i] ^ (1 << data.draw(st.integers(0, 7)))]) + raw[i + 1:])
    elif kind == "swap":
        shutil.copyfile(other / name, f)
    elif kind == "huge_header" and name.endswith(".safetensors"):
        f.write_bytes(data.draw(st.integers(2**20, 2**64 - 1)).to_bytes(8, "little") + raw[8:])
    elif kind in ("dtype", "shape") and name.endswith(".safetensors"):
        tensors, _ = store.load_tensors(f)
        k = data.draw(st.sampled_from(sorted(tensors)))
        v = tensors[k]
        tensors[k] = v.to(data.draw(st.sampled_from([torch.float64, torch.int32, torch.float16]))) \
            if kind == "dtype" else torch.zeros(*[s + 1 for s in v.shape], 2)
        store.save_tensors(f, tensors, store.tensors_metadata(raw))
    elif name == "config.json":
        d = json.loads(raw)
        section = data.draw(st.sampled_from(["model", "train", "task", "seed", "model_sha256"]))
        if isinstance(d.get(section), dict) and d[section]:
            d[section][data.draw(st.sampled_from(sorted(d[section])))] = data.draw(JSONISH)
        else:
            d[section] = data.draw(JSONISH)
        f.write_text(json.dumps(d))
    elif name == "metrics.jsonl":
        f.write_text(json.dumps(data.draw(JSONISH)) + "\n")
    return f"{kind} {name}"


@pytest.mark.slow
@seed(19)
@FUZZ
@given(data=st.data())
def test_fuzz_damaged_run_directories(tmp_path_factory, runs, data):
    run = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(runs["a"], run)
    what = damage(data, run, runs["b"])
    argv = data.draw(st.sampled_from([["eval", str(run)], ["show", str(run), "5 1 3"],
                                      ["train", "--resume", str(run), "--steps", "6", "--quiet"],
                                      ["certify", str(run), "--length", "2"]]))
    code, _, err = cli(argv)
    assert_clean(code, err, run), what


# --------------------------------------------------------------- qkov sweep and qkov tour, generated
def files_under(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


def assert_clean_or_unchanged(code: int, err: str, work: Path, before: dict[str, bytes]) -> None:
    """Exit 0 (progress lines on stderr are fine, a traceback never), or exit 2 with one line and
    nothing written under ``work``; no ``.tmp`` file either way."""
    assert "Traceback" not in err, err
    if code == 2:
        assert_clean(code, err, work)
        assert files_under(work) == before, sorted(set(files_under(work)) ^ set(before))
    else:
        assert code == 0, (code, err)
        assert not [p for p in work.rglob("*.tmp")], sorted(work.rglob("*"))


@pytest.fixture(scope="module")
def summary_of_a(runs) -> dict:
    return qkov.analyze(store.load(runs["a"]), qkov.get_task("max")).to_dict()


@pytest.fixture
def fake_points(monkeypatch, runs, summary_of_a):
    """Sweep points that finish at once, in this process, whatever the backend: a point's run
    directory gets its own config.json beside run ``a``'s weights, metrics and summary, and a
    'done' record. The driver's checks, its registry and its directory handling all run."""
    from qkov.config import ModelConfig, TrainConfig
    from qkov.sweep import pools
    from qkov.tasks import task_from_dict

    def point(job):
        path = Path(job["path"])
        rc = store.RunConfig(task_from_dict(job["task"]), ModelConfig.from_dict(job["model"]),
                             TrainConfig.from_dict(job["train"]), job["seed"])
        store.write_config(path, rc)
        for name in (store.MODEL, store.METRICS):
            store.atomic_write_bytes(path / name, (runs["a"] / name).read_bytes())
        store.save_summary(path, summary_of_a)
        record = {"hash": job["hash"], "seed": job["seed"], "attempt": job["attempt"], "status": "done",
                  "train_s": 0.0, "analyze_s": 0.0, "finished": "2026-01-01T00:00:00+00:00"}
        store.save_sweep_record(path, record)
        return record

    monkeypatch.setattr(pools, "train_point", point)
    monkeypatch.setattr(sys.modules["qkov.sweep"], "_pool", lambda *a, **k: pools.SerialPool(1))


def run_clean_or_unchanged(work: Path, argv: list[str]) -> tuple[int, str]:
    """``qkov argv`` run in ``work``, held to :func:`assert_clean_or_unchanged`; its exit code and stderr."""
    before = files_under(work)
    code, _, err = _in(work, argv)
    assert_clean_or_unchanged(code, err, work, before)
    return code, err


def _in(work: Path, argv: list[str]) -> tuple[int, str, str]:
    old = os.getcwd()
    os.chdir(work)
    try:
        return cli(argv)
    finally:
        os.chdir(old)


def _places(work: Path, runs) -> list[str]:
    """--out/-o values: new folders, a file, a folder that cannot be made, a run directory, odd names."""
    (work / "a_file").write_text("x")
    (work / "sweep_of_add" / "seed0000-add").mkdir(parents=True)
    task, m, t = qkov.tasks.configure("add", {})
    store.write_config(work / "sweep_of_add" / "seed0000-add", store.RunConfig(task, m, t, 0))
    shutil.copytree(runs["a"], work / "a_run")
    return [str(work / "new"), "new2", str(work / "a_file"), str(work / "a_file" / "below"), "/proc/x",
            str(work / "sweep_of_add"), str(work / "a_run"), "", ".", "ü/ß", "-", "a\nb"]


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "0:10000000000000"], "names more than 1,000,000 seeds, the most one sweep takes"),
    (["--seeds", "0:2", "--set", "d_model=32,100000000"], "a point of the sweep (d_model=100000000) needs about"),
    (["--seeds", "0:2", "--out", "a_file/below"], "a file is in the way"),
])
def test_sweep_input_refused_before_anything_is_made(tmp_path, runs, fake_points, argv, message):
    """Seeds are counted before the list is made, every point is sized before the sweep starts, and
    an --out that cannot be a folder gets store's line."""
    places = _places(tmp_path, runs)
    code, err = run_clean_or_unchanged(tmp_path, ["sweep", "max", "--out", places[1], *argv])
    assert code == 2 and message in err, err
    assert not (tmp_path / "new2").exists()


SEEDS = st.one_of(
    st.sampled_from(["0", "0:2", "3,5", "0:1,7", "5:5", "2:1", "-1", "0:-3", "a", "", " ", "0:2,1", "0:10**3",
                     "0:10000000000000", "0:1000001", "\u0663", "0:3:5", "1e3", "0x10", "0:2,,3", "0 : 2", "1_0"]),
    NUMBERS, TEXT)
GRID_VALUES = st.lists(VALUE, min_size=0, max_size=3).map(",".join)
GRID = st.tuples(st.one_of(st.sampled_from(KEYS + ["seed", "task", "p"]), TEXT), GRID_VALUES).map(
    lambda kv: f"{kv[0]}={kv[1]}")


FEW = st.sampled_from(["0", "1", "2", "3", "1000000000000000000000"])


def _sweep_args(data, places: list[str]) -> list[str]:
    option = st.one_of(
        st.tuples(st.just("--seeds"), SEEDS), st.tuples(st.just("--set"), GRID),
        st.tuples(st.just("--set"), st.sampled_from(["steps=2,3", "lr=1e-3,3e-3", "d_model=100000000",
                                                     "betas=[0.9,0.98],(0.9", "steps=", "lr=1e-3,,2"])),
        st.tuples(st.just("--jobs"), st.one_of(FEW, FEW, NUMBERS, TEXT)),
        st.tuples(st.just("--backend"), st.sampled_from(["local", "serial", "ray", "local", "serial", "", "x"])),
        st.tuples(st.just("--address"), st.sampled_from(["auto", "ray://nowhere:1", ""])),
        st.tuples(st.just("--out"), st.sampled_from(places)), st.tuples(st.just("--out"), st.sampled_from(places)),
        st.tuples(st.just("--retries"), st.one_of(FEW, FEW, NUMBERS)),
        st.tuples(st.sampled_from(["--quiet", "--help", "--seeds", "--out", "--bogus", "0:2"])),
    )
    args = [a for opt in data.draw(st.lists(option, max_size=5)) for a in opt]
    task = data.draw(st.sampled_from(["max", "add", "mx", "", "modadd", "--seeds"]))
    # Valid seeds last (argparse keeps the last) two times in three, so the other options are reached.
    tail = data.draw(st.sampled_from([[], ["--seeds", "0:2"], ["--seeds", "1"]]))
    return [task, *args, *tail]


@seed(20)  # fast tier: 60 cases in under a second (the steps are faked)
@FUZZ
@given(data=st.data())
def test_fuzz_sweep_command_lines(tmp_path_factory, runs, fake_points, data):
    work = tmp_path_factory.mktemp("sweep")
    places = _places(work, runs)
    run_clean_or_unchanged(work, ["sweep", *_sweep_args(data, places)])


@pytest.fixture
def fake_tour(monkeypatch, runs, summary_of_a):
    """The tour's training, analysis and pages, faked: a run 'trains' by writing its config.json
    and returning run ``a``, every summary is ``a``'s, every page a few bytes. What the tour
    checks before it trains (its folder, every run directory in it, --set) runs as it is."""
    tour = importlib.import_module("qkov.tour")
    done = store.load_run(runs["a"])

    def train(task, out, seed, model_config, train_config, quiet):
        store.write_config(out, store.RunConfig(task, model_config, train_config, seed))
        return done

    class Summary:
        def to_dict(self):
            return summary_of_a

    def page(path, *a, **k):
        store.atomic_write_text(Path(path if not k.get("out") else k["out"]), "<html></html>")
        return Path(k.get("out") or path)

    monkeypatch.setattr(tour, "train", train)
    monkeypatch.setattr(tour, "analyze", lambda *a, **k: Summary())
    monkeypatch.setattr(tour, "write_report", lambda run, **k: page(None, **k))
    monkeypatch.setattr(tour, "write_plotly_js", page)
    monkeypatch.setattr(tour, "frequency_comparison", lambda *a: {"frequency_overlap": 0.5,
                                                                 "shared_dominant_frequencies": [1]})


@seed(21)  # fast tier: 60 cases in under a second (the steps are faked)
@FUZZ
@given(data=st.data())
def test_fuzz_tour_command_lines(tmp_path_factory, runs, fake_tour, data):
    work = tmp_path_factory.mktemp("tour")
    places = _places(work, runs)
    option = st.one_of(
        st.tuples(st.sampled_from(["-o", "--output"]), st.sampled_from(places)),
        st.tuples(st.just("--set"), st.one_of(SET, st.sampled_from(["threads=1", "threads=-1", "threads=x",
                                                                    "train.threads=2", "steps=3", "threads="]))),
        st.tuples(st.sampled_from(["--quiet", "--help", "-o", "--set", "--bogus", "max"])),
    )
    run_clean_or_unchanged(work, ["tour", *[a for opt in data.draw(st.lists(option, max_size=5)) for a in opt]])


@pytest.mark.slow
def test_fuzzing_stayed_in_bounded_memory():
    """Run after the fuzzers (file order): the process never held more than 4 GB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    assert peak < 4e9, peak
