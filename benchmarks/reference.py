"""The README's table "What the reference models show", measured from the models themselves.

    python benchmarks/reference.py                     # train the reference models (seed 0), print the table
    python benchmarks/reference.py --write-readme      # ... and rewrite the table in README.md
    python benchmarks/reference.py --runs DIR          # keep the runs in DIR/<row>, reuse the finished ones
    python benchmarks/reference.py --grokking          # also retrain the modadd p = 113 row (10,000+ steps)

Every row is one run trained the way ``tests/conftest.py``'s ``trained`` fixture trains it
(``qkov.tasks.configure(task, sets)``, then ``qkov.train(..., seed=0)``, one torch thread), and
:func:`table` turns runs into the table's markdown. The script and the slow test
``tests/test_readme_numbers.py`` both call :func:`table`, so the README's numbers are the ones
the code measures, and the test fails when they part.

The ``modadd`` p = 113 row (Nanda et al.'s setup) takes 10,000+ full-batch steps, too long for the
test suite: without ``--grokking`` the script keeps that row as the README has it (it says when
and how it was measured); with ``--grokking`` it trains the run and :func:`table` writes the row
like the p = 23 one.

Timings are not part of the table. They go below it, between their own markers, from the
training time each run recorded (``elapsed_s`` in its ``metrics.jsonl``: wall time of
``qkov.train``, evaluations included), with the date and the machine they were measured on.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

import qkov
from qkov import store
from qkov.analyze import analyze, frequency_comparison
from qkov.store import RunConfig
from qkov.tasks import configure

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- reference-table:start -->", "<!-- reference-table:end -->"
TIMES_START, TIMES_END = "<!-- reference-timings:start -->", "<!-- reference-timings:end -->"

# conftest.SMALL_MODADD: a small prime with a larger train fraction groks in ~2,000 steps.
SMALL_MODADD = dict(p=23, train_frac=0.6, d_mlp=128, lr=3e-3, steps=2500)
GROKKING = dict(target_accuracy=0.99)         # benchmarks/grokking.py's reference run

# Row name -> (task, --set overrides). The first five are the runs the test suite trains.
ROWS: dict[str, tuple[str, dict]] = {
    "`max`": ("max", {}),
    "`add`": ("add", {}),
    "`fib`": ("fib", {}),
    "`induction`": ("induction", {}),
    "`modadd` p = 23": ("modadd", SMALL_MODADD),
    "`modadd` p = 113": ("modadd", GROKKING),
}
SUITE_ROWS = tuple(list(ROWS)[:5])
HEADER = "| model | trained | what `qkov analyze` finds |\n| --- | --- | --- |"


# ------------------------------------------------------------------ the table: runs -> text
def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def _steps(run) -> str:
    """``1,000 full-batch steps`` (or ``1,500 steps`` with minibatches)."""
    return f"{run.final['step']:,} {'full-batch ' if run.config.train.batch_size is None else ''}steps"


def _groups(groups: Mapping[str, dict], what: str) -> str:
    """``100.00% at every length 2..6`` when all are equal, else each group's accuracy."""
    accs = {k: g["accuracy"] for k, g in groups.items()}
    if len(set(accs.values())) == 1:
        keys = sorted(accs, key=int)
        return f"{_pct(next(iter(accs.values())))} at every {what} {keys[0]}..{keys[-1]}"
    return ", ".join(f"{_pct(a)} at {what} {k}" for k, a in accs.items())


def _frequencies(mlp: dict) -> str:
    top = mlp["dominant_frequencies"]
    first, rest = top[0], top[1:]
    return (f"k = {first['k']} ({_pct(first['share'], 1)} of the power), "
            + ", ".join(f"{f['k']} ({_pct(f['share'], 1)})" for f in rest))


def _max_row(run, s: dict) -> tuple[str, str]:
    a, head = s["attention"], s["heads"][0]
    rank = a["key_rank_correlation"]
    n = {g["n"] for g in s["eval"]["by_length"].values()}
    each = f" ({next(iter(n)):,} lists each)" if len(n) == 1 else ""
    top1 = ("every token raises its own logit most" if head["ov_self_top1"] == 1.0
            else f"{_pct(head['ov_self_top1'], 1)} of tokens raise their own logit most")
    return (
        f"{_steps(run)}; {_groups(s['eval']['by_length'], 'length')}{each}",
        f"the last position attends most to a maximal token on {_pct(a['top_key_is_max'], 1)} of inputs; "
        f"with positions added the QK circuit ranks keys by value (rank correlation "
        f"{rank['by_q_pos'][str(rank['q_pos'])]:.3f} at the last position, {rank['no_positions']:.3f} without "
        f"positions); OV copying score {head['copying_score']:.3f}, {top1}",
    )


