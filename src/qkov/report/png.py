"""Static PNGs of report figures: matplotlib redraws the arrays each plotly figure holds.

No browser is needed (``pip install 'qkov[png]'`` brings matplotlib). :func:`to_png` reads a
plotly figure's traces (heatmaps, lines, markers, bars) and layout (subplot domains, secondary
axes, log scales, titles) and draws the same numbers, in the figure's initial state (for the
position-aware QK circuit: the pair its dropdown shows first).
"""

from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QkovError
from ..store import atomic_write_bytes
from .figures import figure_dict

MAX_TICKS = 16
COLORWAY = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]  # plotly's default trace colours, in trace order
PLOT_AREA = (0.08, 0.1, 0.88, 0.78)   # left, bottom, width, height of the paper in figure coords


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise QkovError("--png needs matplotlib; install it with: pip install 'qkov[png]'") from None
    return plt


def _text(s: Any) -> str:
    """Plotly text (HTML-escaped, maybe with <br>) as literal matplotlib text."""
    t = html.unescape(str(s or "")).replace("<br>", "\n")
    return t.replace("$", r"\$")


def _title(obj: Any) -> str:
    if isinstance(obj, dict):
        return _text(obj.get("text", ""))
    return _text(obj)


def _axis_name(ref: str, kind: str) -> str:
    """Trace axis ref ('x', 'x2') -> layout key ('xaxis', 'xaxis2')."""
    return f"{kind}axis{ref[1:]}"


def _ticks(ax, labels: list[str], axis: str) -> None:
    n = len(labels)
    step = max(1, int(np.ceil(n / MAX_TICKS)))
    idx = list(range(0, n, step))
    if axis == "x":
        ax.set_xticks(idx)
        long = n > 8 or sum(len(str(x)) for x in labels) > 40
        ax.set_xticklabels([_text(labels[i]) for i in idx], rotation=90 if long else 0, fontsize=7)
    else:
        ax.set_yticks(idx)
        ax.set_yticklabels([_text(labels[i]) for i in idx], fontsize=7)


def _heatmap(ax, tr: dict[str, Any], yrev: bool, fig) -> None:
    z = np.asarray(tr["z"], dtype=float)
    if tr.get("colorscale") in ("Blues", [["0", "Blues"]]) or "zmid" not in tr:
        cmap, vmin, vmax = "Blues", tr.get("zmin"), tr.get("zmax")
    else:
        cmap = "RdBu_r" if tr.get("reversescale") else "RdBu"
        m = float(np.nanmax(np.abs(z - tr.get("zmid", 0)))) or 1.0
        vmin, vmax = tr.get("zmid", 0) - m, tr.get("zmid", 0) + m
    im = ax.imshow(z, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, origin="upper" if yrev else "lower",
                   interpolation="nearest")
    if tr.get("x") is not None:
        _ticks(ax, list(tr["x"]), "x")
    if tr.get("y") is not None:
        _ticks(ax, list(tr["y"]), "y")
    if tr.get("showscale", True) is not False:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)


def _xy(ax, tr: dict[str, Any], cats: dict[str, int]) -> np.ndarray:
    x = list(tr.get("x") or range(len(tr.get("y") or [])))
    if x and isinstance(x[0], str):
        for v in x:
            cats.setdefault(v, len(cats))
        return np.array([cats[v] for v in x], dtype=float)
    return np.asarray(x, dtype=float)


