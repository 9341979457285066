"""``qkov tour``: the circuits-by-example walkthrough end to end, told by measured numbers.

:func:`tour` trains (or reuses) the ``max``, ``add`` and ``fib`` models with their reference
settings, analyses each, writes one report per model and an ``index.html`` that tells the
walkthrough's story with the numbers it measured: for ``max``, the QK circuit prefers larger
tokens once positions are added and the OV circuit copies; for ``add`` and ``fib``, the neurons
are periodic in the token value and the two models share frequencies.

Layout of ``out``::

    index.html                 the story, with links to the reports and a thumbnail of each
    plotly.min.js              plotly.js, once, shared by the reports (no network needed)
    max/ add/ fib/             run directories (config.json, model.safetensors, ...)
    max/report.html ...        one report per model
    max/thumbnail.png ...      its key figure, small (qkov.report.key_figure)

A run directory whose ``config.json`` has the same setup and that holds a model is reused, so a
second ``qkov tour`` only re-analyses and rewrites the pages.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .analyze import analyze, frequency_comparison
from .errors import QkovError
from .report import write_plotly_js, write_report
from .report.data import dominant_frequencies, finding
from .report.html import CSS, e
from .store import RunConfig, atomic_write_text, is_finished, is_run_dir, load_run, read_config
from .tasks import get_task
from .train import train

TOUR_TASKS = ("max", "add", "fib")

INTRO = {
    "max": ("Max of a list",
            "One attention head, no MLP, predicts the largest of up to six numbers. The walkthrough's claim: the "
            "QK circuit prefers larger key tokens, cleanly so once the positional embeddings are added (compare "
            "the rank correlations with and without positions), so the last position attends to the maximum; the "
            "OV circuit then copies that token to the output."),
    "add": ("Addition",
            "One attention head and one MLP layer add two numbers. The walkthrough's claim: the MLP neurons read "
            "the attended token through periodic functions of its value, so the sum is computed with waves."),
    "fib": ("Fibonacci",
            "The same architecture predicts each next term of a Fibonacci-like sequence, a sum of the two "
            "previous terms. The walkthrough's claim: it reuses the trick of addition, with periodic neurons at "
            "frequencies shared with the addition model."),
}


@dataclass
class TourEntry:
    """One model of the tour: its run directory, report, analysis and timings."""

    task: str
    path: Path
    report: Path
    summary: dict[str, Any]
    reused: bool
    train_s: float
    analyze_s: float
    report_s: float


@dataclass
class TourResult:
    out: Path
    index: Path
    entries: list[TourEntry] = field(default_factory=list)
    frequency_overlap: float | None = None
    shared_frequencies: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0


def _reusable(path: Path, rc: RunConfig) -> bool:
    """True when ``path`` holds a finished run with exactly this setup; an error for another run."""
    if not is_run_dir(path):
        if path.exists() and any(path.iterdir()):
            raise QkovError(f"{path} exists and is not a qkov run directory; delete it or pass another -o DIR")
        return False
    try:
        old = read_config(path)
    except QkovError:
        return False                         # a damaged config: train() replaces the run
    if not old.same_setup(replace(rc, train=rc.train.replace(threads=old.train.threads))):  # threads: speed only
        raise QkovError(
            f"{path} holds a {old.task.name} run with a different setup from the tour's (seed {rc.seed}, "
            f"reference settings); delete {path} to retrain it, or pass another -o DIR"
        )
    return is_finished(path)


def tour(
    out: str | Path = "tour",
    seed: int = 0,
    steps: int | None = None,
    tasks: Sequence[str] = TOUR_TASKS,
    quiet: bool = False,
    threads: int = 0,
) -> TourResult:
    """Train or reuse each of ``tasks`` (reference settings; ``steps`` overrides their step
    counts, for quick looks), analyse it, write its report and ``out/index.html``. ``threads``
    is ``TrainConfig.threads`` for the training (0: chosen as each run trains, see
    :class:`qkov.threads.ThreadPolicy`); it changes how fast, never what is trained, so a run
    trained with another count is reused.

    Progress goes to stderr unless ``quiet``. Returns a :class:`TourResult` with the timings.
    """
    t_start = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QkovError(f"{out} is a file; qkov tour writes a folder of runs and reports, pass -o DIR")
    say = (lambda msg: None) if quiet else (lambda msg: print(f"qkov tour: {msg}", file=sys.stderr, flush=True))
    unknown = [t for t in tasks if t not in INTRO]
    if unknown:
        raise QkovError(f"the tour covers {', '.join(TOUR_TASKS)}; got {', '.join(unknown)}")

    # Check every run directory before training anything: a clash stops the tour up front.
    plans = []
    for name in tasks:
        task = get_task(name)
        cfg = task.train_config().replace(threads=threads, **({} if steps is None else {"steps": steps}))
        rc = RunConfig(task, task.model_config(), cfg, seed)
        plans.append((name, task, rc, out / name, _reusable(out / name, rc)))

    entries, models = [], {}
    plotly_js = write_plotly_js(out / "plotly.min.js")     # one copy for every page, not one per page
    for i, (name, task, rc, path, reuse) in enumerate(plans, 1):
        t0 = time.perf_counter()
        if reuse:
            say(f"[{i}/{len(plans)}] {name}: reusing the trained model in {path}")
            run = load_run(path)
        else:
            say(f"[{i}/{len(plans)}] {name}: training {rc.train.steps} steps into {path} ...")
            run = train(task, out=path, seed=seed, model_config=rc.model, train_config=rc.train, quiet=quiet)
        t1 = time.perf_counter()
        if not reuse:
            say(f"[{i}/{len(plans)}] {name}: trained in {t1 - t0:.0f} s, accuracy {run.metrics[-1]['accuracy']:.2%}")
        summary = analyze(run.model, task, checkpoints=run.checkpoints()).to_dict()
        t2 = time.perf_counter()
        report = write_report(run, out=path / "report.html", summary=summary, thumbnail=path / "thumbnail.png",
                              plotly_js=Path(os.path.relpath(plotly_js, path)).as_posix())
        t3 = time.perf_counter()
        say(f"[{i}/{len(plans)}] {name}: analysed in {t2 - t1:.1f} s, report {report} in {t3 - t2:.1f} s")
        entries.append(TourEntry(name, path, report, summary, reuse, t1 - t0, t2 - t1, t3 - t2))
        models[name] = run.model

    result = TourResult(out, out / "index.html", entries)
    if "add" in models and "fib" in models:
        cmp = frequency_comparison(models["add"], models["fib"])
        result.frequency_overlap = cmp["frequency_overlap"]
        result.shared_frequencies = cmp["shared_dominant_frequencies"]
    result.elapsed_s = time.perf_counter() - t_start
    atomic_write_text(result.index, index_html(result))
    say(f"wrote {result.index} in {result.elapsed_s:.0f} s")
    return result


# ------------------------------------------------------------------------- the index page
def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _story(entry: TourEntry, result: TourResult) -> list[str]:
    """Sentences with this model's measured numbers, in the walkthrough's order."""
    s = entry.summary
    lines = [f["text"] for f in s.get("findings", [])]
    freqs = dominant_frequencies(s)
    stated = finding(s, "dominant_frequency") is not None          # the findings already name the top one
    rest = freqs[1:3] if stated else freqs[:3]
    if rest:
        top = ", ".join(f"k = {f['k']} (period {f['period']:.1f} tokens, {_pct(f['share'])} of the power)"
                        for f in rest)
        lines.append(f"{'Next strongest' if stated else 'Strongest'} neuron-input frequencies: {top}.")
    if entry.task == "fib" and result.frequency_overlap is not None:
        shared = ", ".join(str(k) for k in result.shared_frequencies) or "none of the top five"
        lines.append(
            f"Its neuron-input spectrum overlaps the addition model's by {_pct(result.frequency_overlap)} "
            f"(1 = the same distribution of power over frequencies); shared dominant frequencies: {shared}."
        )
    return lines


THUMB_CSS = """
img.thumb { float: right; width: 192px; margin: 0 0 1em 1.5em; border: 1px solid #ddd; background: #fff;
            image-rendering: pixelated; }
