"""Run directories: config.json, model.safetensors, metrics.jsonl, checkpoints/, written atomically.

Layout of a run directory::

    config.json                  task, model and train configs, seed, qkov version, weights hash
    model.safetensors            final weights (TransformerLens state-dict names)
    metrics.jsonl                one JSON object per evaluation
    checkpoints/step_{N}.safetensors   weights every ``checkpoint_every`` steps
    train_state.safetensors      weights + optimizer + RNG state of the newest checkpoint, for --resume
    summary.json                 qkov.analyze's summary (a sweep writes it beside each finished run)
    sweep.json                   a sweep's record of the run: status, error, attempts, timings

Every file is written to a temporary name and renamed into place, so an interrupted run never
leaves a file that fails to load. Nothing is ever unpickled: tensors load through safetensors.

This is the only module that touches these files (and the only one that imports safetensors):
the trainer saves through :func:`save_checkpoint`, :func:`save_train_state` and
:func:`save_final`; readers get a :class:`Run` from :func:`load_run`, ``(step, model)`` pairs
from :func:`checkpoints` and a :class:`TrainState` from :func:`load_train_state`. Every damaged,
missing or mismatched file is a one-line ``QkovError`` that says how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
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
SUMMARY = "summary.json"          # qkov.analyze's summary of the finished run (as `qkov analyze --json`)
SWEEP_RECORD = "sweep.json"       # a sweep's record of the run: status, error, attempts, timings


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
    """Save tensors as safetensors atomically; returns the file's sha256.

    Tensors that share storage with one saved before them (views of one tensor, such as the
    optimizer's step counts) are saved as copies: safetensors refuses shared memory. Tensors on
    another device are copied to the CPU first; files always load onto the CPU.
    """
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    data = st_save(out, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(
    path: str | Path, what: str = "weights", fix: str = "retrain, or resume from a checkpoint"
) -> tuple[dict[str, torch.Tensor], bytes]:
    """The tensors of a safetensors file and its bytes; a QkovError ending in ``fix`` when the
    file is missing, truncated or damaged."""
    path = Path(path)
    if not path.is_file():
        raise QkovError(f"{path} does not exist; expected the {what} file of a qkov run")
    data = path.read_bytes()
    try:
        return st_load(data), data
    except (SafetensorError, Exception) as e:  # truncated or corrupt files
        raise QkovError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
            f"it is truncated or damaged: {fix}"
        ) from None


def tensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file's bytes (already loaded once, so
    well-formed): an 8-byte little-endian header length, then the JSON header."""
    n = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})


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

    def same_setup(self, other: RunConfig) -> bool:
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
class Run:
    """A trained model with the configs that made it and its eval history.

    What :func:`qkov.train` returns and :func:`load_run` reads back: ``model`` (a
    ``Transformer``), ``config`` (the :class:`RunConfig`: task, model and train configs, seed),
    ``metrics`` (one dict per evaluation, as in ``metrics.jsonl``) and ``path``, the run
    directory (None for a run kept in memory).
    """

    model: Transformer
    config: RunConfig
    metrics: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None

    @property
    def task(self) -> Task:
        """The task the run was trained on, with its parameters (``run.task.evaluate(run.model)``)."""
        return self.config.task

    @property
    def final(self) -> dict[str, Any]:
        """The last eval's metrics ({} before the first eval)."""
        return self.metrics[-1] if self.metrics else {}

    def checkpoints(self) -> Iterator[tuple[int, Transformer]] | None:
        """The run's ``(step, model)`` checkpoints (:func:`checkpoints`), or None for a run kept
        in memory or saved without any: what ``analyze(..., checkpoints=...)`` takes."""
        if self.path is None or not checkpoint_paths(self.path):
            return None
        return checkpoints(self.path, self.config.model)


def load_run(path: str | Path) -> Run:
    """The finished run in ``path``: final model (in eval mode), configs and metrics."""
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
    return Run(model, rc, read_metrics(path), path)


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
    """One checkpoint file's model, built for ``cfg`` (in eval mode)."""
    tensors, _ = load_tensors(file, "checkpoint")
    model = build_model(cfg, tensors, str(file))
    model.eval()
    return model


