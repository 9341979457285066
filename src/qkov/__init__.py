"""qkov: train small transformers on algorithmic tasks and read their QK and OV circuits."""

from . import circuits, edges, interventions, patching
from ._version import __version__ as __version__  # written once, in _version.py
from .analyze import Summary, analyze
from .certify import certify
from .config import ModelConfig, TrainConfig
from .errors import QkovError
from .interop import from_transformer_lens, to_transformer_lens
from .model import Transformer
from .show import show
from .store import Run, load, load_run
from .sweep import sweep
from .tasks import Task, get_task
from .train import resume, train


def __getattr__(name: str):
    # The report pulls in plotly; load it only when asked for.
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(f"module 'qkov' has no attribute {name!r}")


__all__ = [
    "ModelConfig", "QkovError", "Run", "Summary", "Task", "TrainConfig", "Transformer",
    "analyze", "certify", "circuits", "edges", "from_transformer_lens", "get_task", "interventions", "load",
    "load_run", "patching", "resume", "show",
    "sweep", "to_transformer_lens", "train", "write_report",
]