def _draw_trace(ax, tr: dict[str, Any], layout: dict[str, Any], fig, cats: dict[str, int], bar_slot,
                default_color: str) -> None:
    kind = tr.get("type", "scatter")
    name = _text(tr.get("name", "")) or None
    if kind == "heatmap":
        yrev = layout.get(_axis_name(tr.get("yaxis", "y"), "y"), {}).get("autorange") == "reversed"
        _heatmap(ax, tr, yrev, fig)
        return
    x = _xy(ax, tr, cats)
    y = np.asarray([np.nan if v is None else v for v in tr.get("y", [])], dtype=float)
    if kind == "bar":
        i, n = bar_slot
        width = 0.8 / n
        color = (tr.get("marker") or {}).get("color")
        ax.bar(x + (i - (n - 1) / 2) * width, y, width=width, label=name,
               color=color if isinstance(color, (str, list)) else default_color)
    else:
        mode = tr.get("mode", "lines")
        dash = (tr.get("line") or {}).get("dash")
        ax.plot(x, y, label=name if tr.get("showlegend", True) is not False else None,
                linestyle=(":" if dash == "dot" else "-") if "lines" in mode else "none",
                marker="o" if "markers" in mode else None, markersize=4,
                color=(tr.get("line") or {}).get("color") or default_color)


def to_png(fig_plotly, path: str | Path, dpi: int = 110) -> Path:
    """Draw a plotly figure with matplotlib and write it to ``path`` (atomically)."""
    plt = require_matplotlib()
    spec = figure_dict(fig_plotly)
    layout, traces = spec.get("layout", {}), spec.get("data", [])
    height = float(layout.get("height") or 450)
    fig = plt.figure(figsize=(10, max(3.5, height / 95)))
    axes: dict[tuple[str, str], Any] = {}
    cats: dict[tuple[str, str], dict[str, int]] = {}
    L, B, W, H = PLOT_AREA

    def get_ax(xr: str, yr: str):
        key = (xr, yr)
        if key in axes:
            return axes[key]
        ya = layout.get(_axis_name(yr, "y"), {})
        if ya.get("overlaying"):
            base = get_ax(xr, ya["overlaying"])
            ax = base.twinx()
        else:
            xd = layout.get(_axis_name(xr, "x"), {}).get("domain", [0, 1])
            yd = ya.get("domain", [0, 1])
            ax = fig.add_axes([L + W * xd[0], B + H * yd[0], W * (xd[1] - xd[0]) * 0.92, H * (yd[1] - yd[0])])
        xa = layout.get(_axis_name(xr, "x"), {})
        ax.set_xlabel(_title(xa.get("title")), fontsize=8)
        ax.set_ylabel(_title(ya.get("title")), fontsize=8)
        if ya.get("type") == "log":
            ax.set_yscale("log")
        if ya.get("range") and ya.get("type") != "log":
            ax.set_ylim(*ya["range"])
        if xa.get("range"):
            ax.set_xlim(*xa["range"])
        if ya.get("scaleanchor"):
            ax.set_aspect("equal", adjustable="box")
        ax.tick_params(labelsize=7)
        axes[key] = ax
        return ax

    bars = [t for t in traces if t.get("type") == "bar"]
    for i, tr in enumerate(traces):
        key = (tr.get("xaxis", "x"), tr.get("yaxis", "y"))
        ax = get_ax(*key)
        slot = (bars.index(tr) if tr in bars else 0, max(1, len(bars)))
        _draw_trace(ax, tr, layout, fig, cats.setdefault(key, {}), slot, COLORWAY[i % len(COLORWAY)])
    for key, c in cats.items():
        if c:
            _ticks(axes[key], list(c), "x")
    handles = [h for ax in axes.values() for h in ax.get_legend_handles_labels()[0]]
    names = [n for ax in axes.values() for n in ax.get_legend_handles_labels()[1]]
    if len(names) > 1:
        fig.legend(handles, names, loc="upper right", fontsize=7, frameon=False)
    fig.suptitle(_title(layout.get("title")), x=0.02, ha="left", fontsize=10)
    for ann in layout.get("annotations", []):
        if ann.get("xref", "paper") == "paper" and ann.get("yref", "paper") == "paper":
            fig.text(L + W * ann.get("x", 0), B + H * ann.get("y", 1) + 0.01, _text(ann.get("text")),
                     ha="center", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
