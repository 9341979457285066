"""Interventions that test a circuit story: ablations and attention-pattern overrides.

An :class:`Intervention` is a named recipe for forward hooks, made afresh for each batch of
tokens it runs on (a pattern override needs the tokens; a resample ablation draws per batch).
Builders here make the common ones: zero, mean (over a reference batch) and resample ablation
of heads (at ``hook_z`` or ``hook_result``), of MLP neurons, of the positional embedding and of
the direct path; a head's attention replaced by a given pattern; positions removed from a head's
key (or query, value) input only. Paths between heads, a copying OV circuit and projections of
neuron inputs are in :mod:`qkov.path_ablations`.

:func:`run` gives the logits under an intervention and :func:`evaluate` the task's metrics
(accuracy and loss, by length or position, as ``Task.evaluate`` reports them); both run the
plain forward (the fast paths are for training). :class:`Interventions` binds a model, its task
and a reference batch: it is the handle a task's causal checks receive.

>>> import qkov
>>> task = qkov.get_task("max")
>>> model = qkov.Transformer(task.model_config())
>>> tokens = task.eval_batch().tokens[:8]
>>> zero = ablate_heads(model, [(0, 0)], how="zero")
>>> zero.text
'head 0.0 zero-ablated (hook_z)'
>>> run(model, zero, tokens).shape
torch.Size([8, 6, 64])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .devices import model_device
from .errors import QkovError
from .tasks import Batch, Scorer, Task

HOWS = ("zero", "mean", "resample")
REFERENCE_ROWS = 2048     # reference examples whose activations a mean or resample ablation reads
Hooks = list[tuple[str, Callable]]


@dataclass(frozen=True)
class Intervention:
    """``text`` says what is done; ``make(tokens)`` returns the forward hooks for that batch."""

    text: str
    make: Callable[[Tensor], Hooks]

    def fwd_hooks(self, tokens: Tensor) -> Hooks:
        return list(self.make(tokens))

    def __add__(self, other: Intervention) -> Intervention:
        """Both interventions at once."""
        return Intervention(f"{self.text}; {other.text}", lambda t: self.fwd_hooks(t) + other.fwd_hooks(t))


def _static(text: str, hooks: Hooks) -> Intervention:
    return Intervention(text, lambda tokens: hooks)


# ------------------------------------------------------------------ running
def run(model, intervention: Intervention | None, tokens: Tensor) -> Tensor:
    """Logits ``[batch, pos, d_vocab_out]`` of the plain forward with ``intervention``'s hooks."""
    tokens = torch.as_tensor(tokens).to(model_device(model))
    if intervention is None:
        return model(tokens)
    return model.run_with_hooks(tokens, fwd_hooks=intervention.fwd_hooks(tokens))


class InterventionScorer(Scorer):
    """What ``Task.evaluate`` reads from the model with an intervention applied."""

    def __init__(self, model, intervention: Intervention | None):
        super().__init__(model, None)
        self.intervention = intervention

    def logits(self, tokens: Tensor) -> Tensor:
        return run(self.model, self.intervention, tokens)


def evaluate(model, task: Task, intervention: Intervention | None = None, batch: Batch | None = None) -> dict:
    """The task's metrics (``Task.evaluate``'s dict) with ``intervention`` applied."""
    was_training = model.training
    model.eval()
    try:
        return task.evaluate(InterventionScorer(model, intervention), batch)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------ reference activations
@torch.no_grad()
def reference_activations(model, tokens: Tensor, names: Sequence[str], chunk: int = 512) -> dict[str, Tensor]:
    """Activations ``names`` on reference ``tokens [n, pos]`` (at most ``REFERENCE_ROWS`` rows),
    on the model's device: what mean and resample ablations replace activations with."""
    if tokens is None:
        raise QkovError("a mean or resample ablation needs reference tokens [n, pos]; pass reference=...")
    tokens = torch.as_tensor(tokens)[:REFERENCE_ROWS].to(model_device(model))
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    for i in range(0, len(tokens), chunk):
        _, cache = model.run_with_cache(tokens[i : i + chunk], names_filter=list(names))
        for n in names:
            parts[n].append(cache[n])
    return {n: torch.cat(v) for n, v in parts.items()}


