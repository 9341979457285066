"""One self-contained HTML page per run: findings box, sections, plotly.js embedded once.

The page works offline: plotly.js comes from the installed ``plotly`` package and is inlined
once; every figure's JSON sits in a ``<script type="application/json">`` next to its container
and one inline script draws them all. Nothing on the page refers to a network address. All text
that comes from a task, a run or a user (token labels, titles, config values) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.utils import PlotlyJSONEncoder

from .data import ReportData
from .figures import figure_dict
from .sections import Section, sections

PLOTLY_CONFIG = {"responsive": True, "displaylogo": False}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222;
       background: #fafafa; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 4em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
#findings { background: #fff8e1; border: 1px solid #f0c36d; border-radius: 6px; padding: 0.6em 1.2em; }
#findings h2 { border: none; margin: 0.3em 0; font-size: 1.2em; }
#findings li { margin: 0.3em 0; }
nav a { margin-right: 1em; }
.explain { max-width: 75ch; color: #333; }
.qkov-figure { background: #fff; border: 1px solid #eee; margin: 1em 0; min-height: 200px; }
table.card { border-collapse: collapse; display: inline-table; margin: 0 1.5em 1em 0; vertical-align: top;
             background: #fff; font-size: 0.9em; }
table.card caption { font-weight: bold; text-align: left; padding: 0.2em 0; }
table.card td { border: 1px solid #e5e5e5; padding: 0.15em 0.6em; }
.note { color: #8a6d3b; }
footer { color: #888; font-size: 0.85em; margin-top: 3em; }
"""

DRAW_JS = """
(function () {
  var divs = document.querySelectorAll(".qkov-figure");
  for (var i = 0; i < divs.length; i++) {
    var div = divs[i];
    var spec = JSON.parse(document.getElementById(div.id + "-json").textContent);
    Plotly.newPlot(div, spec.data, spec.layout, %s);
  }
})();
""" % json.dumps(PLOTLY_CONFIG)  # noqa: UP031 (JavaScript: str.format would need every brace doubled)


def e(x: Any) -> str:
    """HTML-escape any value for text or attribute content."""
    return html.escape(str(x), quote=True)


def script_json(obj: Any) -> str:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` as ``\\u003c`` etc., so no tag closes it."""
    text = json.dumps(obj, cls=PlotlyJSONEncoder, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def figure_id(name: str) -> str:
    """The page id of a figure's container, from its name (``qk-positions-0.0`` -> ``fig-qk-positions-0-0``)."""
    return "fig-" + "".join(c if c.isalnum() or c == "-" else "-" for c in name)


def _figure_html(name: str, fig: go.Figure) -> str:
    fid = figure_id(name)
    spec = figure_dict(fig)
    return (f'<div class="qkov-figure" id="{fid}" data-figure="{e(name)}"></div>\n'
            f'<script type="application/json" id="{fid}-json">{script_json(spec)}</script>')


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return str(v)


def _table(caption: str, rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><td>{e(k)}</td><td>{e(_value(v))}</td></tr>" for k, v in rows)
    return f'<table class="card"><caption>{e(caption)}</caption>{body}</table>'


def findings_html(findings: list[dict[str, Any]]) -> str:
    """The findings box: one list item per finding, its number also in ``data-value``."""
    items = "".join(
        f'<li class="finding" data-id="{e(f["id"])}" data-value="{e(json.dumps(f["value"]))}">{e(f["text"])}</li>'
        for f in findings
    )
    return f'<section id="findings"><h2>Findings</h2><ul>{items}</ul></section>'


def _section_html(s: Section) -> str:
    parts = [f'<section id="{e(s.id)}"><h2>{e(s.title)}</h2>', f'<p class="explain">{e(s.explain)}</p>']
    parts += [_table(c, rows) for c, rows in s.tables]
    parts += [_figure_html(name, fig) for name, fig in s.figures]
    parts.append("</section>")
    return "\n".join(parts)


def plotly_script(plotly_js: str | None = None) -> str:
    """The ``<script>`` that loads plotly.js: inlined (``None``), or from ``plotly_js``, the
    relative address of a shared copy beside the page (a tour's pages share one; still offline)."""
    if plotly_js is None:
        return f'<script type="text/javascript">{get_plotlyjs()}</script>'
    return f'<script type="text/javascript" src="{e(plotly_js)}"></script>'


def page(title: str, sub: str, secs: list[Section], top: str = "", plotly_js: str | None = None) -> str:
    """A page of sections: the title, a line under it (HTML), ``top`` (HTML) above the navigation,
    every section's figures drawn by one script."""
    from .. import __version__

    nav = " ".join(f'<a href="#{e(s.id)}">{e(s.title)}</a>' for s in secs)
    body = "\n".join(_section_html(s) for s in secs)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{CSS}</style>
{plotly_script(plotly_js)}
</head>
<body>
<main>
<h1>{e(title)}</h1>
<p class="sub">{sub}</p>
{top}
<nav>{nav}</nav>
{body}
<footer>Written by qkov {e(__version__)}.
Figures are plotly: drag to zoom, double-click to reset, hover for values.</footer>
</main>
<script type="text/javascript">{DRAW_JS}</script>
</body>
</html>
"""


def render(data: ReportData, secs: list[Section] | None = None, plotly_js: str | None = None) -> str:
    """The whole page as one string (plotly.js inlined once, or loaded from ``plotly_js``)."""
    secs = sections(data) if secs is None else secs
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in data.notes)
    sub = f"run directory {e(data.run_dir)}" if data.run_dir else "in-memory run"
    sub += f"; task {e(data.task.get('name', ''))}"
    return page(data.title, sub, secs, findings_html(data.findings) + "\n" + notes, plotly_js)
