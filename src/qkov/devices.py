"""Devices: a device name from a config, checked against this machine, and the device a model lives on.

``TrainConfig.device`` is spelled ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``
(:func:`qkov.config.check_device` checks the spelling); :func:`resolve_device` turns it into a
``torch.device`` that torch can use here, or says in one line why it cannot. ``auto`` picks
cuda if torch sees a GPU, else mps, else cpu. :func:`model_device` is where a model's inputs
go: the device of its token embedding (qkov or TransformerLens).

>>> resolve_device("cpu")
device(type='cpu')
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .config import check_device
from .errors import QkovError


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` that ``name`` means on this machine; a QkovError if it has none.

    ``cuda`` comes back with its index (``cuda:0``, torch's current device), so it compares
    equal to the ``.device`` of tensors placed there.
    """
    name = check_device(name)
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps", 0)
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise QkovError(
                f"device=mps was asked for, but torch sees no Apple MPS device here ({_build()}); "
                f"pass --set device=cpu or device=auto"
            )
        return torch.device("mps", 0)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise QkovError(
            f"device={name} was asked for, but torch sees no CUDA GPU here ({_build()}); "
            f"pass --set device=cpu or device=auto"
        )
    device = torch.device(name)
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= n:
        raise QkovError(
            f"device={name} was asked for, but torch sees {n} CUDA GPU{'s' if n > 1 else ''} here "
            f"(cuda:0..cuda:{n - 1}); pass --set device=cuda:{n - 1} or lower, or device=auto"
        )
    return device


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s token embedding ``W_E``: where its input tokens must go.

    Works for a ``qkov.Transformer``, a TransformerLens model and a ``circuits.Weights``;
    for anything else, the device of its first parameter (cpu when it has none).
    """
    W_E = getattr(model, "W_E", None)
    if isinstance(W_E, Tensor):
        return W_E.device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _build() -> str:
    """What torch was built for, e.g. ``torch 2.3.0+cpu, CPU build``."""
    if torch.version.cuda:
        kind = f"built for CUDA {torch.version.cuda}, but no GPU or driver is visible"
    elif getattr(torch.version, "hip", None):
        kind = f"built for ROCm {torch.version.hip}, but no GPU is visible"
    else:
        kind = "CPU build"
    return f"torch {torch.__version__}, {kind}"
