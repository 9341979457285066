"""One model + its task -> a JSON-able Summary: the numbers that qkov reports about a model.

``analyze(model, task)`` gathers the eval, per-head scores (copying score, OV self top-1/top-5,
head detectors for multi-layer models), composition matrices (2+ layers), facts about the
task's attention (for ``max``: how often the last position attends to the maximum), the MLP
section (key frequencies, neuron FVE, progress measures) and ``findings``: the headline numbers
in words. Every number is computed from the model; the report and the CLI only print them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import circuits
from .circuits.heads import head_scores
from .devices import model_device
from .fourier import mlp_summary
from .interventions import Interventions
from .model import Transformer
from .tasks import Task, breakdowns


@dataclass
class Finding:
    """A headline sentence and the number it states (``value``, shown as ``text``)."""

    id: str
    text: str
    value: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "value": self.value}


@dataclass
class Summary:
    """Everything ``analyze`` measured about one model: plain dicts and lists, JSON-able.

    ``task`` and ``model`` are the configs, ``eval`` the task's metrics, ``heads`` one row of
    scores per head, ``composition`` (2+ layers), ``attention`` (task facts), ``mlp`` (MLP
    models), ``findings``, the headline numbers as sentences, and ``checks``, the interventions
    that test them (``{id, text, intervention, metric, before, after, holds}``, from the task).
    """

    task: dict[str, Any]
    model: dict[str, Any]
    eval: dict[str, Any]
    heads: list[dict[str, Any]]
    composition: dict[str, Any] | None = None
    attention: dict[str, Any] = field(default_factory=dict)
    mlp: dict[str, Any] | None = None
    findings: list[Finding] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The summary as one dict (what ``qkov analyze --json`` prints)."""
        d = {
            "task": self.task, "model": self.model, "eval": self.eval, "heads": self.heads,
            "attention": self.attention, "findings": [f.to_dict() for f in self.findings],
            "checks": list(self.checks),
        }
        if self.composition is not None:
            d["composition"] = self.composition
        if self.mlp is not None:
            d["mlp"] = self.mlp
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)


def _r(x: float, digits: int = 6) -> float:
    return round(float(x), digits)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


# ------------------------------------------------------------------------- heads
def head_table(model, multi_layer: bool) -> list[dict[str, Any]]:
    """Per-head scores: copying score and OV self top-1/top-5 (+ detectors with 2+ layers)."""
    w = circuits.weights(model)
    copy = circuits.copying_scores(model)
    self_stats = circuits.ov_self_stats(model)
    detectors = head_scores(model, seed=0, n=256) if multi_layer else {}
    rows = []
    for l in range(w.n_layers):
        for h in range(w.n_heads):
            row = {
                "layer": l, "head": h,
                "copying_score": _r(copy[l, h]),
                "ov_self_top1": _r(self_stats["top1"][l, h]),
                "ov_self_top5": _r(self_stats["top5"][l, h]),
            }
            for kind, scores in detectors.items():
                row[f"{kind}_score"] = _r(scores[l, h])
            rows.append(row)
    return rows


def composition_table(model) -> dict[str, Any]:
    """Q/K/V composition scores as nested lists ``[L][H][L][H]``, with the strongest pair of each."""
    out: dict[str, Any] = {}
    strongest = {}
    for mode in ("Q", "K", "V"):
        s = circuits.composition_scores(model, mode)                    # [L, H, L, H]
        out[mode] = [[[[_r(x) for x in row] for row in mat] for mat in layer] for layer in s.tolist()]
        flat = int(s.flatten().argmax())
        idx = torch.unravel_index(torch.tensor(flat), s.shape)
        strongest[mode] = {"from": [int(idx[0]), int(idx[1])], "to": [int(idx[2]), int(idx[3])],
                           "score": _r(s.flatten()[flat])}
    out["strongest"] = strongest
    return out


