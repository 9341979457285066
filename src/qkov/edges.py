"""Path patching, exact patching of every edge of a small model's graph, and attribution patching.

The graph's nodes are what writes to the residual stream (the token and positional embeddings,
each head's output, each MLP's output) and what reads from it (each head's query, key and value
input, each MLP's input, the logits). An edge ``sender -> receiver`` joins a writer to a later
reader. Patching an edge adds the sender's clean-minus-corrupted output to that one receiver's
input in the corrupted run, everything else left to compute as it does (TransformerLens's
direction: clean activations into the corrupted run); its score is the metric's change.

- :func:`get_path_patch_head_to_logits`, :func:`get_path_patch_head_to_head`: path patching, in
  ``transformer_lens.patching``'s style (``(model, corrupted_tokens, clean_cache, metric)``, the
  patched metric for each sender head);
- :func:`edge_patching`: every edge, exactly, as batched forwards from the receiver's layer on;
- :func:`eap`, :func:`eap_ig`: attribution patching, ``Δsender · ∂metric/∂receiver`` from one
  backward pass (EAP, Syed et al. 2023) or averaged along the straight line from the corrupted
  to the clean embeddings (EAP-IG, Hanna et al. 2024); :func:`spearman` ranks them against the
  exact scores.

>>> import qkov
>>> model = qkov.Transformer(qkov.ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=10, n_ctx=5))
>>> clean, corrupted = torch.tensor([[1, 2, 3, 1, 2]]), torch.tensor([[1, 2, 4, 1, 2]])
>>> _, clean_cache = model.run_with_cache(clean)
>>> exact = edge_patching(model, corrupted, clean_cache, lambda logits: logits[:, -1, 3].mean())
>>> len(exact.edges), exact.edges[0]
(42, ('embed', 'a0.0.q'))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .corrupted import Corrupted, Metric, check_metric_value
from .errors import QkovError
from .patching import CHUNK_ELEMENTS, check_tokens, row_width


@dataclass
class Node:
    """A reader of the residual stream: ``hook`` (``head`` picks a head's input) in ``layer``."""

    name: str          # "a1.0.k", "m0", "logits"
    layer: int
    hook: str
    head: int | None


def receivers(model) -> list[Node]:
    cfg, out = model.cfg, []
    for l in range(cfg.n_layers):
        out += [Node(f"a{l}.{h}.{x}", l, f"blocks.{l}.hook_{x}_input", h) for h in range(cfg.n_heads) for x in "qkv"]
        if cfg.d_mlp is not None:
            out.append(Node(f"m{l}", l, f"blocks.{l}.hook_mlp_in", None))
    return out + [Node("logits", cfg.n_layers - 1, f"blocks.{cfg.n_layers - 1}.hook_resid_post", None)]


def senders_of(model, node: Node) -> list[str]:
    """The writers ``node`` reads: the embeddings, heads of earlier layers (and of its own layer,
    for an MLP), earlier MLPs."""
    cfg = model.cfg
    heads_up_to = node.layer + (1 if node.name[0] == "m" or node.name == "logits" else 0)
    mlps_up_to = node.layer + (1 if node.name == "logits" else 0)
    out = ["embed", "pos"]
    for l in range(heads_up_to):
        out += [f"a{l}.{h}" for h in range(cfg.n_heads)]
        if cfg.d_mlp is not None and l < mlps_up_to:
            out.append(f"m{l}")
    return out


def outputs(model, cache: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every writer's output ``[B, P, d]`` in a cache (a head's from ``hook_z`` and ``W_O``)."""
    need = ["hook_embed", "hook_pos_embed"] + [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    missing = [n for n in need if n not in cache]
    if missing:
        raise QkovError(f"the cache has no {missing[0]}; make it with model.run_with_cache(tokens)")
    out = {"embed": cache["hook_embed"], "pos": cache["hook_pos_embed"]}
    for l in range(model.cfg.n_layers):
        z = cache[f"blocks.{l}.attn.hook_z"]                                    # [B, P, h, e]
        result = torch.einsum("bphe,hed->bphd", z, model.blocks[l].attn.W_O.detach().to(z.dtype))
        out.update({f"a{l}.{h}": result[:, :, h] for h in range(model.cfg.n_heads)})
        if model.cfg.d_mlp is not None:
            out[f"m{l}"] = cache[f"blocks.{l}.hook_mlp_out"]
    return out


def _adder(node: Node, deltas: Tensor):
    """A hook adding variant j's ``deltas[j] [B, rows, d]`` to ``node``'s input ([c*B, rows, ...])."""
    c = deltas.shape[0]

    def hook(x: Tensor, hook) -> Tensor:
        x = x.clone()
        view = x.view(c, -1, *x.shape[1:])
        if node.head is None:
            view += deltas.to(x.dtype)
        else:
            view[:, :, :, node.head] += deltas.to(x.dtype)
        return x
    return hook


def patch_inputs(model, run: Corrupted, node: Node, deltas: Sequence[Tensor], metric: Metric) -> list[float]:
    """The metric with each ``deltas[j] [B, P, d]`` added to ``node``'s input, one variant each."""
    B, P = run.logits.shape[:2]
    first = [_first_row(d) for d in deltas]
    order = sorted(range(len(deltas)), key=lambda j: first[j])
    values = [0.0] * len(deltas)
    budget = max(1, CHUNK_ELEMENTS // (B * row_width(model)))
    i = 0
    while i < len(order):
        p0 = min(first[order[i]], P - 1) if Corrupted.rows_continue(model) else 0
        c = max(1, min(len(order) - i, budget // max(1, P - p0)))
        part = order[i : i + c]
        stack = torch.stack([deltas[j][:, p0:] for j in part])                  # [c, B, P - p0, d]
        measured = run.metrics(model, node.layer, p0, len(part), [(node.hook, _adder(node, stack))], metric)
        for j, v in zip(part, measured):
            values[j] = v
        i += c
    return values


def _first_row(delta: Tensor) -> int:
    """The first position where ``delta [B, P, d]`` is nonzero (P when it is zero everywhere)."""
    rows = (delta != 0).flatten(2).any(-1).any(0).nonzero()
    return int(rows[0]) if len(rows) else delta.shape[1]


def _setup(model, corrupted_tokens, clean_cache) -> tuple[Tensor, Corrupted, dict[str, Tensor]]:
    tokens = check_tokens(model, corrupted_tokens, clean_cache, "hook_embed")
    run, cache = Corrupted.run(model, tokens, ["hook_embed", "hook_pos_embed"] + [
        f"blocks.{l}.{n}" for l in range(model.cfg.n_layers) for n in ("attn.hook_z", "hook_mlp_out")
        if n != "hook_mlp_out" or model.cfg.d_mlp is not None])
    clean, corrupt = outputs(model, clean_cache), outputs(model, cache)
    return tokens, run, {k: (clean[k].to(tokens.device) - corrupt[k]).detach() for k in clean}


# ------------------------------------------------------------------ path patching
def _head_grid(model, corrupted_tokens, clean_cache, metric: Metric, node: Node, layers: int) -> Tensor:
    with torch.no_grad():
        tokens, run, delta = _setup(model, corrupted_tokens, clean_cache)
        base = check_metric_value(metric(run.logits))
        H = model.cfg.n_heads
        names = [f"a{l}.{h}" for l in range(layers) for h in range(H)]
        live = [n for n in names if bool(delta[n].ne(0).any())]
        values = dict.fromkeys(names, base)
        values.update(zip(live, patch_inputs(model, run, node, [delta[n] for n in live], metric)))
        return torch.tensor([values[n] for n in names], device=tokens.device).view(layers, H)


def get_path_patch_head_to_logits(model, corrupted_tokens, clean_cache, patching_metric: Metric) -> Tensor:
    """``[n_layers, n_heads]``: the metric with each head's clean output reaching the logits
    directly (the unembedding's input) and nowhere else."""
    last = receivers(model)[-1]
    return _head_grid(model, corrupted_tokens, clean_cache, patching_metric, last, model.cfg.n_layers)


def get_path_patch_head_to_head(model, corrupted_tokens, clean_cache, patching_metric: Metric,
                                receiver: tuple[int, int], inputs: str = "k") -> Tensor:
    """``[receiver_layer, n_heads]``: the metric with each earlier head's clean output reaching
    only head ``receiver``'s ``inputs`` (``q``, ``k`` or ``v``) input (e.g. a previous-token head
    into an induction head's keys)."""
    l, h = (int(i) for i in receiver)
    if inputs not in ("q", "k", "v") or not 0 < l < model.cfg.n_layers or not 0 <= h < model.cfg.n_heads:
        raise QkovError(f"receiver {l}.{h} ({inputs!r} input) must be a head after layer 0 and inputs 'q', 'k' "
                        f"or 'v'; this model has layers 0..{model.cfg.n_layers - 1}")
    node = Node(f"a{l}.{h}.{inputs}", l, f"blocks.{l}.hook_{inputs}_input", h)
    return _head_grid(model, corrupted_tokens, clean_cache, patching_metric, node, l)


# ------------------------------------------------------------------ every edge
@dataclass
class EdgeScores:
    """``edges[i] = (sender, receiver)`` and ``scores[i]``: the metric's change when that edge
    alone carries the clean run (exact), or its estimate (EAP, EAP-IG)."""

    edges: list[tuple[str, str]]
    scores: Tensor
    method: str

    def top(self, n: int = 10) -> list[tuple[str, str, float]]:
        order = self.scores.abs().argsort(descending=True)[:n]
        return [(*self.edges[i], float(self.scores[i])) for i in order.tolist()]


def graph_edges(model) -> list[tuple[str, str]]:
    return [(u, node.name) for node in receivers(model) for u in senders_of(model, node)]


def edge_patching(model, corrupted_tokens, clean_cache, patching_metric: Metric) -> EdgeScores:
    """Every edge patched alone, exactly: ``metric(patched) - metric(corrupted)`` for each."""
    with torch.no_grad():
        tokens, run, delta = _setup(model, corrupted_tokens, clean_cache)
        base = check_metric_value(patching_metric(run.logits))
        edges, scores = [], []
        for node in receivers(model):
            ups = senders_of(model, node)
            live = [u for u in ups if bool(delta[u].ne(0).any())]
            values = dict.fromkeys(ups, base)
            values.update(zip(live, patch_inputs(model, run, node, [delta[u] for u in live], patching_metric)))
            edges += [(u, node.name) for u in ups]
            scores += [values[u] - base for u in ups]
    return EdgeScores(edges, torch.tensor(scores, dtype=torch.float64), "exact")


# ------------------------------------------------------------------ attribution patching
def _receiver_grads(model, tokens: Tensor, metric: Metric, embeds: Tensor | None = None) -> dict[str, Tensor]:
    """``∂metric/∂input`` of every receiver, ``[B, P, d]``: at the run on ``tokens [B, P]``, or
    summed over ``m`` runs whose token embeddings are ``embeds [m, B, P, d]``."""
    nodes = receivers(model)
    kept: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> Tensor:
        kept[hook.name] = x
        return x
    if embeds is None:
        runs, start = 1, (lambda x, hook: x.detach().requires_grad_())
    else:
        runs, flat = embeds.shape[0], embeds.reshape(-1, *embeds.shape[2:])
        start, tokens = (lambda x, hook: flat), tokens.repeat(embeds.shape[0], 1)
    names = list(dict.fromkeys(node.hook for node in nodes))
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", start)] + [(n, keep) for n in names])
        total = sum(_scalar(metric(x)) for x in logits.view(runs, -1, *logits.shape[1:]))
        grads = dict(zip(names, torch.autograd.grad(total, [kept[n] for n in names], allow_unused=True)))
    out = {}
    for node in nodes:
        g = grads[node.hook]
        g = torch.zeros_like(kept[node.hook]) if g is None else g.detach()
        g = g if node.head is None else g[:, :, node.head]
        out[node.name] = g.view(runs, -1, *g.shape[1:]).sum(0)                  # [B, P, d]
    return out


def _scalar(value) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        check_metric_value(value)
        raise QkovError("attribution patching differentiates the metric: return a tensor, not a number")
    return value.reshape(())


def _attribution(model, grads: dict[str, Tensor], delta: dict[str, Tensor], method: str) -> EdgeScores:
    edges = graph_edges(model)
    scores = [float((delta[u].double() * grads[r].double()).sum()) for u, r in edges]
    return EdgeScores(edges, torch.tensor(scores, dtype=torch.float64), method)


def eap(model, corrupted_tokens, clean_cache, patching_metric: Metric) -> EdgeScores:
    """Edge attribution patching: each edge's ``Δsender · ∂metric/∂receiver`` at the corrupted run."""
    tokens, _, delta = _setup(model, corrupted_tokens, clean_cache)
    grads = _receiver_grads(model, tokens, patching_metric)
    return _attribution(model, grads, delta, "EAP")


def eap_ig(model, corrupted_tokens, clean_cache, patching_metric: Metric, steps: int = 8) -> EdgeScores:
    """EAP with integrated gradients: the gradient averaged over ``steps`` runs whose token
    embeddings lie on the line from the corrupted to the clean ones (``k/steps``, k = 1..steps)."""
    if not isinstance(steps, int) or steps < 1:
        raise QkovError(f"steps={steps!r} must be a positive integer")
    tokens, _, delta = _setup(model, corrupted_tokens, clean_cache)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
    start, diff = cache["hook_embed"], clean_cache["hook_embed"].to(tokens.device) - cache["hook_embed"]
    alphas = torch.arange(1, steps + 1, dtype=start.dtype, device=start.device) / steps
    embeds = (start[None] + alphas[:, None, None, None] * diff[None]).detach().requires_grad_()   # [m, B, P, d]
    grads = _receiver_grads(model, tokens, patching_metric, embeds)
    grads = {k: g / steps for k, g in grads.items()}
    return _attribution(model, grads, delta, f"EAP-IG ({steps} steps)")


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two score vectors (ties get their average rank).

    >>> round(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])), 6)
    0.5
    """
    def ranks(x: Tensor) -> Tensor:
        x = x.double().flatten()
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=x.dtype)
        for v in x.unique():                                                    # average rank over ties
            tie = x == v
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else 0.0
