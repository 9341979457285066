"""Run directories: config.json, model.safetensors, metrics.jsonl, checkpoints/, written atomically.

Layout of a run directory::

    config.json                  task, model and train configs, seed, qkov version, weights hash
    model.safetensors            final weights (TransformerLens state-dict names)
    metrics.jsonl                one JSON object per evaluation
    checkpoints/step_{N}.safetensors   weights every ``checkpoint_every`` steps
    train_state.safetensors      weights + optimizer + RNG state of the newest checkpoint, for --resume

Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a file that fails to load. Nothing is ever unpickled: tensors load through safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import ModelConfig, TrainConfig
from .errors import QkovError
from .model import Transformer
from .tasks import Task, task_from_dict

CONFIG = "config.json"
MODEL = "model.safetensors"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TRAIN_STATE = "train_state.safetensors"


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------- atomic writes
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save tensors as safetensors atomically; returns the file's sha256."""
    data = st_save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: str | Path, what: str = "weights") -> tuple[dict[str, torch.Tensor], bytes]:
    path = Path(path)
    if not path.is_file():
        raise QkovError(f"{path} does not exist; expected the {what} file of a qkov run")
    data = path.read_bytes()
    try:
        return st_load(data), data
    except (SafetensorError, Exception) as e:  # truncated or corrupt files
        raise QkovError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
            f"it is truncated or damaged: retrain, or resume from a checkpoint"
        ) from None


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters (TransformerLens names), without the constant mask buffers."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith((".mask", ".IGNORE"))}


# ----------------------------------------------------------------- config.json
@dataclass
class RunConfig:
    task: Task
    model: ModelConfig
    train: TrainConfig
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "qkov_version": _version(),
            "task": self.task.to_dict(),
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "seed": self.seed,
            **self.extra,
        }

    def same_setup(self, other: "RunConfig") -> bool:
        """Same task, model, training config and seed (versions and hashes aside)."""
        keys = ("task", "model", "train", "seed")
        a, b = self.to_dict(), other.to_dict()
        return all(a[k] == b[k] for k in keys)


def write_config(path: str | Path, rc: RunConfig) -> None:
    atomic_write_text(Path(path) / CONFIG, json.dumps(rc.to_dict(), indent=2) + "\n")


def read_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.exists():
        raise QkovError(f"run directory {path} does not exist; train one with: qkov train TASK --out {path}")
    f = path / CONFIG
    if not f.is_file():
        raise QkovError(f"{f} is missing; {path} is not a qkov run directory (expected config.json, model.safetensors)")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QkovError(f"{f} is not valid JSON ({e}); it is truncated or was edited: retrain the run") from None
    if not isinstance(d, dict) or not {"task", "model", "train"} <= set(d):
        raise QkovError(f"{f} lacks the task, model or train section; it was not written by qkov or was edited")
    try:
        task = task_from_dict(d["task"])
        model = ModelConfig.from_dict(d["model"])
        train = TrainConfig.from_dict(d["train"])
    except QkovError as e:
        raise QkovError(f"{f}: {e}") from None
    except (TypeError, KeyError, AttributeError) as e:
        raise QkovError(f"{f} holds a malformed config ({e}); retrain the run") from None
    extra = {k: v for k, v in d.items() if k not in ("task", "model", "train", "seed", "qkov_version")}
    return RunConfig(task, model, train, int(d.get("seed", 0)), extra)


# ----------------------------------------------------------------- weights
def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> Transformer:
    model = Transformer(cfg)
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise QkovError(
            f"{source} does not match config.json's model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            f"the files come from different runs or were edited"
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise QkovError(
                f"{source}: {k} has shape {tuple(v.shape)} but config.json's model needs {tuple(expected[k].shape)}; "
                f"the files come from different runs or were edited"
            )
    model.load_state_dict(tensors, strict=False)
    model.freeze_biases_if_unused()
    return model


def load(path: str | Path) -> Transformer:
    """Load a trained model from a run directory (safetensors only; never unpickles).

    Raises QkovError when config.json or model.safetensors is missing, truncated or altered.
    """
    return load_run(path).model


@dataclass
class LoadedRun:
    path: Path
    config: RunConfig
    model: Transformer
    metrics: list[dict[str, Any]]

    @property
    def task(self) -> Task:
        return self.config.task


def load_run(path: str | Path) -> LoadedRun:
    path = Path(path)
    rc = read_config(path)
    f = path / MODEL
    if not f.is_file():
        hint = "resume it with: qkov train --resume " + str(path) if (path / TRAIN_STATE).is_file() else "retrain it"
        raise QkovError(f"{f} is missing: the run did not finish; {hint}")
    tensors, data = load_tensors(f)
    want = rc.extra.get("model_sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise QkovError(
            f"{f} does not match the sha256 recorded in config.json; it was modified after training "
            f"or belongs to another run: retrain, or copy the matching files"
        )
    model = build_model(rc.model, tensors, str(f))
    model.eval()
    return LoadedRun(path, rc, model, read_metrics(path))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    f = Path(path) / METRICS
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise QkovError(f"{f} has a line that is not JSON; it was edited or truncated") from None
    return rows


def write_metrics(path: str | Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(Path(path) / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def checkpoint_paths(path: str | Path) -> list[tuple[int, Path]]:
    """``(step, file)`` for every checkpoint of a run, in step order."""
    folder = Path(path) / CHECKPOINTS
    out = []
    if folder.is_dir():
        for f in folder.glob("step_*.safetensors"):
            try:
                out.append((int(f.stem.split("_", 1)[1]), f))
            except ValueError:
                continue
    return sorted(out)


def load_checkpoint(file: str | Path, cfg: ModelConfig) -> Transformer:
    tensors, _ = load_tensors(file, "checkpoint")
    return build_model(cfg, tensors, str(file))