# ------------------------------------------------------------------------- task facts
@torch.no_grad()
def max_attention_facts(model, task: Task, reduce: str = "max") -> dict[str, Any]:
    """For a task whose answer is the max (or, ``reduce="min"``, the min) of the tokens so far: how
    often each scored position's most-attended key holds it, the attention weight on such keys,
    and the QK rank correlation of key value vs score. Keys are named by ``reduce``
    (``top_key_is_max``, ``weight_on_max``)."""
    tokens = task.eval_batch().tokens.to(model_device(model))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"]                     # [b, h, q, k]
    running = (tokens.cummax(1) if reduce == "max" else tokens.cummin(1)).values  # [b, q]
    is_max = tokens[:, None, :] == running[:, :, None]                 # [b, q, k]: key holds the answer so far
    is_max &= torch.ones_like(is_max[0]).tril().bool()
    top_key = pattern.argmax(-1)                                       # [b, h, q]
    hits = is_max[:, None].expand_as(pattern).gather(-1, top_key[..., None])[..., 0]  # [b, h, q]
    weight_on_max = (pattern * is_max[:, None]).sum(-1)               # [b, h, q]
    top, weight = f"top_key_is_{reduce}", f"weight_on_{reduce}"
    by_length = {}
    for q in task.scored_positions:
        by_length[str(q + 1)] = {
            top: _r(hits[:, :, q].float().mean()),
            weight: _r(weight_on_max[:, :, q].mean()),
        }
    scored = task.scored_positions
    last = scored[-1]
    # A key position adds the same amount to every key's score for a given query, so the
    # ranking depends on the query position only: report it for each, keys at that position.
    rank = {str(q): _r(circuits.key_rank_correlation(model, 0, 0, q_pos=q, k_pos=q)) for q in scored}
    return {
        top: _r(hits[:, :, scored].float().mean()),
        weight: _r(weight_on_max[:, :, scored].mean()),
        "by_length": by_length,
        "key_rank_correlation": {"q_pos": last, "by_q_pos": rank,
                                 "no_positions": _r(circuits.key_rank_correlation(model, 0, 0, None, None))},
    }


def task_facts(model, task: Task) -> dict[str, Any]:
    """The attention facts that the task's answer rule asks for (``answer_rule().reduce`` max or
    min, one layer, one head: :func:`max_attention_facts`), then what the task measures itself
    (``task.facts(model)``)."""
    rule = task.answer_rule()
    one_head = model.cfg.n_layers == 1 and model.cfg.n_heads == 1
    facts: dict[str, Any] = {}
    if rule is not None and rule.reduce in ("max", "min") and one_head and task.scored_positions:
        facts = max_attention_facts(model, task, rule.reduce)
    return {**facts, **task.facts(model)}


# ------------------------------------------------------------------------- findings
def _findings(task: Task, s: Summary) -> list[Finding]:
    f: list[Finding] = []
    ev = s.eval
    found = [(kind, groups) for kind, groups in breakdowns(ev) if groups]
    if found:
        kind, groups = found[0][0].replace("_", " "), found[0][1]
        worst_key, worst = min(groups.items(), key=lambda kv: kv[1]["accuracy"])
        f.append(Finding("accuracy", f"Accuracy {_pct(ev['accuracy'])} overall; lowest at {kind} {worst_key}: "
                         f"{_pct(worst['accuracy'])}.", _r(ev["accuracy"])))
    else:
        split = " on the held-out test split" if "train_accuracy" in ev else ""
        f.append(Finding("accuracy", f"Accuracy {_pct(ev['accuracy'])}{split}.", _r(ev["accuracy"])))
    # The task's own findings (its attention facts in words: max's attention to the maximum, ...).
    f.extend(Finding(d["id"], d["text"], d["value"]) for d in task.findings(s.to_dict()))
    if "previous_token_score" in (s.heads[0] if s.heads else {}):
        # A previous-token head is looked for in layer 0, an induction head after it: an
        # induction head needs the earlier layer's previous-token information to compose with.
        prev = max((r for r in s.heads if r["layer"] == 0), key=lambda r: r["previous_token_score"])
        ind = max((r for r in s.heads if r["layer"] > 0), key=lambda r: r["induction_score"])
        f.append(_detected("previous_token", "a previous-token", prev, "in layer 0"))
        f.append(_detected("induction", "an induction", ind, "after layer 0"))
    if s.composition is not None:
        k = s.composition["strongest"]["K"]
        f.append(Finding("k_composition", f"Strongest K-composition: head {k['from'][0]}.{k['from'][1]} into head "
                         f"{k['to'][0]}.{k['to'][1]} (score {k['score']:.3f}).", k["score"]))
    if s.mlp:
        m = s.mlp
        if m.get("kind") == "fourier_zp" and m["key_frequencies"]:
            f.append(Finding("logit_fve", f"Key frequencies {m['key_frequencies']} explain "
                             f"{_pct(m['logit_fve'])} of the logit variance.", m["logit_fve"]))
        elif m.get("kind") == "token_spectrum" and m["dominant_frequencies"]:
            top = m["dominant_frequencies"][0]
            f.append(Finding("linear_share", f"A straight line in the attended token explains a median "
                             f"{_pct(m['linear_share_median'])} of a neuron's input.", m["linear_share_median"]))
            f.append(Finding("dominant_frequency", f"Beyond that line, the strongest frequency in the neuron inputs is "
                             f"k={top['k']} (period {top['period']:.2f} tokens), {_pct(top['share'])} of the "
                             f"spectrum.", _r(top["share"])))
    return f


