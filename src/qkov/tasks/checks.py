"""Causal checks of each task's circuit story: what is done to the model, and what should follow.

A finding read off the weights ("the QK circuit selects the maximum; the OV circuit copies it")
is a claim about what the model computes; an intervention tests it. Each task's ``checks``
method calls one of the functions here with:

- ``iv``, an interventions handle (``qkov.interventions.Interventions``: ``evaluate``,
  ``ablate_heads``, ``override_pattern``, ``ablate_path``, ...), passed in so that ``tasks/``
  imports nothing above floor 1;
- ``summary``, the Summary's numbers so far (``eval``, ``heads``, ``mlp``).

Each check is ``{id, text, intervention, metric, before, after, holds}``: the task metric before
and after the intervention, and whether it moved the way the story says it should (the rule is
in the text).

>>> tokens = torch.tensor([[3, 9, 2, 9]])
>>> first_max_pattern(tokens)[0].argmax(-1).tolist()     # each query's first maximal key so far
[0, 1, 1, 1]
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def check(id: str, text: str, intervention: str, metric: str, before: float, after: float,
          holds: bool) -> dict[str, Any]:
    return {"id": id, "text": text, "intervention": intervention, "metric": metric,
            "before": float(f"{before:.6g}"), "after": float(f"{after:.6g}"), "holds": bool(holds)}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def first_max_pattern(tokens: Tensor) -> Tensor:
    """``[b, q, k]``: one-hot on the first key ``k <= q`` holding the maximum of ``tokens[:, :q+1]``."""
    P = tokens.shape[1]
    running = tokens.cummax(1).values                                            # [b, q]
    causal = torch.ones(P, P, dtype=torch.bool, device=tokens.device).tril()
    is_max = (tokens[:, None, :] == running[:, :, None]) & causal               # [b, q, k]
    return F.one_hot(is_max.float().argmax(-1), P).float()                       # argmax: the first


# ------------------------------------------------------------------ max
def max_checks(iv, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The one-head ``max`` story: attend to the maximum (QK), copy it (OV)."""
    if (iv.n_layers, iv.n_heads) != (1, 1):
        return []
    before = summary["eval"]["accuracy"]
    out = []

    def run(id: str, x, holds, says: str, yes: str, no: str, rule: str) -> None:
        a = iv.evaluate(x)["accuracy"]
        ok = holds(a)
        out.append(check(id, f"{says}, accuracy is {_pct(a)} ({_pct(before)} before): {yes if ok else no} ({rule}).",
                         x.text, "accuracy", before, a, ok))
    run("qk_selects_max", iv.override_pattern(0, 0, first_max_pattern, text="each position's attention replaced by "
                                              "one-hot on the first maximal token so far"), lambda a: a >= 0.99,
        "With each position's attention one-hot on the first maximal token so far",
        "attending to the maximum is all the QK circuit has to do", "attending to the maximum is not enough",
        "holds at 99% or more")
    run("head_needed", iv.ablate_heads([(0, 0)], "mean"), lambda a: a <= 0.2, "With the head mean-ablated",
        "about chance, so the answer comes through the head", "the model answers without the head",
        "holds at 20% or less")
    run("positions_in_qk", iv.remove_positions(0, inputs="k"), lambda a: a >= before - 0.01,
        "With positional embeddings removed from the keys only (queries and values keep them)",
        "keys are ranked by token value alone", "the ranking of keys leans on their positions", "holds within 1 point")
    run("ov_copies", iv.copying_ov(0, 0), lambda a: a >= before - 0.01,
        "With the head's logits replaced by pure copying (each attended token raises only its own logit, by its "
        "full OV circuit's diagonal entry)", "the OV circuit is a copier", "the OV circuit does more than copy",
        "holds within 1 point")
    return out