def checkpoints(path: str | Path, model_config: ModelConfig | None = None) -> Iterator[tuple[int, Transformer]]:
    """``(step, model)`` for every checkpoint of the run in ``path``, in step order.

    Models are built for ``model_config`` (config.json's model unless given), one fresh
    ``Transformer`` per checkpoint (in eval mode), so the pairs can be kept. Files are read one
    at a time as the iterator advances. Raises a QkovError now when the run has no checkpoints,
    and while iterating when a checkpoint is damaged or has another architecture.

    >>> import qkov, tempfile
    >>> task = qkov.get_task("max")
    >>> run = qkov.train(task, out=tempfile.mkdtemp() + "/run", quiet=True,
    ...                  train_config=task.train_config().replace(steps=4, checkpoint_every=2, eval_every=2))
    >>> [step for step, model in checkpoints(run.path)]
    [0, 2, 4]
    """
    cfg = model_config if model_config is not None else read_config(path).model
    files = checkpoint_paths(path)
    if not files:
        raise QkovError(
            f"{Path(path) / CHECKPOINTS} holds no step_N.safetensors checkpoints; train with checkpoints, "
            f"e.g. qkov train modadd --set checkpoint_every=1000"
        )
    return _read_checkpoints(files, cfg)


def _read_checkpoints(files: list[tuple[int, Path]], cfg: ModelConfig) -> Iterator[tuple[int, Transformer]]:
    expected = {k: v.shape for k, v in model_tensors(Transformer(cfg)).items()}
    first = None
    for step, f in files:
        source = f"{f.parent.name}/{f.name}"
        tensors, _ = load_tensors(f, "checkpoint")
        shapes = {k: v.shape for k, v in tensors.items()}
        if shapes != expected:
            k = (sorted(set(shapes) ^ set(expected)) or [k for k in expected if shapes[k] != expected[k]])[0]
            seen = f"{k} {tuple(shapes[k])}" if k in shapes else f"no {k}"
            want = f"{tuple(expected[k])}" if k in expected else "no such tensor"
            if first is None:
                raise QkovError(
                    f"{source} has {seen} but the model config needs {want}; "
                    f"the checkpoints come from another run or config.json was edited"
                )
            raise QkovError(
                f"checkpoints mix architectures: {source} has {seen} but the model config needs {want} "
                f"(the first checkpoint, {first}, matches it); keep one run's checkpoints per folder"
            )
        first = first or source
        model = build_model(cfg, tensors, source)
        model.eval()
        yield step, model


def save_checkpoint(path: str | Path, step: int, model: torch.nn.Module) -> None:
    """Save ``model``'s weights as ``checkpoints/step_{step}.safetensors`` (metadata: step)."""
    save_tensors(Path(path) / CHECKPOINTS / f"step_{step}.safetensors", model_tensors(model), {"step": str(step)})


def save_final(path: str | Path, rc: RunConfig, model: torch.nn.Module, steps_done: int) -> str:
    """Save the finished run's weights as ``model.safetensors`` and record their sha256 and
    ``steps_done`` in ``rc.extra`` and config.json (which :func:`load_run` checks); returns the sha256."""
    digest = save_tensors(Path(path) / MODEL, model_tensors(model))
    rc.extra["model_sha256"] = digest
    rc.extra["steps_done"] = steps_done
    write_config(path, rc)
    return digest


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a run's ``config.json`` (finished or not)."""
    return (Path(path) / CONFIG).is_file()


def is_finished(path: str | Path) -> bool:
    """Whether the run in ``path`` has finished (its final ``model.safetensors`` is written)."""
    return (Path(path) / MODEL).is_file()


def load_final(path: str | Path) -> Transformer | None:
    """The finished run's model as :func:`load` reads it; None while ``model.safetensors`` does
    not exist yet (the run has not finished)."""
    return load(path) if is_finished(path) else None


def clear_outputs(path: str | Path) -> None:
    """Delete what training writes in ``path`` (model, training state, metrics, checkpoints),
    keeping config.json: the same setup is being trained again from scratch."""
    for _, f in checkpoint_paths(path):
        f.unlink()
    for name in (MODEL, TRAIN_STATE, METRICS, SUMMARY, SWEEP_RECORD):  # the old run's summary is stale
        (Path(path) / name).unlink(missing_ok=True)


# ----------------------------------------------------------------- summary and sweep record
def _save_json(path: str | Path, name: str, obj: dict[str, Any]) -> None:
    atomic_write_text(Path(path) / name, json.dumps(obj, indent=2) + "\n")


def _load_json(path: str | Path, name: str) -> dict[str, Any] | None:
    f = Path(path) / name
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QkovError(f"{f} is not valid JSON ({e}); it was edited: delete it and run the sweep again") from None
    if not isinstance(d, dict):
        raise QkovError(f"{f} does not hold a JSON object; it was edited: delete it and run the sweep again")
    return d


def save_summary(path: str | Path, summary: dict[str, Any]) -> None:
    """Save ``qkov.analyze``'s summary (``Summary.to_dict()``) beside the run as ``summary.json``."""
    _save_json(path, SUMMARY, summary)


