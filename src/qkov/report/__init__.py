"""Reports: plotly figures of a run's circuits and one self-contained HTML page per run.

>>> import qkov
>>> qkov.report.write_report("runs/max")                 # doctest: +SKIP
PosixPath('runs/max/report.html')

Three steps, one module each: :func:`gather` (``data.py``) calls the analyses and returns the
arrays, :mod:`~qkov.report.figures` turns arrays into plotly figures, :func:`render`
(``html.py``) lays them out in sections (``sections.py``) on one page. ``png.py`` redraws the
same figures as static PNGs with matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import QkovError
from ..store import atomic_write_text
from . import figures
from .data import ReportData, gather
from .html import figure_id, render
from .sections import Section, sections

__all__ = ["ReportData", "Section", "figure_id", "figures", "gather", "render", "sections", "write_pngs",
           "write_report"]


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
) -> Path:
    """Write the HTML report of ``run`` (a run directory, ``qkov.Run`` or ``load_run`` result).

    ``out`` defaults to ``<run dir>/report.html``. ``png``: also write each figure as a PNG into
    that folder. ``summary`` reuses a ``qkov.analyze(...).to_dict()``; ``token_labels`` and
    ``title`` override the task's labels and the page title (both are HTML-escaped). The page is
    written atomically: an error leaves no partial file. Returns the page's path. A sweep
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
    data = gather(run, summary=summary, token_labels=token_labels, title=title)
    secs = sections(data)
    page = render(data, secs)
    atomic_write_text(out, page)
    if png is not None:
        write_pngs(secs, png)
    return out
