"""What a report shows, in which order, and what each figure means: sections of figures.

:func:`sections` reads a :class:`~qkov.report.data.ReportData` and lists the page's sections,
each with a short explanation of what to look for and its named figures. A section appears only
when its analysis exists for the model (composition for 2+ layers, neuron maps for MLP models,
Fourier spectra and progress measures when the Summary holds them), never as a placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from . import explain
from . import figures as F
from .data import ReportData, spectrum_rows


@dataclass
class Section:
    id: str
    title: str
    explain: str
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)   # (name, figure)
    tables: list[tuple[str, list[tuple[str, Any]]]] = field(default_factory=list)  # (caption, rows)


def _model_card(d: ReportData) -> Section:
    s = Section(
        "model-card", "Model card",
        f"This model: {explain.model_shape(d)}. "
        "The task, the model's shape and how it was trained, with its accuracy and loss on the task's fixed "
        "evaluation set. Check that accuracy is uniform across lengths or positions before reading circuits: a "
        "circuit explains what a model does, not what it was meant to do.",
    )
    s.tables.append(("task", list(d.task.items())))
    s.tables.append(("model", list(d.config["model"].items())))
    s.tables.append(("training", list(d.config["train"].items()) + [("seed", d.config["seed"])]))
    ev = [(k, v) for k, v in d.eval.items() if not isinstance(v, dict)]
    s.tables.append(("evaluation", ev))
    if d.metrics:
        s.figures.append(("training-curves", F.training_curves(d.metrics)))
    kind, groups = d.eval_groups
    if groups:
        s.figures.append((f"eval-by-{kind}", F.eval_by_group(kind, groups)))
    return s


def _attention(d: ReportData) -> Section:
    s = Section(
        "attention", "Attention patterns", explain.attention(d),
    )
    for h in d.heads:
        s.figures.append((f"attention-{h.name}", F.attention_patterns(d.examples, h.layer, h.head)))
    return s


def _qk(d: ReportData) -> Section:
    s = Section(
        "qk", "QK circuits: where heads attend", explain.qk(d),
    )
    for h in d.heads:
        s.figures.append((f"qk-{h.name}", F.full_qk(h, d.token_labels)))
        if h.qk_pairs:
            s.figures.append((f"qk-positions-{h.name}", F.full_qk_positions(h, d.token_labels)))
        if h.positional_qk is not None:
            s.figures.append((f"positional-qk-{h.name}", F.positional_qk(h)))
    return s


def _ov(d: ReportData) -> Section:
    s = Section(
        "ov", "OV circuits: what heads write", explain.ov(d),
    )
    for h in d.heads:
        s.figures.append((f"ov-{h.name}", F.full_ov(h, d.token_labels, d.out_labels)))
        s.figures.append((f"eigenvalues-{h.name}", F.eigenvalues(h)))
    return s


def _direct(d: ReportData) -> Section:
    return Section(
        "direct-path", "Direct path",
        "W_E W_U: the logits each token writes at its own position without passing through any layer (the "
        "zero-layer term of the path expansion, close to bigram statistics). For tasks whose answer is not the "
        "current token it is usually weak or a bias towards common answers.",
        [("direct-path", F.direct_path(d.direct_path, d.token_labels, d.out_labels))],
    )


def _composition(d: ReportData) -> Section | None:
    if not d.composition:
        return None
    cfg = d.model_cfg
    return Section(
        "composition", "Composition between layers",
        "How strongly a later head's query (Q), key (K) or value (V) reads what an earlier head wrote: "
        "‖W_A W_B‖_F / (‖W_A‖_F ‖W_B‖_F). An induction circuit shows as K-composition from a previous-token head "
        "in layer 0 into an induction head in layer 1; random matrices of these shapes score well above 0, so compare "
        "entries with each other.",
        [("composition", F.composition(d.composition, cfg["n_layers"], cfg["n_heads"]))],
    )


def _detectors(d: ReportData) -> Section | None:
    names = d.detector_names
    if not names:
        return None
    return Section(
        "detectors", "Head detectors",
        "The average attention each head pays to the position a detector expects, on random repeated "
        "sequences [x, x]: the previous token, an earlier copy of the current token (duplicate token), or the "
        "token after an earlier copy (induction). Scores near 1 name a head's job.",
        [("detectors", F.head_detectors(d.summary["heads"], names))],
    )


def _mlp(d: ReportData) -> Section | None:
    if d.mlp is None:
        return None
    return Section(
        "mlp", "MLP neurons", explain.mlp(d),
        [("neuron-inputs", F.neuron_inputs(d.mlp, d.token_labels)),
         ("neuron-picker", F.neuron_picker(d.mlp, d.token_labels)),
         ("neuron-logits", F.neuron_logits(d.mlp, d.out_labels))],
    )


def _fourier(d: ReportData) -> Section | None:
    a = d.mlp.analysis if d.mlp is not None else None
    if not a:
        return None
    s = Section("fourier", "Fourier picture", "")
    if a.get("kind") == "token_spectrum" and a.get("spectrum"):
        dominant = [f["k"] for f in a.get("dominant_frequencies", [])]
        s.explain = (
            "The Fourier power of the neuron inputs as a function of the attended token's value, summed over "
            "neurons. A few tall bars mean neurons are periodic in the token with those frequencies (period = "
            "token range / k); the dominant ones are red."
        )
        s.figures.append(("spectrum", F.token_spectrum(spectrum_rows(a), dominant)))
    elif a.get("kind") == "fourier_zp":
        s.explain = (
            "Each neuron's activation over all (a, b) inputs, in the Fourier basis of Z_p: neurons cluster on a few "
            "key frequencies, and the logits are close to a sum of cos(w_k(a + b − c)) over them. Progress measures "
            "over checkpoints show memorisation, circuit formation (excluded loss rises) and clean-up (weights "
            "shrink, test loss falls)."
        )
        if a.get("clusters"):
            s.figures.append(("key-frequencies", F.key_frequency_clusters(a["clusters"])))
    if a.get("progress"):
        s.figures.append(("progress", F.progress_measures(a["progress"])))
    return s if s.figures else None


# The figure that shows a model's mechanism at a glance (the tour's index draws it small): a
# periodic neuron for MLP models, head detectors for deeper ones, else the first head's QK circuit
# with positions, else its OV circuit.
KEY_FIGURES = ("neuron-picker", "detectors", "qk-positions-0.0", "ov-0.0")


def key_figure(secs: list[Section]) -> tuple[str, go.Figure] | None:
    """``(name, figure)`` of the first of :data:`KEY_FIGURES` that ``secs`` draw, or None."""
    figs = dict(f for s in secs for f in s.figures)
    return next(((n, figs[n]) for n in KEY_FIGURES if n in figs), None)


def _certified(d: ReportData) -> Section | None:
    c = d.certified
    if c is None:
        return None
    s = Section(
        "certified", "Certified accuracy",
        "Lower bounds on the model's accuracy over every possible input of each length, proved from its circuits "
        "alone (qkov certify): the cubic proof splits the inputs by max token, query token, largest other token "
        "and copies of the max, and bounds attention and logits for each case pessimistically; the subcubic proof "
        "reads the QK circuit as a rank-one 'size direction' plus a bounded remainder and gives up more. Beside "
        "them, the exact accuracy over all inputs by brute force (where that is feasible). The heatmap shows where "
        "the cubic proof loses: the share of inputs with each (max, query) token it cannot certify, either because "
        "the model's margin is thin there or because the proof's pessimism is.",
        [("certified-bounds", F.certified_bounds(c)), ("proof-losses", F.proof_losses(c, d.token_labels))],
    )
    for i, n in enumerate(c.lengths):
        row = [("exact (brute force)", "not computed" if c.exact[i] is None else f"{c.exact[i]:.4%}")]
        row += [(f"{name} proof: at least", f"{b[i]:.4%}") for name, b in c.bounds.items()]
        s.tables.append((f"length {n}", row))
    return s


def _checks(d: ReportData) -> Section | None:
    if not d.checks:
        return None
    s = Section(
        "checks", "Does the story hold?",
        "A circuit read off the weights is a claim about what the model computes; each line below tests one by an "
        "intervention on the model (an ablation, an attention pattern put in place of the model's, a path cut) and "
        "gives the task's metric before and after it, with the rule the story has to meet.",
    )
    for c in d.checks:
        s.tables.append((f"{c['id']}: {'holds' if c['holds'] else 'does not hold'}",
                         [("what was done", c["intervention"]), (f"{c['metric']} before", c["before"]),
                          (f"{c['metric']} after", c["after"]), ("so", c["text"])]))
    return s


def sections(d: ReportData) -> list[Section]:
    """The report's sections for ``d``, in page order, skipping analyses the model has not got."""
    out = [_model_card(d), _checks(d), _attention(d), _qk(d), _ov(d), _direct(d), _certified(d),
           _composition(d), _detectors(d), _mlp(d), _fourier(d)]
    return [s for s in out if s is not None]
