"""Plotly figure builders: each draws arrays that :mod:`qkov.report.data` gathered; none computes.

Every builder returns a ``plotly.graph_objects.Figure``, so a notebook can show it::

    >>> import qkov
    >>> from qkov.report import gather, figures
    >>> data = gather("runs/max")                                        # doctest: +SKIP
    >>> figures.full_ov(data.heads[0], data.token_labels, data.out_labels).show()  # doctest: +SKIP

Heatmaps of matrices put row 0 at the top (as a matrix is written); token axes are categorical,
labelled by the task's token labels, HTML-escaped (plotly renders a subset of HTML in text).
Interactive figures carry their alternatives with them: the position-aware QK circuit has a
dropdown of (query position, key position) pairs whose buttons restyle the heatmap's ``z``, and
the neuron picker has a slider whose steps restyle the lines, so they work in a notebook too.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .data import CertifiedData, Example, HeadData, MlpData

DIVERGING = "RdBu"      # drawn reversed: negative blue, positive red, white at 0
TEMPLATE = "plotly_white"
HEIGHT = 460


def figure_dict(fig: go.Figure) -> dict[str, Any]:
    """``fig.to_plotly_json()`` with every array as plain (nested) lists of numbers.

    Plotly encodes numpy arrays as base64 ``{dtype, bdata, shape}``; the page stores the rounded
    numbers as text instead (shorter for 4-digit values, and readable).
    """
    def plain(x):
        if isinstance(x, dict):
            if "bdata" in x and "dtype" in x:
                a = np.frombuffer(base64.b64decode(x["bdata"]), dtype=np.dtype(x["dtype"]))
                shape = [int(n) for n in str(x.get("shape", a.size)).split(",")]
                return a.reshape(shape).tolist()
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, np.generic):
            return x.item()
        return x

    return plain(fig.to_plotly_json())


def esc(label: Any) -> str:
    """A label as plotly text: ``<``, ``>`` and ``&`` escaped, so ``<script>`` shows as text."""
    return html.escape(str(label), quote=False)


def _labels(labels: Sequence[Any]) -> list[str]:
    return [esc(x) for x in labels]


def _layout(fig: go.Figure, title: str, height: int = HEIGHT, **kw) -> go.Figure:
    fig.update_layout(title={"text": esc(title), "x": 0.02}, template=TEMPLATE, height=height,
                      margin={"l": 70, "r": 30, "t": 70, "b": 60}, **kw)
    return fig


def _matrix_heatmap(z: np.ndarray, x: Sequence[str], y: Sequence[str], *, signed: bool = True,
                    zmin: float | None = None, zmax: float | None = None, name: str = "",
                    hover: str = "row %{y}<br>column %{x}<br>%{z}") -> go.Heatmap:
    kw: dict[str, Any] = {"colorscale": DIVERGING, "reversescale": True, "zmid": 0} if signed else {
        "colorscale": "Blues", "zmin": zmin, "zmax": zmax}
    return go.Heatmap(z=np.asarray(z), x=list(x), y=list(y), name=name,
                      hovertemplate=hover + "<extra></extra>", **kw)


def _matrix_axes(fig: go.Figure, x_title: str, y_title: str, row: int | None = None, col: int | None = None) -> None:
    where = {} if row is None else {"row": row, "col": col}
    fig.update_xaxes(title_text=esc(x_title), type="category", **where)
    fig.update_yaxes(title_text=esc(y_title), type="category", autorange="reversed", **where)


def heatmap(z: np.ndarray, x: Sequence[Any], y: Sequence[Any], title: str, x_title: str, y_title: str,
            signed: bool = True, hover: str | None = None) -> go.Figure:
    """One labelled matrix heatmap, row 0 at the top."""
    fig = go.Figure(_matrix_heatmap(z, _labels(x), _labels(y), signed=signed,
                                    hover=hover or f"{esc(y_title)} %{{y}}<br>{esc(x_title)} %{{x}}<br>%{{z}}"))
    _matrix_axes(fig, x_title, y_title)
    return _layout(fig, title)


# --------------------------------------------------------------------- model card
def training_curves(metrics: list[dict[str, Any]]) -> go.Figure:
    """Train and eval loss (log scale) and eval accuracy against the optimizer step."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    steps = [r["step"] for r in metrics]
    for key, name, dash in (("train_loss", "train loss", "dot"), ("loss", "eval loss", "solid")):
        ys = [r.get(key) for r in metrics]
        if any(v is not None for v in ys):
            fig.add_trace(go.Scatter(x=steps, y=ys, name=name, mode="lines", line={"dash": dash}), secondary_y=False)
    for key, name in (("accuracy", "eval accuracy"), ("train_accuracy", "train accuracy")):
        ys = [r.get(key) for r in metrics]
        if any(v is not None for v in ys):
            fig.add_trace(go.Scatter(x=steps, y=ys, name=name, mode="lines"), secondary_y=True)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="loss", type="log", exponentformat="power", secondary_y=False)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], tickmode="auto", showgrid=False, secondary_y=True)
    return _layout(fig, "Training curves", height=380)


