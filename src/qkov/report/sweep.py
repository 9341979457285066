"""The sweep page: what holds across a sweep's runs, drawn from its registry rows alone.

``qkov report DIR`` on a sweep directory writes ``DIR/report.html``: findings in words (how many
runs finished, in how many seeds each mechanism shows, how key frequencies vary), the
distribution across runs of each headline number (accuracy, copying score, attention to the
max, certified bound, ...), for MLP models on Z_p a histogram of key frequencies across seeds
and of how many each run uses, and a table of the runs (click a column to sort) linking each
run's own report where it has been written. Nothing is computed from weights here: the rows of
:mod:`qkov.registry` are the data.

>>> rows = [{"seed": s, "status": "done", "accuracy": 1.0, "top_key_is_max": 0.999} for s in range(3)]
>>> [f["text"] for f in sweep_findings(rows)][2]
'The last position attends most to a maximal token (on at least 99% of inputs) in 3 of 3 seeds (min 0.999).'
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .. import registry
from ..analyze import DETECTED
from ..errors import QkovError
from ..store import atomic_write_text
from .figures import TEMPLATE, figure_dict
from .html import CSS, DRAW_JS, e, figure_id, script_json

__all__ = ["DISTRIBUTIONS", "sweep_findings", "sweep_page", "varying_settings", "write_sweep_report"]

# Headline numbers drawn as distributions: (row key, title, what a run must reach for the
# mechanism to count as present in it, the words for that mechanism).
DISTRIBUTIONS = [
    ("accuracy", "Accuracy", 0.99, "accuracy is at least 99%"),
    ("certified_bound", "Certified accuracy (lower bound)", 0.99, "the certified accuracy bound is at least 99%"),
    ("top_key_is_max", "Attention to the max (share of inputs)", 0.99,
     "the last position attends most to a maximal token (on at least 99% of inputs)"),
    ("key_rank_correlation", "QK rank correlation of keys with their value", 0.95,
     "the QK circuit ranks keys by value (rank correlation at least 0.95)"),
    ("copying_score", "Copying score of the most copying head", 0.9,
     "the OV circuit copies (copying score at least 0.9)"),
    ("previous_token_score", "Best previous-token score", DETECTED,
     f"a head is a previous-token head (score at least {DETECTED})"),
    ("induction_score", "Best induction score", DETECTED, f"a head is an induction head (score at least {DETECTED})"),
    ("logit_fve", "Logit variance explained by the key frequencies", 0.8,
     "the key frequencies explain at least 80% of the logit variance"),
    ("loss", "Final loss", None, ""),
]


def _numbers(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def _finding(id_: str, text: str, value: Any) -> dict[str, Any]:
    return {"id": id_, "text": text, "value": value}


def _frequency_findings(done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    sets = [tuple(r["key_frequencies"]) for r in done if "key_frequencies" in r]
    if not sets:
        return []
    distinct = len(set(sets))
    counts = Counter(k for s in sets for k in s)
    top = ", ".join(f"k={k} ({n})" for k, n in counts.most_common(3))
    if distinct == len(sets) and len(sets) > 1:
        how = "different in every seed"
    elif distinct == 1:
        how = f"the same in every seed ({list(sets[0])})"
    else:
        how = f"{distinct} different sets over {len(sets)} seeds"
    sizes = [len(s) for s in sets]
    return [_finding("key_frequencies", f"Key frequencies are {how}, {min(sizes)}-{max(sizes)} per seed "
                     f"(median {statistics.median(sizes):g}); the most common: {top} seeds.", distinct)]


def sweep_findings(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The page's findings in words, each with the number it states (``id``, ``text``, ``value``)."""
    done = [r for r in rows if r.get("status") == "done"]
    failed = [r for r in rows if r.get("status") == "failed"]
    text = f"{len(done)} of {len(rows)} runs are done"
    if failed:
        text += f"; {len(failed)} failed (e.g. seed {failed[0].get('seed')}: {failed[0].get('error')})"
    out = [_finding("done", text + ".", len(done))]
    for key, _title, threshold, words in DISTRIBUTIONS:
        values = _numbers(done, key)
        if not values:
            continue
        if threshold is None:
            out.append(_finding(key, f"{_title}: median {statistics.median(values):.3g} (min {min(values):.3g}, "
                                f"max {max(values):.3g}) over {len(values)} runs.", statistics.median(values)))
            continue
        hits = sum(v >= threshold for v in values)
        sentence = words[0].upper() + words[1:]
        out.append(_finding(key, f"{sentence} in {hits} of {len(values)} seeds (min {min(values):.4g}).", hits))
    return out + _frequency_findings(done)


# ----------------------------------------------------------------------- figures (they draw rows)
def varying_settings(rows: list[dict[str, Any]]) -> list[str]:
    """The settings whose values differ between ``rows`` (the grid's axes besides the seed)."""
    keys = sorted({k for r in rows for k in r.get("settings", {})})
    return [k for k in keys if len({json.dumps(r.get("settings", {}).get(k)) for r in rows}) > 1]


