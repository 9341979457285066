"""MLP neuron activations over a task's whole input set, read from the activation cache.

The weights-only maps (``circuits/mlp.py``) say what each token writes into a neuron; these
are what the neurons actually do on every input, e.g. the ``[p, p]`` map of a modular-addition
neuron over all ``(a, b)`` pairs (``qkov.fourier.neuron_grid``) or an addition neuron over the
triangle ``a + b <= 127``.

>>> import qkov
>>> task = qkov.get_task("add", max_sum=9)
>>> tokens, acts = neuron_activations(qkov.Transformer(task.model_config()), task)
>>> tokens.shape, acts.shape
(torch.Size([55, 2]), torch.Size([55, 1, 128]))
"""

from __future__ import annotations

import torch
from torch import Tensor

from .devices import model_device
from .errors import QkovError


@torch.no_grad()
def neuron_activations(model, task, layer: int = 0, hook: str = "post") -> tuple[Tensor, Tensor]:
    """``tokens [n, pos]`` of every input of a finite task and the MLP's ``acts [n, n_scored, d_mlp]``.

    Activations are ``blocks.{layer}.mlp.hook_{hook}`` (``post``: after the nonlinearity, ``pre``:
    before it) at the task's scored positions. Works with qkov and TransformerLens models.
    """
    if not getattr(task, "finite", False):
        raise QkovError(f"task '{task.name}' samples its inputs; neuron activations over all inputs need a finite task "
                        f"(add, fib, modadd)")
    if hook not in ("pre", "post"):
        raise QkovError(f"hook={hook!r} must be 'pre' or 'post'")
    n_layers = model.cfg.n_layers
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise QkovError(f"layer={layer!r} is out of range: this model has n_layers={n_layers}, "
                        f"so layer must be in 0..{n_layers - 1}")
    tokens = task.dataset("all").tokens.to(model_device(model))
    name = f"blocks.{layer}.mlp.hook_{hook}"
    attn_only = QkovError("neuron activations need an MLP, but this model is attention-only (d_mlp=None)")
    if name not in getattr(model, "hook_dict", {name: None}):           # qkov and TransformerLens alike
        raise attn_only
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    if name not in cache:
        raise attn_only
    return tokens, cache[name][:, task.scored_positions]