def eval_by_group(kind: str, groups: dict[str, dict[str, float]]) -> go.Figure:
    """Accuracy (bars) and loss (markers, log scale) for each length or position."""
    keys = list(groups)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=[esc(k) for k in keys], y=[groups[k]["accuracy"] for k in keys], name="accuracy",
                         hovertemplate=f"{kind} %{{x}}: accuracy %{{y:.4%}}<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=[esc(k) for k in keys], y=[groups[k]["loss"] for k in keys], name="loss",
                             mode="markers+lines", hovertemplate=f"{kind} %{{x}}: loss %{{y:.4g}}<extra></extra>"),
                  secondary_y=True)
    fig.update_xaxes(title_text=kind, type="category")
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], secondary_y=False)
    fig.update_yaxes(title_text="loss", type="log", exponentformat="power", tickmode="auto", showgrid=False,
                     secondary_y=True)
    return _layout(fig, f"Accuracy and loss by {kind}", height=340)


# --------------------------------------------------------------------- attention
def _clip(text: str, n: int = 26) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def example_caption(ex: Example, i: int, width: int = 32) -> str:
    """``'52 59 → 59'``: the input and the model's answer (with the expected one when it differs),
    cut to about ``width`` characters."""
    if not ex.output:
        return f"example {i + 1}"
    out = _clip(ex.output, 10)
    miss = "" if ex.correct is not False or ex.expected is None else f" (not {_clip(ex.expected, 8)})"
    return esc(f"{_clip(ex.text, max(8, width - len(out) - len(miss) - 3))} → {out}{miss}")


