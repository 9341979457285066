"""A sweep directory's run registry: one SQLite row per run (``DIR/qkov.db``, WAL mode).

A row is a function of its run directory (``config.json``, ``metrics.jsonl``, ``summary.json``
and ``sweep.json``, read through :mod:`qkov.store`): :func:`row_from_dir` computes it, the sweep
driver upserts it as each run finishes, and :meth:`Registry.rebuild` recomputes every row from
the directories, which are the truth. Only one process writes (the sweep's driver, or ``qkov
runs --rebuild``), under :func:`writer_lock`; readers open the database read-only.

A row (what ``qkov runs DIR --json`` prints) holds ``name``, ``path`` (the run directory),
``hash`` (of the run's task, model, train configs and seed), ``task``, ``seed``, ``settings``
(what differs from the task's reference configs), ``status`` (``done``, ``failed`` or
``incomplete``), ``error``, ``attempts``, timings, and the headline numbers the run's summary has:
``accuracy``, ``loss``, ``copying_score``, ``top_key_is_max``, ``key_frequencies``, ... (see
:func:`headline`).

>>> query([{"seed": 0, "accuracy": 1.0}, {"seed": 1, "accuracy": 0.5}], where=["accuracy<1"])
[{'seed': 1, 'accuracy': 0.5}]
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import store
from .errors import QkovError
from .store import RunConfig

DB = "qkov.db"
LOCK = ".qkov-writer.lock"
SCHEMA = 1
COLUMNS = ("hash", "name", "task", "seed", "status", "error", "attempts", "train_s", "analyze_s",
           "certify_s", "finished")
JSON_COLUMNS = ("settings", "metrics")


# ----------------------------------------------------------------- identity of a run
def config_hash(rc: RunConfig) -> str:
    """sha256 of the run's task, model and train configs and seed (not the qkov version)."""
    d = rc.to_dict()
    key = json.dumps({k: d[k] for k in ("task", "model", "train", "seed")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def settings_of(rc: RunConfig) -> dict[str, Any]:
    """What ``rc`` sets differently from its task's reference configs, as ``--set`` keys.

    >>> from qkov.tasks import configure
    >>> task, m, t = configure("max", {"max_len": "4", "lr": "3e-3"})
    >>> settings_of(RunConfig(task, m, t, 0))
    {'max_len': 4, 'lr': 0.003}
    """
    base = type(rc.task)()            # the task's own defaults (found by class: a task of your own too)
    out = {k: v for k, v in rc.task.params.items() if base.params.get(k) != v}
    for mine, ref in ((rc.model.to_dict(), rc.task.model_config().to_dict()),
                      (rc.train.to_dict(), rc.task.train_config().to_dict())):
        out.update({k: v for k, v in mine.items() if ref.get(k) != v and k not in out})
    return out


# ----------------------------------------------------------------- rows
def _best(heads: list[dict[str, Any]], key: str) -> float | None:
    values = [h[key] for h in heads if key in h]
    return max(values) if values else None


def headline(summary: dict[str, Any] | None, final: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The numbers a row carries: eval accuracy and loss, the most copying head's copying score
    and OV self top-1, attention to the max and the QK rank correlation, the strongest
    previous-token and induction heads, key frequencies and logit FVE, the certified bound;
    each only where the run's summary (or its sweep record) has it."""
    s = summary or {}
    ev = s.get("eval") or final
    heads, att, mlp = s.get("heads") or [], s.get("attention") or {}, s.get("mlp") or {}
    rank = (att.get("key_rank_correlation") or {})
    out: dict[str, Any] = {
        "steps_done": final.get("step"), "accuracy": ev.get("accuracy"), "loss": ev.get("loss"),
        "copying_score": _best(heads, "copying_score"), "ov_self_top1": _best(heads, "ov_self_top1"),
        "top_key_is_max": att.get("top_key_is_max"), "weight_on_max": att.get("weight_on_max"),
        "key_rank_correlation": (rank.get("by_q_pos") or {}).get(str(rank.get("q_pos"))),
        "previous_token_score": _best(heads, "previous_token_score"),
        "induction_score": _best(heads, "induction_score"),
        "logit_fve": mlp.get("logit_fve"), "certified_bound": record.get("certified_bound"),
    }
    if "key_frequencies" in mlp:
        out["key_frequencies"] = list(mlp["key_frequencies"])
        out["n_key_frequencies"] = len(mlp["key_frequencies"])
    return {k: v for k, v in out.items() if v is not None}


def row_from_dir(path: str | Path) -> dict[str, Any] | None:
    """The registry row of the run directory ``path`` (None when it is not a run directory)."""
    path = Path(path)
    if not store.is_run_dir(path):
        return None
    rc = store.read_config(path)
    try:
        summary, record = store.load_summary(path), store.load_sweep_record(path) or {}
        metrics = store.read_metrics(path)
    except QkovError as e:
        summary, record, metrics = None, {"status": "incomplete", "error": str(e)}, []
    done = record.get("status") == "done" and summary is not None and store.is_finished(path)
    status = "done" if done else record.get("status") if record.get("status") == "failed" else "incomplete"
    row = {"name": path.name, "path": str(path), "hash": config_hash(rc), "task": rc.task.name, "seed": rc.seed,
           "settings": settings_of(rc), "status": status, "error": record.get("error"),
           "attempts": record.get("attempt"), "train_s": record.get("train_s"),
           "analyze_s": record.get("analyze_s"), "certify_s": record.get("certify_s"),
           "finished": record.get("finished")}
    row.update(headline(summary, metrics[-1] if metrics else {}, record))
    return row


def run_dirs(sweep_dir: str | Path) -> list[Path]:
    """The run directories directly under ``sweep_dir``, by name."""
    d = Path(sweep_dir)
    return sorted(p for p in d.iterdir() if p.is_dir() and store.is_run_dir(p)) if d.is_dir() else []


def is_sweep_dir(path: str | Path) -> bool:
    """Whether ``path`` is a sweep directory: it has a registry, or holds run directories and is
    not one itself."""
    p = Path(path)
    return p.is_dir() and not store.is_run_dir(p) and ((p / DB).is_file() or bool(run_dirs(p)))


# ----------------------------------------------------------------- the database
@contextlib.contextmanager
def writer_lock(sweep_dir: str | Path) -> Iterator[None]:
    """Hold ``sweep_dir``'s writer lock (an exclusive ``flock``; none where fcntl is missing):
    one sweep driver, or one ``qkov runs --rebuild``, writes a sweep directory at a time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(Path(sweep_dir) / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QkovError(f"another qkov sweep (or qkov runs --rebuild) is writing {sweep_dir}; "
                            f"wait for it to finish, or pass another --out") from None
        yield


class Registry:
    """``DIR/qkov.db``: ``Registry(dir)`` reads; ``Registry(dir, write=True)`` (under
    :func:`writer_lock`) creates the database in WAL mode and writes rows."""

    def __init__(self, sweep_dir: str | Path, write: bool = False):
        self.dir = Path(sweep_dir)
        self.file = self.dir / DB
        if write:
            self.con = sqlite3.connect(self.file, timeout=30)
            self.con.execute("PRAGMA journal_mode=WAL")
            cols = ", ".join([f"{c} {'INTEGER' if c in ('seed', 'attempts') else 'TEXT'}" for c in COLUMNS[1:]]
                             + [f"{c} TEXT" for c in JSON_COLUMNS])
            self.con.execute(f"CREATE TABLE IF NOT EXISTS runs (hash TEXT PRIMARY KEY, {cols})")
            self.con.execute(f"PRAGMA user_version={SCHEMA}")
            self.con.commit()
        elif not self.file.is_file():
            raise QkovError(f"{self.dir} has no run registry ({DB}); run a sweep into it (qkov sweep TASK "
                            f"--seeds 0:10 --out {self.dir}) or rebuild it: qkov runs {self.dir} --rebuild")
        else:
            self.con = sqlite3.connect(f"file:{self.file}?mode=ro", uri=True, timeout=30)

    def close(self) -> None:
        self.con.close()

    def upsert(self, row: dict[str, Any]) -> None:
        """Insert or replace ``row`` (keyed by its ``hash``)."""
        fixed = {"settings", "path"} | set(COLUMNS)
        values = [row.get(c) for c in COLUMNS] + [json.dumps(row.get("settings", {})),
                                                  json.dumps({k: v for k, v in row.items() if k not in fixed})]
        names = ", ".join(COLUMNS + JSON_COLUMNS)
        self.con.execute(f"INSERT OR REPLACE INTO runs ({names}) VALUES ({', '.join('?' * len(values))})", values)
        self.con.commit()

    def delete(self, hashes: list[str]) -> None:
        self.con.executemany("DELETE FROM runs WHERE hash = ?", [(h,) for h in hashes])
        self.con.commit()

    def rows(self) -> list[dict[str, Any]]:
        """Every row, by run name; ``path`` is the run directory under this sweep directory."""
        cur = self.con.execute(f"SELECT {', '.join(COLUMNS + JSON_COLUMNS)} FROM runs ORDER BY name")
        out = []
        for values in cur.fetchall():
            d = dict(zip(COLUMNS + JSON_COLUMNS, values))
            metrics = json.loads(d.pop("metrics") or "{}")
            row = {"name": d["name"], "path": str(self.dir / d["name"]), **d,
                   "settings": json.loads(d["settings"] or "{}"), **metrics}
            for k in ("train_s", "analyze_s", "certify_s"):
                row[k] = float(row[k]) if row[k] is not None else None
            out.append(row)
        return out

    def sync(self) -> list[dict[str, Any]]:
        """Make the rows agree with the run directories: each directory's row recomputed, rows of
        deleted directories dropped (a failure recorded without a directory stays); returns the rows."""
        rows = [row_from_dir(p) for p in run_dirs(self.dir)]
        have = {r["hash"] for r in rows}
        self.delete([r["hash"] for r in self.rows() if r["hash"] not in have and r["status"] != "failed"])
        for r in rows:
            self.upsert(r)
        return self.rows()

    def rebuild(self) -> list[dict[str, Any]]:
        """Every row recomputed from the run directories alone (the database emptied first)."""
        self.con.execute("DELETE FROM runs")
        self.con.commit()
        return self.sync()


def read_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``sweep_dir``: from its registry, or computed from its run directories when it
    has none yet (nothing is written)."""
    if (Path(sweep_dir) / DB).is_file():
        reg = Registry(sweep_dir)
        try:
            return reg.rows()
        finally:
            reg.close()
    return [row_from_dir(p) for p in run_dirs(sweep_dir)]


# ----------------------------------------------------------------- queries
_WHERE = re.compile(r"^\s*([\w.]+)\s*(<=|>=|!=|=|<|>)(.*)$")


def lookup(row: dict[str, Any], key: str) -> Any:
    if key in row:
        return row[key]
    return row.get("settings", {}).get(key)


def _known_keys(rows: list[dict[str, Any]]) -> set[str]:
    return {k for r in rows for k in r} | {k for r in rows for k in r.get("settings", {})}


def _matches(value: Any, op: str, text: str) -> bool:
    if value is None:
        return op == "!="
    if isinstance(value, list):
        want = [x.strip() for x in text.strip("[]").split(",") if x.strip()]
        same = [str(v) for v in value] == want
        return same if op == "=" else (not same if op == "!=" else False)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            a, b = float(value), float(text)
        except ValueError:
            raise QkovError(f"--where compares a number with {text!r}; pass a number, e.g. accuracy>=0.99") from None
    else:
        a, b = str(value).lower(), text.strip().lower()
    return {"=": a == b, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]


def query(rows: list[dict[str, Any]], where: list[str] | None = None, sort: str | None = None) -> list[dict[str, Any]]:
    """Rows that pass every ``KEY=VALUE`` (or ``!=``, ``<``, ``>``, ``<=``, ``>=``) of ``where``
    (a key is a row field or a setting), sorted by ``sort`` (``-KEY``: descending; rows without
    the key last)."""
    known = _known_keys(rows)
    for clause in where or []:
        m = _WHERE.match(clause)
        if not m:
            raise QkovError(f"--where expects KEY=VALUE (or KEY<VALUE, ...), got {clause!r}; e.g. --where seed=3")
        key, op, text = m.groups()
        if rows and key not in known:
            raise QkovError(f"unknown key {key!r} in --where; known keys: {', '.join(sorted(known))}")
        rows = [r for r in rows if _matches(lookup(r, key), op, text)]
    if sort:
        key, reverse = sort.lstrip("-"), sort.startswith("-")
        if rows and key not in known:
            raise QkovError(f"unknown key {key!r} in --sort; known keys: {', '.join(sorted(known))}")
        present = [r for r in rows if lookup(r, key) is not None]
        missing = [r for r in rows if lookup(r, key) is None]
        rows = sorted(present, key=lambda r: _sort_key(lookup(r, key)), reverse=reverse) + missing
    return rows


def _sort_key(v: Any) -> tuple:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, json.dumps(v) if isinstance(v, list) else str(v))


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns of a table of ``rows``: seed, status, the settings, the numbers, then the rest."""
    first = ["seed", "status"]
    settings = sorted({k for r in rows for k in r.get("settings", {})})
    last = ["error", "attempts", "train_s", "analyze_s", "certify_s", "finished", "name", "path", "hash", "task"]
    numbers = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in first + last + ["settings"]]
    return first + settings + numbers + last


def cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return " ".join(map(str, v))
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """``rows`` as CSV, one column per :func:`columns` entry (lists space-separated)."""
    cols = columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([cell(lookup(r, c)) for c in cols])
    return buf.getvalue()


def to_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as an aligned text table (the headline columns; the path last)."""
    cols = [c for c in columns(rows) if c not in ("name", "hash", "task", "finished", "certify_s")]
    cells = [cols] + [[cell(lookup(r, c)) for c in cols] for r in rows]
    width = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, width)).rstrip() for line in cells)