# A head is called a previous-token or induction head when it puts at least this share of its
# attention where such a head would (TransformerLens's detector scores, on random repeats).
DETECTED = 0.5


def _detected(kind: str, words: str, row: dict[str, Any], where: str) -> Finding:
    """The best head of ``kind`` in words: a claim only when its score reaches ``DETECTED``."""
    score, name = row[f"{kind}_score"], f"{row['layer']}.{row['head']}"
    if score >= DETECTED:
        return Finding(kind, f"Head {name} is {words} head (score {score:.3f}).", score)
    return Finding(kind, f"No head {where} is {words} head: the highest score is {score:.3f} (head {name}; "
                   f"{DETECTED} would be needed).", score)


# ------------------------------------------------------------------- two models
def frequency_comparison(a, b, top: int = 5) -> dict[str, Any]:
    """How two one-layer MLP models' neuron-input spectra compare (e.g. ``add`` against ``fib``).

    Both spectra are taken over the tokens both vocabularies share (``0..n-1``, straight-line
    trend removed, :func:`qkov.fourier.neuron_input_spectrum`). Returns their overlap
    ``Σ_k min(S_a[k], S_b[k])`` (1: the same distribution of power over frequencies) and the
    frequencies among both models' ``top`` dominant ones.
    """
    from .fourier import frequency_overlap, neuron_input_spectrum

    n = min(a.cfg.d_vocab, b.cfg.d_vocab)
    sa, sb = neuron_input_spectrum(a, n_tokens=n), neuron_input_spectrum(b, n_tokens=n)
    shared = sorted({f["k"] for f in sa.top(top)} & {f["k"] for f in sb.top(top)})
    return {"n_tokens": n, "frequency_overlap": round(frequency_overlap(sa, sb), 4),
            "shared_dominant_frequencies": shared}


# ------------------------------------------------------------------------- entry point
def analyze(
    model,
    task: Task | str,
    checkpoints: Iterable[tuple[int, Any]] | None = None,
    checks: bool = True,
) -> Summary:
    """Everything qkov measures about ``model`` on ``task``, as a Summary (``.to_json()``).

    ``checkpoints``: the run's ``(step, model)`` checkpoints, when it has some (e.g.
    ``qkov.store.checkpoints(run_dir)``); for ``modadd`` the MLP section then adds progress
    measures over them, against ``model``'s key frequencies. ``checks``: run the task's causal
    checks of its findings (``task.checks``, interventions on a qkov model). ``analyze`` reads
    no files.
    """
    from .tasks import get_task

    task = get_task(task) if isinstance(task, str) else task
    task.check_model(model.cfg)
    was_training = model.training
    model.eval()
    try:
        multi = model.cfg.n_layers > 1
        s = Summary(
            task=task.to_dict(),
            model=model.cfg.to_dict(),
            eval=task.evaluate(model),
            heads=head_table(model, multi),
            composition=composition_table(model) if multi else None,
        )
        s.attention = task_facts(model, task)
        if model.cfg.d_mlp is not None and model.cfg.n_layers == 1:
            s.mlp = mlp_summary(model, task)
            if checkpoints is not None and s.mlp.get("kind") == "fourier_zp":
                from .progress import progress_measures

                s.mlp["progress"] = progress_measures(checkpoints, task, final_model=model)
        s.findings = _findings(task, s)
        if checks and isinstance(model, Transformer):
            s.checks = task.checks(Interventions(model, task), s.to_dict())
        return s
    finally:
        model.train(was_training)
