"""The algorithmic tasks, their reference configs (model + training) and how to score them.

Every task turns a ``torch.Generator`` (or its own split seed, for finite data sets) into
batches of ``tokens [batch, pos]`` with ``targets [batch, pos]`` (-100 where no loss is read)
and a ``scored [batch, pos]`` mask of the positions that accuracy is measured on.

| task | reference setup |
| ---- | --------------- |
| max | ints 0..63, lengths 2..6, predict the max at the last position; 1 layer, 1 head, attention-only, d_model 32 |
| min | as max, the minimum |
| sort, reverse | 2..10 ints 0..63, '|', the list sorted (reversed), scored at every output position |
| histogram | the list, '|', the list again; at each token of the copy, how often it occurs |
| add | a + b with a + b <= 127, predicted at the second position; 1 layer, 1 head, d_model 128, d_mlp 128 |
| fib | x1..x5 with x(i+1) = x(i) + x(i-1) <= 127, each next element from the two before; same model as add |
| modadd | [a, b, =] -> (a + b) mod 113, 30% train split, Nanda et al.'s grokking setup |
| induction | random tokens with a segment that recurs at a varying offset; 2 layers, attention-only |
| brackets | up to 40 brackets, [start] s [end] padded; balanced or not, read at [start]; 3 layers, bidirectional |
"""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig, TrainConfig
from ..errors import QkovError
from .arithmetic import AddTask, FibTask, MaxTask, ModAddTask
from .base import IGNORE, Batch, FiniteTask, Scorer, Task, as_index, as_scorer, breakdowns, nll_and_prediction
from .brackets import BracketsTask
from .induction import InductionTask
from .lists import HistogramTask, MinTask, ReverseTask, SortTask
from .loading import load_class, resolve, source_of

__all__ = [
    "IGNORE", "Batch", "Task", "FiniteTask", "MaxTask", "MinTask", "AddTask", "FibTask", "ModAddTask", "InductionTask",
    "BracketsTask", "breakdowns",
    "TASKS", "get_task", "resolve", "source_of",
    "task_from_dict", "configure", "Scorer", "as_scorer", "as_index", "nll_and_prediction",
]

TASKS: dict[str, type[Task]] = {t.name: t for t in (
    MaxTask, MinTask, AddTask, FibTask, ModAddTask, InductionTask, SortTask, ReverseTask, HistogramTask, BracketsTask)}


def get_task(name: str | Task, **overrides: Any) -> Task:
    """A task by name with its reference defaults; keyword arguments override its parameters.

    >>> get_task("max").max_len
    6
    >>> get_task("modadd", p=23).model_config().d_vocab
    24
    """
    if isinstance(name, Task):
        return type(name)(**{**name.params, **overrides})
    if not isinstance(name, str):
        raise QkovError(f"task {name!r} is {type(name).__name__}; pass a task name, module:Class or ./file.py:Class")
    return resolve(name)(**overrides)


def task_from_dict(d: dict[str, Any]) -> Task:
    """The task ``config.json`` stores (``Task.to_dict``): found by its ``source`` when it is not
    built in, then built with its parameters.

    >>> task_from_dict({"name": "max", "vocab": 10, "min_len": 2, "max_len": 4}).max_len
    4
    """
    d = dict(d)
    name, source = d.pop("name"), d.pop("source", None)
    return load_class(name, source)(**d)


def configure(
    task: str | Task, sets: dict[str, Any] | None = None, steps: int | None = None
) -> tuple[Task, ModelConfig, TrainConfig]:
    """Task, model config and train config for ``task`` with ``key=value`` overrides applied.

    A key names a task parameter, a ModelConfig field or a TrainConfig field (looked up in that
    order; prefix it with ``task.``, ``model.`` or ``train.`` to be explicit). String values are
    parsed to the field's type, as ``qkov train --set`` passes them. Task parameters are applied
    first, so e.g. ``p=23`` resizes the model's vocabulary before model fields are set.

    >>> task, model_cfg, train_cfg = configure("modadd", {"p": "23", "lr": "3e-3"})
    >>> model_cfg.d_vocab, train_cfg.lr
    (24, 0.003)
    """
    from ..config import parse_value

    base = get_task(task)
    task_sets: dict[str, Any] = {}
    model_sets: dict[str, Any] = {}
    train_sets: dict[str, Any] = {}
    model_fields = ModelConfig().to_dict()
    train_fields = TrainConfig().to_dict()
    train_fields["betas"] = tuple(train_fields["betas"])
    for raw_key, value in (sets or {}).items():
        scope, _, key = raw_key.rpartition(".")
        if scope not in ("", "task", "model", "train"):
            raise QkovError(f"unknown key prefix '{scope}.' in '{raw_key}'; use task., model. or train.")
        if scope in ("", "task") and key in base.defaults:
            target, current = task_sets, base.params[key]
        elif scope in ("", "model") and key in model_fields:
            target, current = model_sets, model_fields[key]
        elif scope in ("", "train") and key in train_fields:
            target, current = train_sets, train_fields[key]
        else:
            known = sorted(base.defaults) + sorted(model_fields) + sorted(train_fields)
            raise QkovError(f"unknown key '{raw_key}' for task '{base.name}'; known keys: {', '.join(known)}")
        target[key] = parse_value(value, current, raw_key) if isinstance(value, str) else value
    task_obj = get_task(base, **task_sets)
    model_cfg = task_obj.model_config().replace(**model_sets)
    train_cfg = task_obj.train_config().replace(**train_sets)
    if steps is not None:
        train_cfg = train_cfg.replace(steps=steps)
    task_obj.check_model(model_cfg)
    return task_obj, model_cfg, train_cfg