def replacement(how: str, x: Tensor, ref: Tensor | None, seed: int = 0) -> Tensor:
    """What an ablation puts in place of ``x [b, p, ...]``: zeros, the reference's mean at each
    position, or the activation of a reference example drawn at random for each example."""
    if how == "zero":
        return torch.zeros_like(x)
    if ref is None:
        raise QkovError(f"a {how} ablation needs reference activations; pass reference tokens")
    if ref.shape[1] < x.shape[1]:
        raise QkovError(f"reference activations cover {ref.shape[1]} positions but the run has {x.shape[1]}; "
                        f"use reference tokens at least as long as the run's")
    ref = ref[:, : x.shape[1]]
    if how == "mean":
        return ref.mean(0, keepdim=True).expand_as(x).to(x.dtype)
    pick = torch.randint(len(ref), (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    return ref[pick.to(ref.device)].to(x.dtype)


def check_how(how: str) -> None:
    if how not in HOWS:
        raise QkovError(f"how={how!r} is not an ablation; expected one of {', '.join(HOWS)}")


def _ablation_hook(how: str, index: tuple, ref: Tensor | None, seed: int) -> Callable:
    """A hook that replaces ``x[index]`` (after the batch dimension) by its ablated value."""
    def hook(x: Tensor, hook) -> Tensor:
        new = replacement(how, x[(slice(None), *index)], None if ref is None else ref[(slice(None), *index)], seed)
        x = x.clone()
        x[(slice(None), *index)] = new
        return x
    return hook


# ------------------------------------------------------------------ ablations
def _heads_by_layer(model, heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    cfg, out = model.cfg, {}
    for pair in heads:
        l, h = (int(i) for i in pair)
        if not (0 <= l < cfg.n_layers and 0 <= h < cfg.n_heads):
            raise QkovError(f"head {l}.{h} does not exist; this model has layers 0..{cfg.n_layers - 1} "
                            f"and heads 0..{cfg.n_heads - 1}")
        out.setdefault(l, []).append(h)
    if not out:
        raise QkovError("no heads given; pass heads as (layer, head) pairs, e.g. [(0, 1)]")
    return out


def ablate_heads(model, heads: Iterable[tuple[int, int]], how: str = "mean", reference: Tensor | None = None,
                 at: str = "z", seed: int = 0) -> Intervention:
    """Heads ``[(layer, head), ...]`` ablated at ``hook_z`` (``at="z"``, what each head reads out
    of its values) or ``hook_result`` (``at="result"``, what it writes to the stream)."""
    check_how(how)
    if at not in ("z", "result"):
        raise QkovError(f"at={at!r}: heads are ablated at 'z' (hook_z) or 'result' (hook_result)")
    by_layer = _heads_by_layer(model, heads)
    names = {l: f"blocks.{l}.attn.hook_{at}" for l in by_layer}
    refs = reference_activations(model, reference, list(names.values())) if how != "zero" else {}
    hooks = [(names[l], _ablation_hook(how, (slice(None), hs), refs.get(names[l]), seed))
             for l, hs in by_layer.items()]
    which = [f"{l}.{h}" for l, hs in by_layer.items() for h in hs]
    return _static(f"head{'s' if len(which) > 1 else ''} {', '.join(which)} {how}-ablated (hook_{at})", hooks)


def ablate_neurons(model, neurons: dict[int, Sequence[int]], how: str = "mean", reference: Tensor | None = None,
                   seed: int = 0) -> Intervention:
    """MLP neurons ``{layer: [neuron, ...]}`` ablated at ``mlp.hook_post`` (their activations)."""
    check_how(how)
    if model.cfg.d_mlp is None:
        raise QkovError("neuron ablation needs an MLP, but this model is attention-only (d_mlp=None)")
    for l, idx in neurons.items():
        if not 0 <= int(l) < model.cfg.n_layers or any(not 0 <= int(i) < model.cfg.d_mlp for i in idx):
            raise QkovError(f"neurons {list(idx)} of layer {l} do not exist; layers 0..{model.cfg.n_layers - 1}, "
                            f"neurons 0..{model.cfg.d_mlp - 1}")
    names = {int(l): f"blocks.{int(l)}.mlp.hook_post" for l in neurons}
    refs = reference_activations(model, reference, list(names.values())) if how != "zero" else {}
    hooks = [(names[int(l)], _ablation_hook(how, (slice(None), torch.as_tensor(list(idx)).long()),
                                            refs.get(names[int(l)]), seed)) for l, idx in neurons.items()]
    count = sum(len(v) for v in neurons.values())
    return _static(f"{count} MLP neuron{'s' if count != 1 else ''} {how}-ablated", hooks)


def ablate_positions(model, positions: Sequence[int] | None = None, how: str = "zero") -> Intervention:
    """The positional embedding removed (``zero``) or replaced by its mean over positions
    (``mean``), at every position or at ``positions`` only."""
    if how not in ("zero", "mean"):
        raise QkovError(f"how={how!r}: positions are ablated by 'zero' or 'mean' (over positions)")
    mean = model.pos_embed.W_pos.detach().mean(0)                              # [d]
    cols = slice(None) if positions is None else torch.as_tensor(list(positions)).long()

    def hook(pos: Tensor, hook) -> Tensor:
        pos = pos.clone()
        pos[:, cols] = 0.0 if how == "zero" else mean.to(pos.dtype)
        return pos
    where = "every position" if positions is None else f"positions {list(positions)}"
    return _static(f"positional embedding {'removed' if how == 'zero' else 'replaced by its mean'} at {where}",
                   [("hook_pos_embed", hook)])


def ablate_direct_path(model, how: str = "zero", reference: Tensor | None = None) -> Intervention:
    """The direct path (embeddings straight to the unembedding) removed: the token and
    positional embeddings are subtracted from the stream the unembedding reads (``mean``: and
    their mean over the reference batch at each position added back)."""
    if how not in ("zero", "mean"):
        raise QkovError(f"how={how!r}: the direct path is ablated by 'zero' or 'mean'")
    ref = None
    if how == "mean":
        acts = reference_activations(model, reference, ["hook_embed", "hook_pos_embed"])
        ref = acts["hook_embed"] + acts["hook_pos_embed"]                     # [n, p, d]
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def make(tokens: Tensor) -> Hooks:
        seen: dict[str, Tensor] = {}
        keep = lambda x, hook: seen.__setitem__(hook.name, x)  # noqa: E731

        def final(resid: Tensor, hook) -> Tensor:
            direct = seen["hook_embed"] + seen["hook_pos_embed"]             # [b, p, d]
            return resid - direct + replacement(how, direct, ref)
        return [("hook_embed", keep), ("hook_pos_embed", keep), (last, final)]
    return Intervention(f"direct path {how}-ablated", make)


# ------------------------------------------------------------------ attention
def override_pattern(model, layer: int, head: int, pattern: Tensor | Callable[[Tensor], Tensor],
                     queries: Sequence[int] | None = None, text: str | None = None) -> Intervention:
    """Head ``layer.head``'s attention replaced by ``pattern`` (``[batch, q, k]`` or ``[q, k]``,
    or a function of the tokens returning one) at query positions ``queries`` (None: all)."""
    _heads_by_layer(model, [(layer, head)])
    rows = slice(None) if queries is None else torch.as_tensor(list(queries)).long()

    def make(tokens: Tensor) -> Hooks:
        new = pattern(tokens) if callable(pattern) else torch.as_tensor(pattern)

        def hook(p: Tensor, hook) -> Tensor:                                  # [b, h, q, k]
            target = new.to(device=p.device, dtype=p.dtype).expand(p.shape[0], *p.shape[2:])
            p = p.clone()
            p[:, head, rows] = target[:, rows]
            return p
        return [(f"blocks.{layer}.attn.hook_pattern", hook)]
    return Intervention(text or f"head {layer}.{head}'s attention replaced by a given pattern", make)


def remove_positions(model, layer: int = 0, heads: Sequence[int] | None = None, inputs: str = "k") -> Intervention:
    """The positional embedding subtracted from the ``inputs`` (``"q"``, ``"k"`` or ``"v"``) of
    heads ``heads`` (None: all) of ``layer`` only: e.g. keys scored by token alone, with
    queries, values and everything else unchanged."""
    if inputs not in ("q", "k", "v"):
        raise QkovError(f"inputs={inputs!r}: positions are removed from a head's 'q', 'k' or 'v' input")
    cols = list(range(model.cfg.n_heads)) if heads is None else [int(h) for h in heads]
    _heads_by_layer(model, [(layer, h) for h in cols])

    def make(tokens: Tensor) -> Hooks:
        seen: dict[str, Tensor] = {}

        def subtract(x: Tensor, hook) -> Tensor:                             # [b, p, h, d]
            x = x.clone()
            x[:, :, cols] -= seen["pos"][:, :, None]
            return x
        return [("hook_pos_embed", lambda p, hook: seen.__setitem__("pos", p)),
                (f"blocks.{layer}.hook_{inputs}_input", subtract)]
    return Intervention(f"positional embedding removed from layer {layer}'s {inputs} input", make)


# ------------------------------------------------------------------ the handle
class Interventions:
    """A model, its task and a reference batch: what a task's causal checks receive.

    Builders take the same arguments as the module's functions, without the model and the
    reference; :meth:`evaluate` gives the task's metrics under an intervention.
    """

    def __init__(self, model, task: Task, reference: Tensor | None = None):
        self.model, self.task = model, task
        self.reference = task.eval_batch().tokens if reference is None else reference
        self.n_layers, self.n_heads = model.cfg.n_layers, model.cfg.n_heads

    def evaluate(self, intervention: Intervention | None = None) -> dict[str, Any]:
        return evaluate(self.model, self.task, intervention)

    def ablate_heads(self, heads, how: str = "mean", at: str = "z", seed: int = 0) -> Intervention:
        return ablate_heads(self.model, heads, how, self.reference, at, seed)

    def ablate_neurons(self, neurons, how: str = "mean", seed: int = 0) -> Intervention:
        return ablate_neurons(self.model, neurons, how, self.reference, seed)

    def ablate_positions(self, positions=None, how: str = "zero") -> Intervention:
        return ablate_positions(self.model, positions, how)

    def ablate_direct_path(self, how: str = "zero") -> Intervention:
        return ablate_direct_path(self.model, how, self.reference)

    def override_pattern(self, layer: int, head: int, pattern, queries=None, text=None) -> Intervention:
        return override_pattern(self.model, layer, head, pattern, queries, text)

    def remove_positions(self, layer: int = 0, heads=None, inputs: str = "k") -> Intervention:
        return remove_positions(self.model, layer, heads, inputs)

    def ablate_path(self, sender, receivers, inputs: str = "k", how: str = "mean") -> Intervention:
        from .path_ablations import ablate_path

        return ablate_path(self.model, sender, receivers, inputs, how, self.reference)

    def copying_ov(self, layer: int, head: int) -> Intervention:
        from .path_ablations import copying_ov

        return copying_ov(self.model, layer, head)

    def neuron_inputs_on_frequencies(self, freqs: Sequence[int], remove: bool = False) -> Intervention:
        from .path_ablations import neuron_inputs_on_frequencies

        return neuron_inputs_on_frequencies(self.model, freqs, self.task.d_vocab, remove)