def _histogram(rows: list[dict[str, Any]], key: str, title: str) -> go.Figure:
    groups: dict[str, list[Any]] = {}
    axes = varying_settings(rows)
    for r in rows:
        if isinstance(r.get(key), (int, float)):
            label = ", ".join(f"{k}={r.get('settings', {}).get(k)}" for k in axes) or "all runs"
            groups.setdefault(label, []).append(r[key])
    fig = go.Figure([go.Histogram(x=v, name=k, opacity=0.75) for k, v in groups.items()])
    fig.update_layout(template=TEMPLATE, title=title, barmode="overlay", height=320,
                      xaxis_title=title, yaxis_title="runs", showlegend=len(groups) > 1)
    return fig


def _frequency_figures(rows: list[dict[str, Any]]) -> list[tuple[str, go.Figure]]:
    with_freqs = [r for r in rows if "key_frequencies" in r]
    if not with_freqs:
        return []
    every = [k for r in with_freqs for k in r["key_frequencies"]]
    freq = go.Figure(go.Histogram(x=every, xbins={"size": 1}))
    freq.update_layout(template=TEMPLATE, title="Key frequencies across seeds", height=320,
                       xaxis_title="frequency k", yaxis_title="seeds using k")
    count = go.Figure(go.Histogram(x=[len(r["key_frequencies"]) for r in with_freqs], xbins={"size": 1}))
    count.update_layout(template=TEMPLATE, title="Key frequencies per seed", height=320,
                        xaxis_title="how many key frequencies", yaxis_title="seeds")
    return [("key-frequencies", freq), ("key-frequency-count", count)]


def _figure_html(name: str, fig: go.Figure) -> str:
    fid = figure_id(name)
    return (f'<div class="qkov-figure" id="{fid}" data-figure="{e(name)}"></div>\n'
            f'<script type="application/json" id="{fid}-json">{script_json(figure_dict(fig))}</script>')


# ----------------------------------------------------------------------- the table and page
SORT_JS = """
document.querySelectorAll("#runs th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = document.querySelector("#runs tbody"), rows = Array.from(body.rows);
    var up = th.dataset.dir !== "up"; th.dataset.dir = up ? "up" : "down";
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _runs_table(rows: list[dict[str, Any]], sweep_dir: Path) -> str:
    cols = [c for c in registry.columns(rows) if c not in ("path", "hash", "task", "finished", "name")] + ["name"]
    head = "".join(f"<th title='click to sort'>{e(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = registry.lookup(r, c)
            text = registry.cell(v)
            if c == "name" and (sweep_dir / text / "report.html").is_file():
                text_html = f'<a href="{e(text)}/report.html">{e(text)}</a>'
            elif c == "name":
                text_html = f'<span title="qkov report {e(sweep_dir / text)}">{e(text)}</span>'
            else:
                text_html = e(text)
            cells.append(f'<td data-v="{e(text)}">{text_html}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table id="runs" class="card"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def sweep_page(rows: list[dict[str, Any]], sweep_dir: Path, title: str) -> str:
    """The whole sweep page as one string (plotly.js inlined once; works offline)."""
    from .. import __version__

    done = [r for r in rows if r.get("status") == "done"]
    figs = [(key, _histogram(done, key, t)) for key, t, _, _ in DISTRIBUTIONS if _numbers(done, key)]
    figs += _frequency_figures(done)
    items = "".join(f'<li class="finding" data-id="{e(f["id"])}" data-value="{e(json.dumps(f["value"]))}">'
                    f'{e(f["text"])}</li>' for f in sweep_findings(rows))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{CSS} #runs th {{ cursor: pointer; background: #f3f3f3; }} #runs td {{ text-align: right; }}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head>
<body>
<main>
<h1>{e(title)}</h1>
<p class="sub">sweep directory {e(sweep_dir)}; {len(rows)} runs</p>
<section id="findings"><h2>Findings</h2><ul>{items}</ul></section>
<section id="distributions"><h2>Across runs</h2>
<p class="explain">Each histogram counts the finished runs by one headline number; a run's number comes from its
own analysis (summary.json), colours separate the settings of the grid.</p>
{"".join(_figure_html(name, fig) for name, fig in figs)}
</section>
<section id="table"><h2>Runs</h2>
<p class="explain">Click a column to sort. A run's name links to its own report once written
(qkov report DIR/NAME).</p>
{_runs_table(rows, sweep_dir)}
</section>
<footer>Written by qkov {e(__version__)} from the sweep's registry ({registry.DB}).</footer>
</main>
<script type="text/javascript">{DRAW_JS}{SORT_JS}</script>
</body>
</html>
"""


def write_sweep_report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the sweep page of ``sweep_dir`` (default ``<sweep_dir>/report.html``), atomically."""
    sweep_dir = Path(sweep_dir)
    rows = registry.read_rows(sweep_dir)
    if not rows:
        raise QkovError(f"{sweep_dir} holds no runs yet; run a sweep into it: "
                        f"qkov sweep TASK --seeds 0:10 --out {sweep_dir}")
    out = Path(out) if out is not None else sweep_dir / "report.html"
    if out.is_dir():
        raise QkovError(f"{out} is a directory; pass the report's file name, e.g. {out / 'report.html'}")
    tasks = sorted({r.get("task", "") for r in rows})
    axes = varying_settings(rows)
    shared = {k: v for k, v in rows[0].get("settings", {}).items() if k not in axes}
    title = f"Sweep: {', '.join(tasks)}" + (f" ({', '.join(f'{k}={v}' for k, v in shared.items())})" if shared else "")
    atomic_write_text(out, sweep_page(rows, sweep_dir, f"{title}, {len(rows)} runs"))
    return out
