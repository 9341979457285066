"""qkov: train small transformers on algorithmic tasks and read their QK and OV circuits."""

__version__ = "0.1.0"

from . import circuits
from .config import ModelConfig, TrainConfig
from .errors import QkovError
from .model import Transformer
from .store import load, load_run
from .tasks import Task, get_task
from .train import Run, resume, train

__all__ = [
    "ModelConfig", "QkovError", "Run", "Task", "TrainConfig", "Transformer",
    "circuits", "get_task", "load", "load_run", "resume", "train",
]