# ------------------------------------------------------------------ add, fib
def frequency_checks(iv, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """``add``/``fib``: the neuron inputs' dominant frequencies (the analysis's) carry the answer."""
    mlp = summary.get("mlp") or {}
    if mlp.get("kind") != "token_spectrum" or not mlp.get("dominant_frequencies") or iv.n_layers != 1:
        return []
    freqs = sorted(f["k"] for f in mlp["dominant_frequencies"])
    before = summary["eval"]["accuracy"]
    keep, drop = iv.neuron_inputs_on_frequencies(freqs), iv.neuron_inputs_on_frequencies(freqs, remove=True)
    a, b = iv.evaluate(keep)["accuracy"], iv.evaluate(drop)["accuracy"]
    suffice = "they carry what the neurons read" if a >= before - 0.02 else "they miss part of it"
    needed = "the model needs them" if b <= before / 2 else "it answers without them"
    return [
        check("key_frequencies_suffice", f"With the neuron inputs from the attended token projected onto a straight "
              f"line plus frequencies {freqs}, accuracy is {_pct(a)} ({_pct(before)} before): {suffice} (holds within "
              f"2 points).", keep.text, "accuracy", before, a, a >= before - 0.02),
        check("key_frequencies_needed", f"With frequencies {freqs} removed from those inputs (the rest kept), accuracy "
              f"is {_pct(b)}: {needed} (holds at half the accuracy or less).", drop.text, "accuracy", before, b,
              b <= before / 2),
    ]


# ------------------------------------------------------------------ modadd
def modadd_checks(summary: dict[str, Any], p: int) -> list[dict[str, Any]]:
    """Nanda et al.'s restricted and excluded losses as checks (logit-space interventions)."""
    mlp = summary.get("mlp") or {}
    if mlp.get("kind") != "fourier_zp" or mlp.get("restricted_loss") is None:
        return []
    keys, r, e = mlp["key_frequencies"], mlp["restricted_loss"], mlp["excluded_loss"]
    before_r, before_e = mlp["loss_all"], mlp["train_loss"]
    r_ok, e_ok = r <= 1.5 * max(before_r, 1e-6), e >= math.log(p) / 2
    carry = "those frequencies carry the answer" if r_ok else "they do not carry all of it"
    need = "without them the model cannot answer" if e_ok else "it still answers"
    return [
        check("restricted_loss", f"With the logits restricted to the key frequencies {keys} (their cos/sin(w_k(a+b-c)) "
              f"directions), the loss is {r:.3g} ({before_r:.3g} on the full logits): {carry} (holds at 1.5x the full "
              f"loss or less).", f"logits restricted to key frequencies {keys}", "loss", before_r, r, r_ok),
        check("excluded_loss", f"With those directions removed from the logits, the training loss is {e:.3g} "
              f"({before_e:.3g} before; chance is {math.log(p):.3g}): {need} (holds at half the chance loss or more).",
              f"key frequencies {keys} removed from the logits", "train loss", before_e, e, e_ok),
    ]


# ------------------------------------------------------------------ induction
def induction_checks(iv, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The two-layer induction story: a previous-token head feeds the induction heads' keys."""
    heads = summary.get("heads") or []
    if iv.n_layers < 2 or not heads or "previous_token_score" not in heads[0]:
        return []
    prev = max((h for h in heads if h["layer"] == 0), key=lambda h: h["previous_token_score"])
    later = sorted((h for h in heads if h["layer"] > 0), key=lambda h: -h["induction_score"])
    p = (prev["layer"], prev["head"])
    ind = [(h["layer"], h["head"]) for h in ([h for h in later if h["induction_score"] >= 0.5] or later[:1])]
    heads_text = ("heads " if len(ind) > 1 else "head ") + ", ".join(f"{l}.{h}" for l, h in ind)
    before, rest = summary["eval"]["loss"], summary["eval"]["loss_rest"]
    halfway = before + 0.5 * (rest - before)

    def one(id: str, what: str, x) -> dict[str, Any]:
        a = iv.evaluate(x)["loss"]
        verdict = "the story holds" if a >= halfway else "it does not rise enough"
        return check(id, f"{what}, the loss on the repeated part rises from {before:.3g} to {a:.3g} (the rest's is "
                     f"{rest:.3g}): {verdict} (holds at halfway, {halfway:.3g}, or more).", x.text,
                     "loss on the repeated part", before, a, a >= halfway)
    return [
        one("previous_token_needed", f"With previous-token head {p[0]}.{p[1]} mean-ablated",
            iv.ablate_heads([p], "mean")),
        one("k_composition_path", f"With head {p[0]}.{p[1]} mean-ablated in the key input of induction {heads_text} "
            f"only", iv.ablate_path(p, ind, "k", "mean")),
        one("induction_head_needed", f"With induction {heads_text} mean-ablated", iv.ablate_heads(ind, "mean")),
    ]