def load_summary(path: str | Path) -> dict[str, Any] | None:
    """The run's saved ``summary.json`` (see :func:`save_summary`), or None when it has none."""
    return _load_json(path, SUMMARY)


def save_sweep_record(path: str | Path, record: dict[str, Any]) -> None:
    """Save a sweep's record of the run (``sweep.json``: status, error, attempts, timings)."""
    _save_json(path, SWEEP_RECORD, record)


def load_sweep_record(path: str | Path) -> dict[str, Any] | None:
    """The run's ``sweep.json`` (see :func:`save_sweep_record`), or None when it has none."""
    return _load_json(path, SWEEP_RECORD)


def run_files(path: str | Path) -> dict[str, bytes]:
    """Every file of the run in ``path`` as ``{relative path: bytes}``, for :func:`write_run_files`
    to write elsewhere (a sweep's Ray task ships its run to the driver this way)."""
    root = Path(path)
    return {f.relative_to(root).as_posix(): f.read_bytes()
            for f in sorted(root.rglob("*")) if f.is_file() and not f.name.endswith(".tmp")}


def write_run_files(path: str | Path, files: dict[str, bytes]) -> None:
    """Write a run's files (from :func:`run_files`) into ``path``, each atomically, after deleting
    what an earlier attempt left there: config.json first (the folder is a run directory from then
    on), ``sweep.json`` last (a run that has it is complete)."""
    root = Path(path)
    for name in files:
        if name.startswith("/") or ".." in Path(name).parts:
            raise QkovError(f"refusing to write {name!r} outside the run directory {root}")
    if is_run_dir(root):
        clear_outputs(root)
    for name in sorted(files, key=lambda n: (n == SWEEP_RECORD, n != CONFIG, n)):
        atomic_write_bytes(root / name, files[name])


# ----------------------------------------------------------------- training state
@dataclass
class TrainState:
    """What ``train_state.safetensors`` holds to resume a run bit-exactly.

    ``model``: the weights, built for the run's model config (in training mode);
    ``optimizer_state``: parameter name -> that parameter's optimizer tensors (``step``,
    ``exp_avg``, ``exp_avg_sq`` for AdamW); ``rng_state``: the batch generator's
    ``torch.Generator.get_state()``; ``step``: the steps completed.
    """

    step: int
    model: Transformer
    optimizer_state: dict[str, dict[str, torch.Tensor]]
    rng_state: torch.Tensor


def save_train_state(
    path: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer_state: dict[str, dict[str, torch.Tensor]],
    rng_state: torch.Tensor,
) -> None:
    """Save ``train_state.safetensors``: ``model.<name>`` weights, ``optim.<param>.<key>``
    optimizer tensors, ``rng`` and the step (metadata). Tensors that share storage are copied."""
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    for name, state in optimizer_state.items():
        for key, v in state.items():
            tensors[f"optim.{name}.{key}"] = torch.as_tensor(v)
    tensors["rng"] = rng_state
    save_tensors(Path(path) / TRAIN_STATE, tensors, {"step": str(step)})


def load_train_state(path: str | Path, model_config: ModelConfig) -> TrainState:
    """The training state saved in ``path``, checked against ``model_config``.

    Raises a one-line QkovError when the file is missing, truncated, or does not match the
    model (weights, optimizer tensors of parameters it lacks or of another shape).
    """
    f = Path(path) / TRAIN_STATE
    if not f.is_file():
        raise QkovError(
            f"{path} has no {TRAIN_STATE} to resume from (the run saved no checkpoint); "
            f"retrain it, with --set checkpoint_every=N to make it resumable"
        )
    fix = "retrain the run (checkpoints/ keep its weights but not the optimizer state needed to resume)"
    tensors, data = load_tensors(f, "training state", fix=fix)
    step = tensors_metadata(data).get("step", "")
    if not step.isdigit() or "rng" not in tensors:
        raise QkovError(f"{f} lacks its step or RNG state; it was not written by qkov or was edited: {fix}")
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model = build_model(model_config, weights, str(f))
    params = dict(model.named_parameters())
    optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if not k.startswith("optim."):
            continue
        name, key = k[len("optim."):].rsplit(".", 1)
        if name not in params:
            raise QkovError(f"{f} holds optimizer state for {name}, which the model does not have; "
                            f"the files come from different runs or were edited")
        if v.ndim and v.shape != params[name].shape:
            raise QkovError(f"{f}: {k} has shape {tuple(v.shape)} but {name} has {tuple(params[name].shape)}; "
                            f"the files come from different runs or were edited")
        optimizer_state.setdefault(name, {})[key] = v
    return TrainState(int(step), model, optimizer_state, tensors["rng"])