def _add_row(run, s: dict) -> tuple[str, str]:
    ev, mlp = s["eval"], s["mlp"]
    return (
        f"{_steps(run)}; {_pct(ev['accuracy'])} of the {ev['n']:,} pairs",
        f"neuron inputs (`W_E W_V W_O W_in` over tokens 0..{mlp['n_tokens'] - 1}, straight line removed): "
        f"dominant frequencies {_frequencies(mlp)}; a straight line explains a median "
        f"{_pct(mlp['linear_share_median'], 1)} of a neuron's input",
    )


def _fib_row(run, s: dict, add_summary: dict | None, compare: dict | None) -> tuple[str, str]:
    mlp = s["mlp"]
    finds = f"dominant frequencies {_frequencies(mlp)}; straight line {_pct(mlp['linear_share_median'], 1)}"
    if compare is not None and add_summary is not None:
        shared = compare["shared_dominant_frequencies"]
        both = "{" + ", ".join(map(str, shared)) + "}"
        same = "are the same set" if len(shared) == len(mlp["dominant_frequencies"]) else "share"
        lead_add = add_summary["mlp"]["dominant_frequencies"][0]["k"]
        lead_fib = mlp["dominant_frequencies"][0]["k"]
        finds += (f". `qkov analyze DIR/fib --compare DIR/add`: the two spectra overlap "
                  f"{_pct(compare['frequency_overlap'], 1)}, and both models' top five frequencies {same} "
                  f"{both} (add leans most on k = {lead_add}, fib on k = {lead_fib})")
    return f"{_steps(run)}; {_groups(s['eval']['by_position'], 'position')}", finds


def _induction_row(run, s: dict) -> tuple[str, str]:
    ev, heads = s["eval"], s["heads"]
    prev = max((h for h in heads if h["layer"] == 0), key=lambda h: h["previous_token_score"])
    later = sorted((h for h in heads if h["layer"] > 0), key=lambda h: -h["induction_score"])
    k = s["composition"]["strongest"]["K"]
    ind = ", ".join(f"{h['layer']}.{h['head']} {h['induction_score']:.3f}" for h in later)
    rep = ev["repeated"]
    return (
        f"{_steps(run)}; loss {ev['loss']:.2f} on the repeated part vs {ev['loss_rest']:.2f} on the rest",
        f"head {prev['layer']}.{prev['head']} is a previous-token head ({prev['previous_token_score']:.3f}); "
        f"induction scores after layer 0: {ind}; the strongest K-composition is "
        f"{k['from'][0]}.{k['from'][1]} → {k['to'][0]}.{k['to'][1]} ({k['score']:.3f}). On `[x, x]` repeats: "
        f"loss {rep['loss']:.2f} on the second half vs {rep['loss_first_half']:.2f} on the first",
    )


def _modadd_row(run, s: dict) -> tuple[str, str]:
    ev, mlp, cfg = s["eval"], s["mlp"], run.config
    first = next((m["step"] for m in run.metrics if m["accuracy"] >= 0.99), None)
    setup = (f"lr {cfg.train.lr:g}, {_pct(run.task.train_frac, 0)} train, d_mlp {cfg.model.d_mlp}, "
             f"{run.task.p ** 2:,} pairs")
    if cfg.train.target_accuracy is not None:
        setup += f"; `--set target_accuracy={cfg.train.target_accuracy:g}`"
    reached = f", 99% first at step {first:,}" if first is not None else ""
    n = mlp["neurons"]
    return (
        f"{_steps(run)} ({setup}); {_pct(ev['accuracy'])} test accuracy{reached}",
        f"key frequencies {mlp['key_frequencies']}; they explain {_pct(mlp['logit_fve'], 1)} of the logit "
        f"variance; restricted loss {mlp['restricted_loss']:.2g} (test loss {mlp['test_loss']:.2g}), excluded "
        f"loss {mlp['excluded_loss']:.3g}; {_pct(n['frac_fve_ge_0.85'], 1)} of neurons have FVE ≥ 0.85 for "
        f"their frequency, {_pct(n['frac_in_key_frequencies'], 1)} sit in a key frequency",
    )


def summaries(runs: Mapping[str, qkov.Run]) -> dict[str, dict]:
    """``qkov.analyze`` of each run (without progress measures: the table does not show them)."""
    return {name: analyze(run.model, run.task).to_dict() for name, run in runs.items()}


def rows(runs: Mapping[str, qkov.Run]) -> dict[str, str]:
    """One markdown row per run in ``runs`` (keys: :data:`ROWS`' names), every number measured."""
    s = summaries(runs)
    compare = None
    if "`add`" in runs and "`fib`" in runs:
        compare = frequency_comparison(runs["`add`"].model, runs["`fib`"].model)
    out = {}
    for name, run in runs.items():
        kind = ROWS[name][0]
        if kind == "max":
            cells = _max_row(run, s[name])
        elif kind == "add":
            cells = _add_row(run, s[name])
        elif kind == "fib":
            cells = _fib_row(run, s[name], s.get("`add`"), compare)
        elif kind == "induction":
            cells = _induction_row(run, s[name])
        else:
            cells = _modadd_row(run, s[name])
        if name == "`modadd` p = 113":            # the benchmark row: its date is the timings line's
            cells = (cells[0] + "; measured by `benchmarks/reference.py --grokking`", cells[1])
        out[name] = f"| {name} | {cells[0]} | {cells[1]} |"
    return out


