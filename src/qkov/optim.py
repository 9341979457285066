"""AdamW for the training loop: torch's fused CPU kernel, without ``torch.optim``'s wrapping.

``torch.optim.AdamW`` imports ``torch._dynamo`` when the first optimizer is built (2 s here,
more than training the ``max`` model takes) and wraps every ``step`` in dynamo guards. This
class keeps the same state (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) and, where torch
has it (2.4+), calls the same fused kernel ``torch.optim.AdamW(fused=True)`` calls, so the
updates are bit-identical to it (``tests/test_train.py``). Older torch gets the same update
written with ``torch._foreach_*`` ops.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

_FUSED = hasattr(torch, "_fused_adamw_")


class AdamW:
    """Decoupled-weight-decay Adam over one group of parameters.

    Mirrors the parts of ``torch.optim.Optimizer`` the trainer uses: ``param_groups`` (one
    group; set ``group["lr"]`` to schedule), ``state[param]``, ``zero_grad`` and ``step``.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.01, eps: float = 1e-8):
        params = list(params)
        self.param_groups: list[dict[str, Any]] = [
            {"params": params, "lr": lr, "betas": tuple(betas), "weight_decay": weight_decay, "eps": eps}
        ]
        self.state: dict[Tensor, dict[str, Tensor]] = defaultdict(dict)  # as torch.optim's
        self._counts: list[Tensor] = []       # the step counts handed to the kernel (views of one tensor)
        self._counts_base: Tensor | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        s = self.state[p]
        if not s:
            # As torch.optim.AdamW(fused=True) starts it: a float32 step count on the device.
            s.update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                     exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                     exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
        return s

    def _step_counts(self, states: list[dict[str, Tensor]]) -> list[Tensor]:
        """The parameters' float32 step counts as views of one tensor, so that one ``add_``
        advances them all (``torch._foreach_add_`` on a dozen scalar tensors took ~40 µs, 2% of
        a ``max`` step). Rebuilt, values kept, when the set of counts changes (first step,
        loaded state, a parameter without a gradient)."""
        steps = [s["step"] for s in states]
        if len(steps) != len(self._counts) or any(a is not b for a, b in zip(steps, self._counts)):
            self._counts_base = torch.stack(steps)
            self._counts = list(self._counts_base.unbind())
            for s, count in zip(states, self._counts):
                s["step"] = count
        return self._counts

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        params = [p for p in g["params"] if p.grad is not None]
        if not params:
            return
        states = [self._state(p) for p in params]
        grads = [p.grad for p in params]
        steps = self._step_counts(states)
        m = [s["exp_avg"] for s in states]
        v = [s["exp_avg_sq"] for s in states]
        (b1, b2), lr, wd, eps = g["betas"], g["lr"], g["weight_decay"], g["eps"]
        self._counts_base.add_(1)                                   # every count in steps
        if _FUSED:
            torch._fused_adamw_(params, grads, m, v, [], steps, lr=lr, beta1=b1, beta2=b2, weight_decay=wd,
                                eps=eps, amsgrad=False, maximize=False, grad_scale=None, found_inf=None)
            return
        torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, 1 - b2)
        for p, mi, vi, t in zip(params, m, v, steps):
            n = float(t)
            denom = (vi.sqrt() / math.sqrt(1 - b2**n)).add_(eps)
            p.addcdiv_(mi, denom, value=-lr / (1 - b1**n))