def attention_patterns(examples: list[Example], layer: int, head: int, per_row: int = 4) -> go.Figure:
    """Head ``layer.head``'s attention pattern on each example input, axes ``(position) token``;
    each panel is titled with the input and the model's answer, ``per_row`` panels a row."""
    n = len(examples)
    cols, rows = min(n, per_row), -(-n // per_row)
    captions = [example_caption(ex, i, width=128 // cols) for i, ex in enumerate(examples)]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=captions,
                        horizontal_spacing=0.08, vertical_spacing=0.5 / rows if rows > 1 else 0.3)
    fig.update_annotations(font_size=13)
    for i, ex in enumerate(examples):
        labels = _labels(ex.labels)
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(_matrix_heatmap(ex.patterns[layer, head], labels, labels, signed=False, zmin=0, zmax=1,
                                      hover="query %{y}<br>key %{x}<br>attention %{z}"), row=r, col=c)
        _matrix_axes(fig, "key: (position) token", "query: (position) token" if c == 1 else "", row=r, col=c)
    fig.update_traces(showscale=False)
    fig.update_traces(showscale=True, selector=-1)
    return _layout(fig, f"Attention patterns of head {layer}.{head}", height=380 * rows)


# --------------------------------------------------------------------- QK circuits
def full_qk(head: HeadData, labels: Sequence[str]) -> go.Figure:
    """``W_E W_Q W_Kᵀ W_Eᵀ`` of one head: the score a query token gives a key token, no positions."""
    return heatmap(head.qk, labels, labels, f"Full QK circuit of head {head.name}, without positions",
                   "key token", "query token")


def _pair_title(head: HeadData, pair: tuple[int, int]) -> str:
    return f"Full QK circuit of head {head.name} with positions: query at position {pair[0]}, key at position {pair[1]}"


def full_qk_positions(head: HeadData, labels: Sequence[str]) -> go.Figure:
    """The position-aware full QK circuit, one (query pos, key pos) pair at a time from a dropdown."""
    pairs = list(head.qk_pairs)
    current = head.qk_default if head.qk_default in head.qk_pairs else pairs[0]
    fig = heatmap(head.qk_pairs[current], labels, labels, _pair_title(head, current), "key token", "query token")
    buttons = [
        {"label": f"query pos {q}, key pos {k}", "method": "update",
         "args": [{"z": [head.qk_pairs[(q, k)]]}, {"title.text": esc(_pair_title(head, (q, k)))}]}
        for q, k in pairs
    ]
    fig.update_layout(
        updatemenus=[{"type": "dropdown", "buttons": buttons, "active": pairs.index(current), "direction": "down",
                      "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "bottom", "showactive": True}],
        margin={"t": 110},
    )
    return fig


def positional_qk(head: HeadData) -> go.Figure:
    """``W_pos W_Q W_Kᵀ W_posᵀ``: how much a query position prefers each key position (cells the
    data marks NaN, a key after its query in a causal model, are left blank)."""
    pos = [str(i) for i in range(head.positional_qk.shape[0])]
    fig = heatmap(head.positional_qk, pos, pos, f"Positional QK circuit of head {head.name}",
                  "key position", "query position")
    fig.update_traces(hoverongaps=False)
    return fig


# --------------------------------------------------------------------- OV circuits
def full_ov(head: HeadData, labels: Sequence[str], out_labels: Sequence[str]) -> go.Figure:
    """``W_E W_V W_O W_U`` of one head: what attending to a token does to each output logit."""
    return heatmap(head.ov, out_labels, labels, f"Full OV circuit of head {head.name}",
                   "output logit", "attended (source) token")


def eigenvalues(head: HeadData) -> go.Figure:
    """The full OV circuit's non-zero eigenvalues in the complex plane, with the copying score."""
    lam = head.eigenvalues
    r = float(np.abs(lam).max()) * 1.1 if lam.size else 1.0
    fig = go.Figure([
        go.Scatter(x=[-r, r], y=[0, 0], mode="lines", line={"color": "#bbb", "width": 1}, hoverinfo="skip",
                   showlegend=False),
        go.Scatter(x=[0, 0], y=[-r, r], mode="lines", line={"color": "#bbb", "width": 1}, hoverinfo="skip",
                   showlegend=False),
        go.Scatter(x=np.round(lam.real, 4).tolist(), y=np.round(lam.imag, 4).tolist(), mode="markers",
                   marker={"size": 8}, name="eigenvalue", showlegend=False,
                   hovertemplate="Re %{x}<br>Im %{y}<extra></extra>"),
    ])
    score = head.scores.get("copying_score")
    title = f"Eigenvalues of head {head.name}'s full OV circuit"
    if score is not None:
        title += f": copying score {score:.3f}"
    # The full width like every other figure; equal scales keep the complex plane round, the
    # real axis widening to fill the space. The title sits below the mode bar's row.
    fig.update_xaxes(title_text="real part", range=[-r, r], zeroline=False)
    fig.update_yaxes(title_text="imaginary part", range=[-r, r], zeroline=False, scaleanchor="x", scaleratio=1)
    return _layout(fig, title, height=500)


def direct_path(z: np.ndarray, labels: Sequence[str], out_labels: Sequence[str]) -> go.Figure:
    """``W_E W_U``: the logits a token writes at its own position, skipping every layer."""
    return heatmap(z, out_labels, labels, "Direct path (W_E W_U)", "output logit", "token")


# --------------------------------------------------------------------- certified accuracy
def certified_bounds(c: CertifiedData) -> go.Figure:
    """The exact accuracy and each proof's certified lower bound, for every input length."""
    x = [str(n) for n in c.lengths]
    fig = go.Figure()
    rows = ([("exact (brute force)", c.exact)] if any(v is not None for v in c.exact) else []) + [
        (f"{name} proof (at least)", values) for name, values in c.bounds.items()]
    for name, values in rows:
        fig.add_trace(go.Bar(x=x, y=values, name=esc(name), hovertemplate=f"{esc(name)}, length %{{x}}: "
                                                                           "%{y:.4%}<extra></extra>"))
    low = min(v for _, values in rows for v in values if v is not None)
    fig.update_xaxes(title_text="input length", type="category")
    fig.update_yaxes(title_text="accuracy over every input", range=[max(0.0, low - 0.05), 1.0], tickformat=".1%")
    return _layout(fig, "Certified accuracy by input length", height=380, barmode="group")


def proof_losses(c: CertifiedData, labels: Sequence[str]) -> go.Figure:
    """Per (max token, query token), the share of inputs the cubic proof leaves uncertified; a
    dropdown picks the length."""
    title = lambda n: f"Where the cubic proof loses: inputs of length {n} it cannot certify"  # noqa: E731
    n_tok = c.lost[0].shape[0]
    fig = heatmap(c.lost[-1], labels[:n_tok], labels[:n_tok], title(c.lengths[-1]), "query token", "max token",
                  signed=False, hover="max token %{y}<br>query token %{x}<br>uncertified %{z:.2%}")
    if len(c.lengths) > 1:
        buttons = [{"label": f"length {n}", "method": "update", "args": [{"z": [z]}, {"title.text": esc(title(n))}]}
                   for n, z in zip(c.lengths, c.lost)]
        fig.update_layout(updatemenus=[{"type": "dropdown", "buttons": buttons, "active": len(buttons) - 1,
                                        "x": 1.0, "xanchor": "right", "y": 1.12, "yanchor": "bottom"}],
                          margin={"t": 110})
    return fig


# --------------------------------------------------------------------- multi-layer
def _head_names(n_layers: int, n_heads: int) -> list[str]:
    return [f"{l}.{h}" for l in range(n_layers) for h in range(n_heads)]


def composition(comp: dict[str, Any], n_layers: int, n_heads: int) -> go.Figure:
    """Q, K and V composition scores ``[earlier head, later head]``, side by side."""
    names = _head_names(n_layers, n_heads)
    n = n_layers * n_heads
    modes = [m for m in ("Q", "K", "V") if m in comp]
    fig = make_subplots(rows=1, cols=len(modes), subplot_titles=[f"{m}-composition" for m in modes],
                        horizontal_spacing=0.1)
    top = max(float(np.max(np.asarray(comp[m], dtype=float))) for m in modes) or 1.0
    for i, m in enumerate(modes):
        z = np.asarray(comp[m], dtype=float).reshape(n, n)
        fig.add_trace(_matrix_heatmap(z, names, names, signed=False, zmin=0, zmax=top,
                                      hover=f"{m}: head %{{y}} into head %{{x}}<br>score %{{z:.4f}}"),
                      row=1, col=i + 1)
        _matrix_axes(fig, "later head (reads)", "earlier head (writes)" if i == 0 else "", row=1, col=i + 1)
    fig.update_traces(showscale=False)
    fig.update_traces(showscale=True, selector=-1)
    return _layout(fig, "Composition scores between heads", height=400)


def head_detectors(heads: list[dict[str, Any]], names: list[str]) -> go.Figure:
    """Previous-token, duplicate-token and induction scores of every head (grouped bars)."""
    x = [f"{h['layer']}.{h['head']}" for h in heads]
    fig = go.Figure([
        go.Bar(x=x, y=[h[name] for h in heads], name=esc(name.removesuffix("_score").replace("_", " ")),
               hovertemplate="head %{x}: %{y:.4f}<extra></extra>")
        for name in names
    ])
    fig.update_xaxes(title_text="head (layer.head)", type="category")
    fig.update_yaxes(title_text="score", range=[0, 1])
    return _layout(fig, "Head detector scores", height=360, barmode="group")


# --------------------------------------------------------------------- MLP
def neuron_inputs(mlp: MlpData, labels: Sequence[str]) -> go.Figure:
    """What each layer-0 neuron receives when the head attends fully to a token at each position."""
    n_pos, _, n_neurons = mlp.neuron_inputs.shape
    neurons = [str(i) for i in range(n_neurons)]
    title = lambda p: f"Neuron inputs from a token attended at position {p}"  # noqa: E731
    fig = heatmap(mlp.neuron_inputs[0], neurons, labels, title(0), "neuron", "attended token")
    if n_pos > 1:
        buttons = [{"label": f"position {p}", "method": "update",
                    "args": [{"z": [mlp.neuron_inputs[p]]}, {"title.text": title(p)}]} for p in range(n_pos)]
        fig.update_layout(updatemenus=[{"type": "dropdown", "buttons": buttons, "active": 0, "x": 1.0,
                                        "xanchor": "right", "y": 1.12, "yanchor": "bottom"}], margin={"t": 110})
    return fig


def neuron_picker(mlp: MlpData, labels: Sequence[str]) -> go.Figure:
    """One neuron's input against the attended token's value; a slider picks the neuron.

    Drawn without the positional embedding: attending at another position shifts the whole curve
    by a constant, so its shape (periodic or not) is the same at every position.
    """
    n_tok, n_neurons = mlp.token_inputs.shape
    first = mlp.first_neuron if 0 <= mlp.first_neuron < n_neurons else 0
    title = lambda n: f"Input to neuron {n} against the attended token (no positional term)"  # noqa: E731
    fig = go.Figure(go.Scatter(x=_labels(labels), y=mlp.token_inputs[:, first], mode="lines+markers",
                               marker={"size": 3}, name="neuron input",
                               hovertemplate="token %{x}: %{y}<extra></extra>"))
    steps = [{"label": str(n), "method": "update",
              "args": [{"y": [np.ascontiguousarray(mlp.token_inputs[:, n])]}, {"title.text": title(n)}]}
             for n in range(n_neurons)]
    fig.update_layout(sliders=[{"active": first, "steps": steps, "ticklen": 0, "pad": {"t": 60},
                                "currentvalue": {"prefix": "neuron ", "font": {"size": 13, "color": "#333"}},
                                "font": {"size": 1, "color": "rgba(0,0,0,0)"}}])
    fig.update_xaxes(title_text="attended token", type="category")
    fig.update_yaxes(title_text="neuron input")
    return _layout(fig, title(first), height=500)


def neuron_logits(mlp: MlpData, out_labels: Sequence[str]) -> go.Figure:
    """``W_out W_U``: what each neuron's activation adds to each output logit."""
    neurons = [str(i) for i in range(mlp.neuron_logits.shape[0])]
    return heatmap(mlp.neuron_logits, out_labels, neurons, "Neuron → logit map (W_out W_U)", "output logit", "neuron")


def token_spectrum(rows: list[dict[str, float]], dominant: list[int]) -> go.Figure:
    """Share of the neuron inputs' Fourier power at each frequency over the token value."""
    ks = [r["k"] for r in rows]
    colors = ["#d62728" if k in dominant else "#1f77b4" for k in ks]
    fig = go.Figure(go.Bar(x=ks, y=[r["share"] for r in rows], marker={"color": colors},
                           customdata=[round(r["period"], 3) for r in rows],
                           hovertemplate="frequency %{x} (period %{customdata} tokens)<br>"
                                         "share %{y:.4f}<extra></extra>"))
    fig.update_xaxes(title_text="frequency k (cycles over the token range)")
    fig.update_yaxes(title_text="share of power")
    return _layout(fig, "Fourier spectrum of the neuron inputs (dominant frequencies in red)", height=360)


def key_frequency_clusters(clusters: dict[str, int]) -> go.Figure:
    """How many neurons read each key frequency."""
    ks = list(clusters)
    fig = go.Figure(go.Bar(x=[esc(k) for k in ks], y=[clusters[k] for k in ks],
                           hovertemplate="frequency %{x}: %{y} neurons<extra></extra>"))
    fig.update_xaxes(title_text="key frequency k", type="category")
    fig.update_yaxes(title_text="neurons")
    return _layout(fig, "Neurons per key frequency", height=340)


PROGRESS_LOSSES = ("train_loss", "test_loss", "restricted_loss", "excluded_loss")


def progress_measures(rows: list[dict[str, Any]]) -> go.Figure:
    """Progress measures over checkpoints: losses (log scale); the sum of squared weights and,
    on its own 0-1 axis, the Gini coefficient of the embedding's Fourier norms."""
    steps = [r["step"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["losses", "weights"], horizontal_spacing=0.14,
                        specs=[[{}, {"secondary_y": True}]])
    for key in PROGRESS_LOSSES:
        ys = [r.get(key) for r in rows]
        if any(v is not None for v in ys):
            fig.add_trace(go.Scatter(x=steps, y=ys, mode="lines", name=key.replace("_", " ")), row=1, col=1)
    for key, name, right in (("sum_sq_weights", "sum of squared weights", False),
                             ("gini_embed_fourier", "Gini of W_E's Fourier norms (right axis)", True)):
        ys = [r.get(key) for r in rows]
        if any(v is not None for v in ys):
            fig.add_trace(go.Scatter(x=steps, y=ys, mode="lines", name=name, line={"dash": "dot"} if right else {}),
                          row=1, col=2, secondary_y=right)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(type="log", exponentformat="power", row=1, col=1)
    fig.update_yaxes(title_text="sum of squared weights", row=1, col=2, secondary_y=False)
    # Its own axis from zero (a coefficient 0..1 next to weights in the thousands drew flat)
    fig.update_yaxes(title_text="Gini coefficient", rangemode="tozero", tickmode="auto", showgrid=False, row=1,
                     col=2, secondary_y=True)
    return _layout(fig, "Progress measures over checkpoints", height=400)
