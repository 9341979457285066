"""Reports: plotly figures of a run's circuits and one self-contained HTML page per run.

>>> import qkov
>>> qkov.report.write_report("runs/max")                 # doctest: +SKIP
PosixPath('runs/max/report.html')

Three steps, one module each: :func:`gather` (``data.py``) calls the analyses and returns the
arrays, :mod:`~qkov.report.figures` turns arrays into plotly figures, :func:`render`
(``html.py``) lays them out in sections (``sections.py``) on one page. ``png.py`` redraws the
same figures as static PNGs with matplotlib, ``thumbnail.py`` one of them as a small PNG with
numpy alone. :func:`write_inputs_page` draws the attention of ``qkov.show`` results.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import QkovError
from ..store import atomic_write_bytes, atomic_write_text
from . import figures
from .data import ReportData, examples_from_shown, gather
from .html import e, figure_id, page, render
from .sections import Section, key_figure, sections

__all__ = ["ReportData", "Section", "figure_id", "figures", "gather", "key_figure", "render", "sections",
           "write_inputs_page", "write_plotly_js", "write_pngs", "write_report"]


def write_plotly_js(path: str | Path) -> Path:
    """plotly.js (from the installed ``plotly`` package) as one file, for pages that share it
    (``write_report(..., plotly_js=<its relative address>)``). Written atomically."""
    from plotly.offline import get_plotlyjs

    atomic_write_text(path, get_plotlyjs())
    return Path(path)


def write_pngs(secs: list[Section], folder: str | Path) -> list[Path]:
    """Every figure of ``secs`` as ``folder/<figure name>.png`` (matplotlib, no browser)."""
    from .png import to_png

    folder = Path(folder)
    return [to_png(fig, folder / f"{figure_id(name)[4:]}.png") for s in secs for name, fig in s.figures]


def write_report(
    run,
    out: str | Path | None = None,
    png: str | Path | None = None,
    summary: dict[str, Any] | None = None,
    token_labels: Sequence[str] | None = None,
    title: str | None = None,
    inputs: Sequence[str] | None = None,
    plotly_js: str | None = None,
    thumbnail: str | Path | None = None,
) -> Path:
    """Write the HTML report of ``run`` (a run directory, ``qkov.Run`` or ``load_run`` result).

    ``out`` defaults to ``<run dir>/report.html``. ``png``: also write each figure as a PNG into
    that folder. ``summary`` reuses a ``qkov.analyze(...).to_dict()``; ``token_labels`` and
    ``title`` override the task's labels and the page title (both are HTML-escaped).
    ``inputs``: the examples whose attention the page draws, as the task writes them
    (``["52 59", "35 14 47 61 38 54"]``; default: the task's own). ``plotly_js``: the relative
    address of a shared plotly.js file instead of inlining it (the tour's pages share one).
    ``thumbnail``: also write the model's key figure (:func:`key_figure`) there as a small PNG.
    The page is written atomically: an error leaves no partial file. Returns the page's path. A sweep
    directory (``qkov sweep``'s ``--out``) gets the sweep page instead (:mod:`.sweep`).
    """
    from ..registry import is_sweep_dir

    if isinstance(run, (str, Path)) and is_sweep_dir(run):
        if png is not None:
            raise QkovError(f"--png draws one run's figures; pass one run's directory ({run}/NAME), not the sweep's")
        from .sweep import write_sweep_report

        return write_sweep_report(run, out)
    if png is not None:
        from .png import require_matplotlib

        require_matplotlib()                 # fail before writing anything
    if out is None:
        path = getattr(run, "path", None) if not isinstance(run, (str, Path)) else run
        if path is None:
            raise QkovError("an in-memory run has no directory to write report.html into; pass out=PATH")
        out = Path(path) / "report.html"
    out = Path(out)
    if out.is_dir():
        raise QkovError(f"{out} is a directory; pass the report's file name, e.g. {out / 'report.html'}")
    data = gather(run, summary=summary, token_labels=token_labels, title=title, inputs=inputs)
    secs = sections(data)
    atomic_write_text(out, render(data, secs, plotly_js=plotly_js))
    if png is not None:
        write_pngs(secs, png)
    if thumbnail is not None:
        key = key_figure(secs)
        if key is not None:
            from .thumbnail import thumbnail_png

            atomic_write_bytes(thumbnail, thumbnail_png(key[1]))
    return out


def write_inputs_page(shown: Sequence[Any], out: str | Path, title: str = "qkov show") -> Path:
    """An HTML page of every head's attention on ``qkov.show`` results (``qkov show --html``),
    each panel titled with its input and the model's answer. Written atomically."""
    out = Path(out)
    if out.is_dir():
        raise QkovError(f"{out} is a directory; pass the page's file name, e.g. {out / 'show.html'}")
    examples = examples_from_shown(shown)
    n_layers, n_heads = examples[0].patterns.shape[:2]
    sec = Section("attention", "Attention patterns",
                  "Every head's attention on each input: row q shows how query position q spreads its attention "
                  "over key positions 0..q. Axes read (position) token; panel titles: the input → the model's answer.")
    sec.figures = [(f"attention-{l}.{h}", figures.attention_patterns(examples, l, h))
                   for l in range(n_layers) for h in range(n_heads)]
    answers = "".join(f"<li><code>{e(s.input)}</code> → <code>{e(s.output)}</code>"
                      + ("" if s.expected is None else f" (expected <code>{e(s.expected)}</code>)") + "</li>"
                      for s in shown)
    n = len(examples)
    atomic_write_text(out, page(title, f"{n} input{'s' * (n != 1)}", [sec], f"<ul>{answers}</ul>"))
    return out
