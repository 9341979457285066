"""The sentences a report's sections say about *this* model, chosen from its shape and Summary.

A one-head attention-only model answers through its OV circuit alone; a model with an MLP
answers through its neurons; with several heads each circuit is one term of a sum. Each
function here reads :class:`~qkov.report.data.ReportData` (the model config, the Summary's
findings) and returns the text that is true of the model at hand, never asking which task it was
trained on.

>>> from types import SimpleNamespace
>>> d = SimpleNamespace(model_cfg={"n_layers": 1, "n_heads": 4, "d_mlp": 512, "act_fn": "relu"})
>>> model_shape(d)
'1 layer of 4 attention heads and an MLP of 512 ReLU neurons'
"""

from __future__ import annotations

from .data import ReportData, finding


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'s' * (k != 1)}"


def model_shape(d: ReportData) -> str:
    """``'1 layer, 1 attention head, no MLP'`` and the like."""
    cfg = d.model_cfg
    layers, heads, mlp = cfg["n_layers"], cfg["n_heads"], cfg.get("d_mlp")
    attn = f"{_n(layers, 'layer')}, {_n(heads, 'attention head')}" if heads == 1 else (
        f"{_n(layers, 'layer')} of {heads} attention heads" + (" each" if layers > 1 else ""))
    if mlp is None:
        return attn + ", no MLP"
    act = {"relu": "ReLU ", "gelu": "GELU "}.get(cfg.get("act_fn"), "")
    mlps = "an MLP" if layers == 1 else "an MLP in each layer"
    return f"{attn} and {mlps} of {mlp} {act}neurons"


def attention(d: ReportData) -> str:
    where = ("the inputs given to the report" if d.inputs_given
             else "a few of the task's inputs (panel titles: the input → the model's answer)")
    spread = ("key positions 0..q (each row sums to 1; attention is causal)" if d.causal else
              "every key position, before and after it (each row sums to 1; attention is bidirectional; "
              "a padded position's row is empty and no row attends to one)")
    text = (f"Where each head looks on {where}: row q shows how query position q spreads its attention over "
            f"{spread}. Axes read (position) token. ")
    if d.has_mlp:
        return text + ("This model has an MLP after attention, so a head need not find the answer: it moves "
                       "what the neurons need (here, which tokens and how much of each) to the answer position.")
    if d.n_heads_total == 1:
        return text + ("With one head and no MLP, the head must put its weight on the key that holds the answer: "
                       "its OV circuit can only pass on what it attends to.")
    return text + ("With several heads and no MLP, heads share the work: a later head can attend using what an "
                   "earlier one wrote (see the composition scores).")


def qk(d: ReportData) -> str:
    text = ("The full QK circuit gives the attention score a query token assigns to a key token along the direct "
            "path, before the softmax. Without positions it shows token preferences alone; with positions (pick a "
            "query/key position pair from the dropdown) it is the score the model computes at those positions. "
            "The positional circuit shows how query positions prefer key positions, whatever the tokens; "
            + ("cells where the key comes after the query are blank, since a causal model never attends there."
               if d.causal else "every cell is shown, those where the key comes after the query too (acausal "
               "cells), since a bidirectional model's heads read every position."))
    rank = finding(d.summary, "key_rank_correlation")
    if rank is not None:
        text += f" For this model: {rank['text']}"
    if d.model_cfg["n_layers"] > 1:
        text += (" In layer 1 and above these are only the direct-path terms: queries and keys also read what "
                 "earlier heads wrote (K- and Q-composition), which these heatmaps do not show.")
    return text


def ov(d: ReportData) -> str:
    text = ("The full OV circuit shows what attending to a token does to each output logit, along the direct path. "
            "Its eigenvalues summarise it: positive real eigenvalues mean copying, and the copying score "
            "Re(Σλ)/Σ|λ| is 1 for a perfect copier. ")
    if d.has_mlp:
        text += ("In this model a head's output reaches the logits mostly through the MLP's neurons (see MLP "
                 "neurons), so this circuit is only its direct effect and a bright diagonal is not expected.")
    elif d.n_heads_total == 1:
        text += ("With one head and no MLP this is the whole path from an attended token to the answer: a copying "
                 "head has a bright diagonal, attending to token t raises logit t.")
    else:
        text += ("With several heads each circuit is one term of the sum the model writes; a head whose output "
                 "later heads read (V-composition) also acts through them.")
    copying = finding(d.summary, "copying_score")
    return text + (f" For this model: {copying['text']}" if copying else "")


def mlp(d: ReportData) -> str:
    heads = d.model_cfg["n_heads"]
    through = "the attention head's OV circuit" if heads == 1 else f"the {heads} heads' OV circuits together"
    return (f"What each layer-0 neuron receives through {through} when attention falls fully on a token (pick "
            "the attended position from the dropdown), and one neuron at a time with the slider (it starts on "
            "the neuron whose input is most nearly a single wave). Smooth waves across token values are "
            "periodic neurons: the model computes with cos and sin of the numbers. The neuron → logit map shows "
            "what each neuron's activation adds to every answer.")