section { overflow: auto; }
"""


def index_html(result: TourResult) -> str:
    """The tour's index page: the story per model with its numbers, and links to the reports."""
    from . import __version__

    blocks = []
    for x in result.entries:
        title, intro = INTRO[x.task]
        link = x.report.relative_to(result.out).as_posix()
        acc = finding(x.summary, "accuracy")
        how = "reused" if x.reused else f"trained in {x.train_s:.0f} s"
        items = "".join(f"<li>{e(t)}</li>" for t in _story(x, result))
        thumb = (x.path / "thumbnail.png").relative_to(result.out).as_posix()   # written with the report
        img = (f'<a href="{e(link)}"><img class="thumb" src="{e(thumb)}" '
               f'alt="the {e(x.task)} model\'s key figure"></a>')
        blocks.append(
            f'<section id="{e(x.task)}"><h2>{e(title)} (<code>{e(x.task)}</code>)</h2>{img}'
            f'<p class="explain">{e(intro)}</p><ul class="story">{items}</ul>'
            f'<p><a href="{e(link)}">Open the {e(x.task)} report</a> &middot; model {how}'
            + (f", accuracy {_pct(acc['value'])}" if acc else "") + "</p></section>"
        )
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>qkov tour</title><style>{CSS}{THUMB_CSS}</style></head>
<body><main>
<h1>qkov tour: circuits by example</h1>
<p class="sub">Three small transformers trained with the reference settings, their circuits read the way the
<i>Mathematical Framework for Transformer Circuits</i> reads them. Every number below was measured on these models;
each report shows the figures behind it.</p>
{"".join(blocks)}
<footer>Written by qkov {e(__version__)} in {result.elapsed_s:.0f} s.
Rerun with <code>qkov tour -o {e(result.out)}</code>; trained models are reused.</footer>
</main></body></html>
"""
