"""The run registry: rows are functions of their run directories (rebuilt, they are the same),
SQLite in WAL mode, one writer at a time, and `qkov runs` filters, sorts and prints them."""

from __future__ import annotations

import csv
import io
import json
import sqlite3

import pytest

from qkov import registry, store
from qkov.cli import main
from qkov.report.sweep import sweep_findings
from qkov.store import RunConfig
from qkov.sweep import plan

FREQS = {0: [1, 8, 21], 1: [4, 14, 35, 41, 52], 2: [1, 8, 33, 50]}


def _fake_run(sweep_dir, seed: int, lr: str) -> dict:
    """A modadd run directory as a sweep leaves it (config, weights file, summary, record),
    without training: the registry reads only these files."""
    point = plan("modadd", [seed], {"lr": [lr], "p": ["23"]})[0]
    path = sweep_dir / point.name
    store.write_config(path, point.rc)
    store.atomic_write_bytes(path / store.MODEL, b"weights")
    store.write_metrics(path, [{"step": 100, "accuracy": 0.5, "loss": 2.0}])
    summary = {"eval": {"accuracy": 1.0 - seed / 100, "loss": 0.01 * (seed + 1)},
               "heads": [{"layer": 0, "head": h, "copying_score": h / 4} for h in range(4)],
               "mlp": {"kind": "fourier_zp", "key_frequencies": FREQS[seed], "logit_fve": 0.9}}
    store.save_summary(path, summary)
    store.save_sweep_record(path, {"hash": point.hash, "seed": seed, "attempt": 1, "status": "done",
                                   "train_s": 1.5, "analyze_s": 0.5, "finished": "2026-12-01T00:00:00+00:00"})
    return {"name": point.name, "hash": point.hash}


@pytest.fixture
def sweep_dir(tmp_path):
    d = tmp_path / "s"
    for seed in FREQS:
        _fake_run(d, seed, "3e-3" if seed < 2 else "1e-3")
    with registry.writer_lock(d):
        reg = registry.Registry(d, write=True)
        reg.sync()
        reg.close()
    return d


def test_rows_hold_the_headline_numbers(sweep_dir):
    rows = registry.read_rows(sweep_dir)
    assert [r["seed"] for r in rows] == [0, 1, 2] and all(r["status"] == "done" for r in rows)
    r = rows[1]
    assert r["settings"] == {"p": 23, "lr": 0.003} and r["accuracy"] == 0.99 and r["copying_score"] == 0.75
    assert r["key_frequencies"] == [4, 14, 35, 41, 52] and r["n_key_frequencies"] == 5 and r["logit_fve"] == 0.9
    assert r["path"] == str(sweep_dir / r["name"]) and r["hash"] == registry.config_hash(store.read_config(r["path"]))


def test_the_registry_is_sqlite_in_wal_mode_and_rebuilds_from_the_directories(sweep_dir, capsys):
    con = sqlite3.connect(sweep_dir / registry.DB)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    before = registry.read_rows(sweep_dir)
    (sweep_dir / registry.DB).unlink()
    assert registry.read_rows(sweep_dir) == before          # computed from the directories, nothing written
    assert not (sweep_dir / registry.DB).exists()
    assert main(["runs", str(sweep_dir), "--rebuild", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == before
    assert registry.read_rows(sweep_dir) == before


def test_a_deleted_run_directory_leaves_the_registry_on_sync(sweep_dir):
    gone = registry.run_dirs(sweep_dir)[0]
    for f in sorted(gone.rglob("*"), reverse=True):
        f.unlink()
    gone.rmdir()
    with registry.writer_lock(sweep_dir):
        reg = registry.Registry(sweep_dir, write=True)
        assert [r["seed"] for r in reg.sync()] == [1, 2]
        reg.close()


def test_one_writer_at_a_time(sweep_dir):
    with registry.writer_lock(sweep_dir):
        with pytest.raises(store.QkovError, match="another qkov sweep .* is writing"):
            with registry.writer_lock(sweep_dir):
                pass


def test_qkov_runs_where_sort_json_csv(sweep_dir, capsys):
    assert main(["runs", str(sweep_dir), "--where", "lr=0.003", "--sort=-accuracy", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["seed"] for r in rows] == [0, 1] and {"seed", "status", "path", "accuracy"} <= set(rows[0])
    assert main(["runs", str(sweep_dir), "--where", "accuracy<1", "--where", "status=done", "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [t["seed"] for t in table] == ["1", "2"] and table[0]["key_frequencies"] == "4 14 35 41 52"
    assert main(["runs", str(sweep_dir), "--sort", "n_key_frequencies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["seed", "status", "lr", "p"]
    assert [x.split()[0] for x in lines[1:]] == ["0", "2", "1"]


@pytest.mark.parametrize("argv,message", [
    (["--where", "colour=red"], "unknown key 'colour' in --where; known keys:"),
    (["--where", "accuracy>high"], "--where compares a number with 'high'"),
    (["--where", "seed"], "--where expects KEY=VALUE"),
    (["--sort", "colour"], "unknown key 'colour' in --sort"),
])
def test_qkov_runs_bad_input(sweep_dir, capsys, argv, message):
    assert main(["runs", str(sweep_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_qkov_runs_on_a_directory_that_is_not_a_sweep(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 2
    assert "is not a sweep directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_findings_in_words(sweep_dir):
    texts = [f["text"] for f in sweep_findings(registry.read_rows(sweep_dir))]
    assert texts[0] == "3 of 3 runs are done."
    assert "Key frequencies are different in every seed, 3-5 per seed (median 4); the most common: k=1 (2)" in texts[-1]
    assert any(t.startswith("The key frequencies explain at least 80% of the logit variance in 3 of 3 seeds")
               for t in texts)


def test_settings_are_what_differs_from_the_reference():
    from qkov.tasks import configure

    task, m, t = configure("modadd", {"p": "23", "d_mlp": "128", "lr": "1e-3"})   # lr 1e-3 is the reference
    assert registry.settings_of(RunConfig(task, m, t, 0)) == {"p": 23, "d_mlp": 128}


def test_the_sweep_page_draws_key_frequencies_and_links_written_reports(sweep_dir):
    from qkov.report import write_report

    first = registry.run_dirs(sweep_dir)[0]
    store.atomic_write_text(first / "report.html", "<html></html>")       # as qkov report DIR/NAME leaves it
    page = write_report(sweep_dir).read_text()
    assert 'id="fig-key-frequencies"' in page and 'id="fig-key-frequency-count"' in page
    assert 'id="fig-logit-fve"' in page and page.count("<tr>") == 4       # the header and one row per run
    assert f'<a href="{first.name}/report.html">' in page and page.count("/report.html\">") == 1
    assert "Sweep: modadd (p=23), 3 runs" in page