def table(runs: Mapping[str, qkov.Run], kept: Mapping[str, str] | None = None) -> str:
    """The table's markdown: :data:`ROWS` in order, each row measured from ``runs`` or, for a row
    with no run, taken from ``kept`` (the README's current rows, by name); rows in neither are left out."""
    measured = rows(runs)
    kept = kept or {}
    lines = [measured.get(name) or kept.get(name) for name in ROWS]
    return HEADER + "\n" + "\n".join(line for line in lines if line)


def timings(runs: Mapping[str, qkov.Run], load: tuple[float, float] | None = None) -> str:
    """One sentence: each run's training time as it recorded it, and where it was measured
    (``load``: the machine's 1-minute load average when the script started and ended)."""
    times = ", ".join(f"{name} {run.final['elapsed_s']:.1f} s" for name, run in runs.items())
    when = datetime.date.today().isoformat()
    busy = f", load average {load[0]:.1f} at the start and {load[1]:.1f} at the end" if load else ""
    return (f"Training times (wall, evaluations included, as each run recorded them in `metrics.jsonl`; "
            f"measured {when} by `python benchmarks/reference.py` on {os.cpu_count()} CPU cores{busy}, "
            f"{platform.machine()}, torch {torch.__version__}, one torch thread): {times}. They are "
            f"benchmark figures, not checked by the tests; `benchmarks/train_speed.py` and "
            f"`benchmarks/grokking.py` time training against a baseline.")


# ------------------------------------------------------------------ the README's table
def between(text: str, start: str, end: str) -> str:
    """What ``text`` holds between the markers ``start`` and ``end`` (stripped)."""
    m = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, re.S)
    if m is None:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    return m.group(1).strip()


def replace_between(text: str, start: str, end: str, body: str) -> str:
    between(text, start, end)                                     # fails when the markers are missing
    pattern = re.escape(start) + r"\n.*?\n" + re.escape(end)
    return re.sub(pattern, lambda _: f"{start}\n{body}\n{end}", text, count=1, flags=re.S)


def readme_rows(text: str) -> dict[str, str]:
    """The README table's rows by their first cell (the model's name)."""
    out = {}
    for line in between(text, TABLE_START, TABLE_END).splitlines()[2:]:
        out[line.split("|")[1].strip()] = line
    return out


# ------------------------------------------------------------------ training
def run_for(name: str, runs_dir: Path, seed: int = 0, quiet: bool = True) -> tuple[qkov.Run, bool]:
    """The run of row ``name`` and whether it was reused: from ``runs_dir`` when it holds that setup
    finished, else trained there."""
    task_name, sets = ROWS[name]
    task, model_cfg, train_cfg = configure(task_name, dict(sets))
    path = runs_dir / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if store.is_finished(path) and store.read_config(path).same_setup(RunConfig(task, model_cfg, train_cfg, seed)):
        print(f"reusing {path}", file=sys.stderr)
        return store.load_run(path), True
    print(f"training {name} into {path} ...", file=sys.stderr, flush=True)
    run = qkov.train(task, out=path, seed=seed, model_config=model_cfg, train_config=train_cfg, quiet=quiet)
    return run, False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=None, help="run folder, one subfolder a row (default: a temp dir)")
    ap.add_argument("--write-readme", action="store_true", help="rewrite the table and the timings in README.md")
    ap.add_argument("--grokking", action="store_true", help="retrain the modadd p = 113 row too (slow)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)                     # as the test suite trains (tests/conftest.py)
    runs_dir = args.runs or Path(tempfile.mkdtemp(prefix="qkov-reference-"))
    load0 = os.getloadavg()[0]
    names = list(SUITE_ROWS) + (["`modadd` p = 113"] if args.grokking else [])
    got = {name: run_for(name, runs_dir) for name in names}
    runs = {name: run for name, (run, _) in got.items()}
    body = table(runs, kept=readme_rows(README.read_text()))
    # Reused runs keep the times they recorded; the load average is this invocation's, so it is
    # given only when every run trained now. With every run reused the README keeps its timings.
    fresh = not any(reused for _, reused in got.values())
    times = timings(runs, (load0, os.getloadavg()[0]) if fresh else None)
    print(body + "\n\n" + times)
    if args.write_readme:
        text = README.read_text()                # read again: others may have edited it meanwhile
        text = replace_between(text, TABLE_START, TABLE_END, body)
        if any(not reused for _, reused in got.values()):
            text = replace_between(text, TIMES_START, TIMES_END, times)
        README.write_text(text)
        print(f"wrote {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
