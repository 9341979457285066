"""Gather what a report draws: one call per analysis, through qkov's public API only.

:func:`gather` turns a run (a directory, a :class:`qkov.Run` or a loaded run) into a
:class:`ReportData`: the analysis ``Summary`` as a dict (the numbers in the findings box), the
configs and eval history, and the arrays the figures draw (attention patterns of example inputs,
full QK/OV circuits, eigenvalues, the direct path, MLP neuron maps). Arrays are numpy, rounded to
``digits`` significant digits, and capped at ``max_tokens`` rows and columns, so a page stays
small. This is the one module that knows the Summary's keys; figures and pages read ReportData.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import circuits
from ..analyze import analyze
from ..certify import certify
from ..errors import QkovError
from ..show import show
from ..store import Run, load_run
from ..tasks import breakdowns

N_EXAMPLES = 4          # example inputs whose attention patterns are drawn, per head
MAX_TOKENS = 256        # circuits over larger vocabularies show their first MAX_TOKENS ids
# Numbers in all vocabulary-sized heatmaps of a page together (at 3 significant digits, ~6 bytes
# each: ~4 MB beside plotly.js's 4.8 MB, so every page stays under 10 MB). The circuits every
# head has come first; position pairs for the QK dropdown fill what is left; a model whose
# circuits alone would not fit shows fewer token ids (induction, 4 heads x 256 tokens: 128).
PAGE_NUMBERS = 650_000
# At most this many (query, key) position pairs in a head's QK dropdown: beyond it the menu
# is unusable, and plotly spends seconds laying out its buttons (a bidirectional n_ctx=42 model
# fits all 1,764 pairs in the budget: 9 MB and ~10 s of layout, for a menu no one scrolls).
MAX_QK_PAIRS = 128


def round_sig(x, digits: int = 4) -> np.ndarray:
    """``x`` rounded to ``digits`` significant digits, as float64 whose repr is short.

    >>> round_sig([123456.7, 0.012345, -3.14159, 0.0]).tolist()
    [123500.0, 0.01234, -3.142, 0.0]
    """
    a = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(a)
    ok = np.isfinite(a) & (a != 0)
    exp = np.zeros_like(a)
    exp[ok] = np.floor(np.log10(np.abs(a[ok])))
    shift = (digits - 1 - exp).astype(np.int64)   # decimals to keep
    # Divide by an exact power of ten (never multiply by an inexact 0.1...) so reprs stay short.
    pos, neg = ok & (shift >= 0), ok & (shift < 0)
    p = 10.0 ** shift[pos]
    out[pos] = np.round(a[pos] * p) / p
    q = 10.0 ** (-shift[neg])
    out[neg] = np.round(a[neg] / q) * q
    out[~np.isfinite(a)] = a[~np.isfinite(a)]
    return out


def round_rel(x, digits: int = 4) -> np.ndarray:
    """``x`` rounded to ``digits`` significant digits of its largest magnitude (one absolute step
    for the whole array, as a heatmap's colour scale sees it), with short reprs.

    >>> round_rel([123.456, 0.0123456, -7.891]).tolist()
    [123.5, 0.0, -7.9]
    """
    a = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(a)
    top = float(np.abs(a[finite]).max()) if finite.any() else 0.0
    if top == 0:
        return a.copy()
    return round_sig(a, digits) if a.ndim == 0 else _round_decimals(a, digits - 1 - int(math.floor(math.log10(top))))


def _round_decimals(a: np.ndarray, decimals: int) -> np.ndarray:
    if decimals >= 0:
        p = 10.0 ** decimals
        return np.round(a * p) / p
    q = 10.0 ** (-decimals)
    return np.round(a / q) * q


def _np(t, digits: int) -> np.ndarray:
    """A tensor (or factored matrix) as a float64 numpy array, rounded with :func:`round_rel`."""
    if isinstance(t, circuits.FactoredMatrix):
        t = t.AB
    if isinstance(t, torch.Tensor):
        t = t.detach().double().cpu().numpy()
    return round_rel(t, digits)


@dataclass
class Example:
    """One example input, every head's attention pattern on it and the model's answer."""

    tokens: list[int]
    labels: list[str]                       # "(position) token" per position
    patterns: np.ndarray                    # [n_layers, n_heads, q_pos, k_pos]
    text: str = ""                          # the input as the task writes it
    output: str = ""                        # the model's answer, as the task writes it
    expected: str | None = None             # the right answer, where the task computes it
    correct: bool | None = None


@dataclass
class HeadData:
    """The circuits of one attention head, as arrays (rows/columns capped at MAX_TOKENS)."""

    layer: int
    head: int
    scores: dict[str, Any]                  # this head's row of the Summary's ``heads``
    qk: np.ndarray                          # [query token, key token], no positions
    qk_pairs: dict[tuple[int, int], np.ndarray]   # (q_pos, k_pos) -> [query token, key token]
    qk_default: tuple[int, int] | None      # the pair the page shows first
    positional_qk: np.ndarray | None        # [query pos, key pos], NaN where key > query in a causal model
    ov: np.ndarray                          # [source token, output logit]
    eigenvalues: np.ndarray                 # [d_head] complex, of the full OV circuit

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.head}"


@dataclass
class MlpData:
    """Layer 0's neuron maps and the MLP analysis (Fourier) when the Summary has one."""

    neuron_inputs: np.ndarray               # [pos, token, neuron]: the head attends to the token at pos
    token_inputs: np.ndarray                # [token, neuron]: the same without W_pos (a shift per pos)
    neuron_logits: np.ndarray               # [neuron, output logit]
    analysis: dict[str, Any] | None         # Summary["mlp"]: spectrum / key frequencies / progress
    first_neuron: int = 0                   # the neuron the picker starts on (the cleanest wave)


@dataclass
class CertifiedData:
    """``qkov.certify`` of the model: per length the exact accuracy and each proof's bound, and
    where the cubic proof loses inputs."""

    lengths: list[int]
    exact: list[float | None]               # per length; None where brute force was skipped
    bounds: dict[str, list[float]]          # proof -> per length
    lost: list[np.ndarray]                  # per length: [max, query] share of inputs left uncertified (NaN: none)


@dataclass
class ReportData:
    title: str
    run_dir: str | None
    task: dict[str, Any]
    config: dict[str, Any]                  # {"model": ..., "train": ..., "seed": ...}
    metrics: list[dict[str, Any]]           # metrics.jsonl rows
    summary: dict[str, Any]                 # qkov.analyze(...).to_dict()
    token_labels: list[str]                 # per input token id (capped)
    out_labels: list[str]                   # per output logit id (capped)
    n_ctx: int
    examples: list[Example]
    heads: list[HeadData]
    direct_path: np.ndarray                 # [token, output logit]
    mlp: MlpData | None = None
    notes: list[str] = field(default_factory=list)
    inputs_given: bool = False              # examples are the caller's inputs, not the task's own
    certified: CertifiedData | None = None  # for tasks with an answer rule (max) and models the proofs fit

    # -- the Summary's keys, read in one place ------------------------------------------
    @property
    def findings(self) -> list[dict[str, Any]]:
        """``[{id, text, value}]``: the headline sentences and the numbers they state."""
        return list(self.summary.get("findings", []))

    @property
    def checks(self) -> list[dict[str, Any]]:
        """``[{id, text, intervention, metric, before, after, holds}]``: interventions that test the findings."""
        return list(self.summary.get("checks", []))

    @property
    def eval(self) -> dict[str, Any]:
        return self.summary.get("eval", {})

    @property
    def eval_groups(self) -> tuple[str | None, dict[str, dict[str, float]]]:
        """``("length" | "position" | ... | None, {group: {accuracy, loss, n}})``: the first
        ``by_<group>`` breakdown the task's evaluation gives (length and position first)."""
        found = breakdowns(self.eval)
        return found[0] if found else (None, {})

    @property
    def composition(self) -> dict[str, Any] | None:
        return self.summary.get("composition")

    @property
    def detector_names(self) -> list[str]:
        """Head-detector score keys present in the Summary's ``heads`` (multi-layer models)."""
        heads = self.summary.get("heads") or [{}]
        return [k for k in heads[0] if k.endswith("_score") and k != "copying_score"]

    @property
    def model_cfg(self) -> dict[str, Any]:
        return self.config["model"]

    @property
    def n_heads_total(self) -> int:
        return self.model_cfg["n_layers"] * self.model_cfg["n_heads"]

    @property
    def causal(self) -> bool:
        """True unless the model's attention is bidirectional."""
        return self.model_cfg.get("attention_dir", "causal") == "causal"

    @property
    def has_mlp(self) -> bool:
        return self.model_cfg.get("d_mlp") is not None


# ------------------------------------------------------------------------- helpers
def _labels(task, n: int, given: Sequence[str] | None, output: bool = False) -> list[str]:
    """``n`` labels: the ``given`` ones, else the task's token (or, ``output``, logit) labels,
    then the id for any beyond them."""
    labels = list(given) if given is not None else list(task.output_labels() if output else task.token_labels())
    return [str(labels[i]) if i < len(labels) else str(i) for i in range(n)]


def _page_sizes(cfg, w, max_tokens: int, budget: int = PAGE_NUMBERS) -> tuple[int, int, int]:
    """(token ids shown, output ids shown, QK position pairs per head) that fit ``budget`` numbers.

    Every head's full QK and OV circuits, its default position pair (drawn, and again in its
    dropdown button), the direct path and the MLP maps come first; a model whose circuits alone
    exceed the budget shows half as many token ids, until they fit (or 32 are left).
    """
    heads = cfg.n_layers * cfg.n_heads
    n_pos = cfg.n_ctx if w.W_pos is not None else 1
    cap = max_tokens
    while True:
        nv, nout = min(w.d_vocab, cap), min(w.d_vocab_out, cap)
        pair = nv * nv if w.W_pos is not None else 0
        fixed = heads * (nv * nv + nv * nout + 2 * pair) + nv * nout
        if cfg.d_mlp is not None:                 # neuron inputs (+ the one drawn), picker, logits
            fixed += cfg.d_mlp * (nv * (n_pos + 1 + (n_pos > 1)) + nout)
        if fixed <= budget or cap <= 32:
            break
        cap //= 2
    extra = (budget - fixed) // (heads * pair) if pair and budget > fixed else 0
    return nv, nout, 1 + extra


def _qk_pairs(n_ctx: int, limit: int, causal: bool = True, first: int | None = None) -> list[tuple[int, int]]:
    """(query pos, key pos) pairs a head can read (key <= query when ``causal``); all of them
    when they fit in ``limit``, else the query ``first`` (default: the last position) against
    every key, then each position against itself and its predecessor (the pairs that max, add
    and induction circuits use)."""
    every = [(q, k) for q in range(n_ctx) for k in range(q + 1 if causal else n_ctx)]
    if len(every) <= limit:
        return every
    last = n_ctx - 1
    picked = [(last if first is None else first, k) for k in range(n_ctx)]
    for q in range(last - 1, -1, -1):
        picked += [(q, q)] + ([(q, q - 1)] if q else [])
    return sorted(dict.fromkeys(picked[: max(1, limit)]))


def _resolve(run) -> tuple[Any, Any, Any, list[dict[str, Any]], Path | None]:
    """(model, task, RunConfig, metrics, path) of a run directory or Run."""
    if isinstance(run, (str, Path)):
        run = load_run(run)
    for attr in ("model", "config", "metrics"):
        if not hasattr(run, attr):
            raise QkovError(f"cannot report on {type(run).__name__}: expected a run directory, qkov.Run or loaded run")
    path = Path(run.path) if getattr(run, "path", None) is not None else None
    return run.model, run.config.task, run.config, list(run.metrics), path


# ------------------------------------------------------------------------- gather
@torch.no_grad()
def gather(
    run,
    summary: dict[str, Any] | None = None,
    token_labels: Sequence[str] | None = None,
    title: str | None = None,
    digits: int = 3,
    max_tokens: int = MAX_TOKENS,
    n_examples: int = N_EXAMPLES,
    inputs: Sequence[str] | None = None,
) -> ReportData:
    """Everything a report draws for ``run`` (a run directory, ``qkov.Run`` or ``load_run`` result).

    ``summary``: a precomputed ``qkov.analyze(...).to_dict()`` (else it is computed here, with
    the run's checkpoints for progress measures). ``token_labels`` overrides the task's labels.
    ``inputs``: the examples whose attention is drawn, written as the task writes them
    (``["52 59", "35 14 47 61 38 54"]``; read before any analysis, so a bad one fails first);
    by default ``n_examples`` of the task's own (``task.example_tokens``).
    """
    model, task, rc, metrics, path = _resolve(run)
    w = circuits.weights(model)
    cfg = model.cfg
    labels = _labels(task, w.d_vocab, token_labels)
    examples = _examples(model, task, labels, inputs if inputs else task.example_tokens(n_examples))
    if summary is None:
        summary = analyze(model, task, checkpoints=Run(model, rc, metrics, path).checkpoints()).to_dict()
    nv, nout, n_pairs = _page_sizes(cfg, w, max_tokens)
    notes = []
    if w.d_vocab > nv or w.d_vocab_out > nout:
        notes.append(f"Circuits over the vocabulary show its first {nv} token ids (a page stays under 10 MB).")

    heads = _heads(model, task, summary, nv, nout, digits, n_pairs)
    mlp = _mlp(model, task, summary, nv, nout, digits) if cfg.d_mlp is not None else None

    return ReportData(
        title=title or f"qkov report: {task.name}" + (f" ({path})" if path else ""),
        run_dir=str(path) if path else None,
        task=task.to_dict(),
        config={"model": rc.model.to_dict(), "train": rc.train.to_dict(), "seed": rc.seed},
        metrics=metrics,
        summary=summary,
        token_labels=labels[:nv],
        out_labels=_labels(task, w.d_vocab_out, token_labels, output=True)[:nout],
        n_ctx=cfg.n_ctx,
        examples=examples,
        heads=heads,
        direct_path=_np(circuits.direct_path(model).AB[:nv, :nout], digits),
        mlp=mlp,
        notes=notes,
        inputs_given=bool(inputs),
        certified=_certified(model, task, notes),
    )


def _certified(model, task, notes: list[str]) -> CertifiedData | None:
    """The certificate of a model whose task states an answer rule, or None (with a note when
    the proofs do not fit the model, e.g. a max model with two layers)."""
    if task.answer_rule() is None:
        return None
    try:
        cert = certify(model, task)
    except QkovError as e:
        notes.append(f"No certified accuracy: {e}.")
        return None
    lengths = sorted(cert.lengths)
    lost = []
    for n in lengths:
        inputs = cert[n].inputs_by_case.double().numpy()
        share = np.where(inputs > 0, cert[n].uncertified.double().numpy() / np.maximum(inputs, 1), np.nan)
        lost.append(np.round(share, 4))
    return CertifiedData(lengths, [cert[n].exact for n in lengths],
                         {p: [cert[n].bounds[p] for n in lengths] for p in cert[lengths[0]].bounds}, lost)


def _examples(model, task, labels: list[str], inputs: Sequence[str | Sequence[int]]) -> list[Example]:
    """Each input (text or token ids) with every head's pattern on it and the model's answer."""
    return examples_from_shown(show(model, task, *inputs), labels)


def examples_from_shown(shown: Sequence[Any], labels: Sequence[str] | None = None) -> list[Example]:
    """Report examples from :func:`qkov.show` results; ``labels`` (per token id) replace the
    task's in the ``(position) token`` axis labels."""
    out = []
    for s in shown:
        heads = sorted(tuple(map(int, k.split("."))) for k in s.patterns)
        n_layers, n_heads = heads[-1][0] + 1, heads[-1][1] + 1
        pats = [[s.patterns[f"{l}.{h}"] for h in range(n_heads)] for l in range(n_layers)]   # [L, H, q, k]
        axis = s.labels if labels is None else [f"({i}) {labels[x]}" for i, x in enumerate(s.tokens)]
        out.append(Example(s.tokens, list(axis), _np(np.asarray(pats), 3), s.input, s.output, s.expected,
                           s.correct))
    return out


def _positional(a: np.ndarray, causal: bool) -> np.ndarray:
    """``a [query pos, key pos]``, with NaN where the key comes after the query when the model
    is causal (never attended); a bidirectional model's every cell is read, so all are kept."""
    a = np.array(a, dtype=np.float64)
    if causal:
        a[np.triu_indices(a.shape[0], 1, a.shape[1])] = np.nan
    return a


def _heads(model, task, summary: dict[str, Any], nv: int, nout: int, digits: int, n_pairs: int) -> list[HeadData]:
    """Each head's circuits: full QK (also at ``n_pairs`` (q, k) position pairs, the page's
    budget), positional QK (acausal cells masked), full OV and its eigenvalues."""
    w, cfg = circuits.weights(model), model.cfg                                 # read (and folded) once
    scored = getattr(task, "scored_positions", None)
    first = None if w.causal or not scored else int(scored[0])     # a bidirectional classifier's query
    limit = max(1, min(n_pairs, MAX_QK_PAIRS) - 1)
    pairs = _qk_pairs(cfg.n_ctx, limit, w.causal, first) if w.W_pos is not None else []
    default = _default_pair(task, cfg.n_ctx) if pairs else None
    if default is not None and default not in pairs:
        pairs = sorted(set(pairs) | {default})
    n_sq = min(w.d_vocab, w.d_vocab_out)
    rows = {(r["layer"], r["head"]): r for r in summary.get("heads", [])}
    heads = []
    for l in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            fov = circuits.full_ov(w, l, h)
            eig = circuits.FactoredMatrix(fov.A[:n_sq], fov.B[:, :n_sq]).eigenvalues
            heads.append(HeadData(
                layer=l, head=h, scores=rows.get((l, h), {}),
                qk=_np(circuits.full_qk(w, l, h).AB[:nv, :nv], digits),
                qk_pairs={(q, k): _np(circuits.full_qk(w, l, h, q, k).AB[:nv, :nv], digits) for q, k in pairs},
                qk_default=default,
                positional_qk=(_positional(_np(circuits.positional_qk(w, l, h), digits), w.causal)
                               if w.W_pos is not None else None),
                ov=_np(fov.AB[:nv, :nout], digits),
                eigenvalues=np.asarray(eig.detach().cpu().numpy(), dtype=np.complex128),
            ))
    return heads


def _mlp(model, task, summary: dict[str, Any], nv: int, nout: int, digits: int) -> MlpData:
    """Neuron inputs at each position and without positions, neuron logits, the MLP analysis."""
    has_pos = circuits.weights(model).W_pos is not None
    ni = torch.stack([circuits.neuron_inputs(model, 0, pos=p if has_pos else None)
                      for p in range(model.cfg.n_ctx if has_pos else 1)])       # [pos, v, m]
    analysis = summary.get("mlp")
    return MlpData(_np(ni[:, :nv], digits), _np(circuits.neuron_inputs(model, 0)[:nv], digits),
                   _np(circuits.neuron_logits(model, 0)[:, :nout], digits), analysis,
                   _cleanest_neuron(model, task, analysis))


def _cleanest_neuron(model, task, analysis: dict[str, Any] | None) -> int:
    """The neuron whose input is most nearly one wave, by the MLP analysis's own measure: for a
    token spectrum (add, fib) the largest share of the input's variance at its dominant
    frequency, for Z_p (modadd) the highest FVE of its frequency; neuron 0 without an analysis."""
    from .. import fourier

    kind = (analysis or {}).get("kind")
    if kind == "token_spectrum":
        s = fourier.neuron_input_spectrum(model, n_tokens=analysis["n_tokens"])
        return int((s.dominant_share * (1 - s.linear_share)).argmax())
    if kind == "fourier_zp":
        nf = fourier.neuron_frequencies(fourier.neuron_grid(model, task))
        return int(torch.where(nf.dead, torch.zeros_like(nf.fve) - 1, nf.fve).argmax())
    return 0


def _default_pair(task, n_ctx: int) -> tuple[int, int]:
    """The (query, key) pair shown first: the last scored query position, attending to itself."""
    scored = getattr(task, "scored_positions", None) or [n_ctx - 1]
    q = min(int(scored[-1]), n_ctx - 1)
    return (q, q)


# ------------------------------------------------------------------ Summary readers
def finding(summary: dict[str, Any], id: str) -> dict[str, Any] | None:
    """The finding ``{id, text, value}`` with this id, or None."""
    return next((f for f in summary.get("findings", []) if f.get("id") == id), None)


def dominant_frequencies(summary: dict[str, Any]) -> list[dict[str, float]]:
    """``[{k, period, share, neurons}]`` of a token-spectrum MLP analysis (add, fib), strongest first."""
    mlp = summary.get("mlp") or {}
    return list(mlp.get("dominant_frequencies", [])) if mlp.get("kind") == "token_spectrum" else []


def spectrum_rows(mlp: dict[str, Any]) -> list[dict[str, float]]:
    """``[{k, period, share}]`` of a token-spectrum MLP analysis, every frequency."""
    n = mlp["n_tokens"]
    return [{"k": i + 1, "period": n / (i + 1), "share": s} for i, s in enumerate(mlp["spectrum"])]
