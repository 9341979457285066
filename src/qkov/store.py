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

import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import memory
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


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
    errno.EISDIR: "a folder is in the way where a file should be: remove it or choose another name",
    errno.ENOTDIR: "a file is in the way where a folder should be: remove it or choose another path",
    errno.EEXIST: "a file is in the way where a folder should be: remove it or choose another path",
    errno.ENOENT: "a folder on the way cannot be created: choose a path in a folder that exists",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def os_error(path: str | Path, e: OSError, doing: str = "write") -> QkovError:
    """A one-line QkovError for an OS error while writing ``path``: what failed and what to do.
    Files written before are untouched (every write is atomic)."""
    fix = _OS_FIXES.get(e.errno, "choose another path")
    return QkovError(f"cannot {doing} {path} ({e.strerror or e}); {fix} (files already written are intact)")


def ensure_dir(path: str | Path) -> Path:
    """``path`` as a folder, made with its parents when missing; an OS failure is a one-line QkovError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(path, e, "create the folder") from None
    if not path.is_dir():
        raise QkovError(f"{path} is a file, not a folder; remove it or choose another path")
    return path


def check_writable(path: str | Path) -> Path:
    """Fail now, with the line :func:`atomic_write_bytes` would give later, when ``path`` cannot
    be written (its folder cannot be made or written to, or a folder is in the way): a command
    checks its output paths before its work."""
    path = Path(path)
    if path.is_dir():
        raise os_error(path, IsADirectoryError(errno.EISDIR, "Is a directory"))
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".qkov-check.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise os_error(path, e) from None
    os.close(fd)
    os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Every file qkov writes goes through here: an OS error (a missing or unwritable folder, a full
    or read-only disk, a folder where the file should be) is a one-line QkovError naming the
    path, and the file that was there before, if any, is left as it was.
    """
    path = Path(path)
    ensure_dir(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(e, OSError):
            raise os_error(path, e) from None
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
    except (TypeError, KeyError, AttributeError, ValueError, OverflowError) as e:
        raise QkovError(f"{f} holds a malformed config ({str(e)[:200]}); retrain the run") from None
    seed = d.get("seed", 0)
    if type(seed) is not int or not 0 <= seed < 2**63:
        raise QkovError(f"{f} has seed={str(seed)[:40]!r}; expected an integer >= 0: it was edited, retrain the run")
    extra = {k: v for k, v in d.items() if k not in ("task", "model", "train", "seed", "qkov_version")}
    return RunConfig(task, model, train, seed, extra)


# ----------------------------------------------------------------- weights
_HEADER_LIMIT = 100_000_000  # bytes of JSON header a qkov file could plausibly have
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def tensor_header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a safetensors file, from its header alone (no tensor is read), after
    checking that the header is well-formed and that its sizes add up to the file's."""
    path = Path(path)
    bad = f"{path} is not a readable safetensors file"
    fix = "it is truncated or damaged: retrain, or resume from a checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 1 < n <= min(size - 8, _HEADER_LIMIT):
                raise QkovError(f"{bad} (its header claims {n:,} bytes of {size:,}); {fix}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise QkovError(f"cannot read {path} ({e.strerror or e}); check the path and its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QkovError(f"{bad} (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise QkovError(f"{bad} (its header is not a JSON object); {fix}")
    shapes, data = {}, size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, (start, end) = tuple(info["shape"]), info["data_offsets"]
            ok = all(type(x) is int and x >= 0 for x in (*shape, start, end)) and start <= end <= data
            count = 1
            for x in shape:
                count *= x
            ok = ok and count * _ITEMSIZE[info["dtype"]] == end - start
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise QkovError(f"{bad} (its header's entry for {name!r} does not fit the file); {fix}")
        shapes[name] = shape
    return shapes


def expected_shapes(cfg: ModelConfig, what: str = "config.json's model") -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a ``Transformer(cfg)``'s saved tensors, without allocating them (the
    model is built on torch's meta device, after :func:`qkov.memory.check_fits` says it fits)."""
    memory.check_fits(cfg, what=what, fix="config.json was edited, or the run needs a machine with more memory")
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model_tensors(model).items()}


def check_shapes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """A one-line QkovError unless ``shapes`` (a file's tensors) are what config.json's model needs."""
    expected = expected_shapes(cfg, what=f"config.json's model (for {source})")
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise QkovError(
            f"{source} does not match config.json's model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            f"the files come from different runs or were edited"
        )
    for k, shape in shapes.items():
        if tuple(shape) != expected[k]:
            raise QkovError(
                f"{source}: {k} has shape {tuple(shape)} but config.json's model needs {expected[k]}; "
                f"the files come from different runs or were edited"
            )


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> Transformer:
    """A model for ``cfg`` holding ``tensors``, after checking their names, shapes and dtypes
    (and that the model fits in memory) before anything is allocated."""
    check_shapes(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, source)
    wrong = next((k for k, v in tensors.items() if v.dtype != torch.float32), None)
    if wrong is not None:
        raise QkovError(f"{source}: {wrong} is {tensors[wrong].dtype}, not float32; "
                        f"the file was not written by qkov or was edited")
    model = Transformer(cfg)
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
    check_shapes(rc.model, tensor_header(f), str(f))  # an edited config never drives an allocation
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
    try:
        text = f.read_text()
    except UnicodeDecodeError:
        raise QkovError(f"{f} is not UTF-8 text; it was damaged: retrain the run, or delete it") from None
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise QkovError(f"{f} has a line that is not JSON; it was edited or truncated") from None
            if not _is_eval_row(row):
                raise QkovError(f"{f} has a line that is not an evaluation (a JSON object with an integer step, "
                                f"numbers for accuracy and loss); it was edited: retrain the run")
            rows.append(row)
    return rows


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_eval_row(row: Any) -> bool:
    """Whether a metrics.jsonl line has what readers of it take: an integer step, numbers for
    accuracy and loss (and elapsed_s, when there), and groups (by_length, by_position) of accuracy, loss, n."""
    if not isinstance(row, dict) or type(row.get("step")) is not int:
        return False
    if not all(_is_number(row.get(k)) for k in ("accuracy", "loss")):
        return False
    if "elapsed_s" in row and not _is_number(row["elapsed_s"]):
        return False
    groups = [row[k] for k in ("by_length", "by_position") if k in row]
    return all(isinstance(g, dict) and all(isinstance(m, dict) and all(_is_number(m.get(k)) for k in
                                                                        ("accuracy", "loss", "n"))
                                           for m in g.values()) for g in groups)


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
    expected = expected_shapes(cfg)
    first = None
    for step, f in files:
        source = f"{f.parent.name}/{f.name}"
        tensors, _ = load_tensors(f, "checkpoint")
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
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


@contextmanager
def run_lock(path: str | Path, create: bool = True) -> Iterator[Path]:
    """Hold the run directory ``path`` (made when missing and ``create``) for one writer: an
    exclusive ``flock`` on the folder itself, so no file is added to it and the lock goes when
    the process does. A second writer gets a one-line QkovError at once.

    >>> import tempfile
    >>> with run_lock(tempfile.mkdtemp() + "/run") as held:
    ...     with run_lock(held):
    ...         pass
    Traceback (most recent call last):
    ...
    qkov.errors.QkovError: another qkov process is writing ...
    """
    if not create and not Path(path).is_dir():
        read_config(path)  # the one-line error for a missing run directory
    path = ensure_dir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise os_error(path, e, "open the folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise QkovError(f"another qkov process is writing {path}; wait for it to finish, "
                            f"or pass another --out") from None
        for stale in [*path.glob(".*.tmp"), *(path / CHECKPOINTS).glob(".*.tmp")]:
            stale.unlink(missing_ok=True)  # a killed writer's temporaries: no one else writes here now
        yield path
    finally:
        os.close(fd)


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
    rng = tensors["rng"]
    if rng.dtype != torch.uint8 or rng.shape != torch.Generator().get_state().shape:
        raise QkovError(f"{f}: its RNG state is {rng.dtype} of shape {tuple(rng.shape)}, not a generator's state; "
                        f"it was edited: {fix}")
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
        want = () if key == "step" else tuple(params[name].shape)
        if tuple(v.shape) != want:
            raise QkovError(f"{f}: {k} has shape {tuple(v.shape)} but {name} has {want}; "
                            f"the files come from different runs or were edited")
        if v.dtype != torch.float32:
            raise QkovError(f"{f}: {k} is {v.dtype}, not float32; it was not written by qkov or was edited")
        optimizer_state.setdefault(name, {})[key] = v
    return TrainState(int(step), model, optimizer_state, tensors["rng"])
