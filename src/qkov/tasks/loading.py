"""Finding a task class: a built-in name, an entry point, or an import path (``mod:Class``, ``./f.py:Class``).

A task that is not built in is found by one of:

- an entry point in the ``qkov.tasks`` group of an installed package (its ``pyproject.toml``:
  ``[project.entry-points."qkov.tasks"]`` then ``sort = "mypkg.tasks:SortTask"``), named by
  its entry point's name (``qkov train sort``);
- an import path ``package.module:ClassName`` (``qkov train mypkg.tasks:SortTask``);
- a file path ``./tasks.py:ClassName`` (``qkov train ./tasks.py:SortTask``).

:func:`source_of` writes how to find a class again; ``config.json`` stores it beside the task's
name and parameters, so a run of a task that is not built in loads in a new process.

>>> resolve("max").__name__
'MaxTask'
>>> resolve("qkov.tasks.arithmetic:MaxTask").__name__
'MaxTask'
>>> resolve("nosuch")
Traceback (most recent call last):
...
qkov.errors.QkovError: unknown task 'nosuch'. Known tasks: add, ...
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import QkovError

ENTRY_POINT_GROUP = "qkov.tasks"


def _builtins() -> dict[str, type]:
    from . import TASKS

    return TASKS


def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def resolve(spec: str) -> type:
    """The task class that ``spec`` names: a built-in name, an entry point's name, ``mod:Class``
    or ``path.py:Class``."""
    from .base import Task

    if spec in _builtins():
        return _builtins()[spec]
    if ":" not in spec:
        eps = _entry_points()
        if spec in eps:
            cls = _load_entry_point(spec, eps[spec])
        else:
            known = sorted(set(_builtins()) | set(eps))
            raise QkovError(f"unknown task '{spec}'. Known tasks: {', '.join(known)}. "
                            f"A task of your own: module:Class or ./file.py:Class.")
    else:
        where, _, attr = spec.rpartition(":")
        module = _load_file(where) if where.endswith(".py") or "/" in where else _import(where, spec)
        cls = getattr(module, attr, None)
        if cls is None:
            raise QkovError(f"task '{spec}': {where} has no '{attr}'; pass an existing Task subclass as {where}:NAME")
    if not (inspect.isclass(cls) and issubclass(cls, Task)):
        raise QkovError(f"task '{spec}' is {cls!r}, not a qkov.Task subclass; subclass qkov.Task")
    cls._qkov_source = _canonical(spec, cls)
    return cls


def _load_entry_point(name: str, ep) -> type:
    try:
        return ep.load()
    except Exception as e:  # noqa: BLE001 - any import failure is the package's; say which
        raise QkovError(f"task '{name}' (entry point {ep.value}) failed to import: {e}; "
                        f"reinstall its package") from None


def _import(module: str, spec: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise QkovError(f"task '{spec}': module '{e.name}' is not installed; pip install the package that "
                        f"provides {module}, or pass ./file.py:Class") from None


def _load_file(path: str):
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise QkovError(f"task file {path} does not exist; pass the task's file as ./file.py:Class")
    name = "qkov_task_file_" + "".join(c if c.isalnum() else "_" for c in str(file))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        del sys.modules[name]
        raise QkovError(f"task file {file} failed to run: {type(e).__name__}: {e}") from None
    module.__qkov_file__ = str(file)
    return module


def _canonical(spec: str, cls: type) -> str:
    """``spec`` with a file made absolute (a run must find it from any working directory)."""
    where, sep, attr = spec.rpartition(":")
    if sep and (where.endswith(".py") or "/" in where):
        return f"{Path(where).expanduser().resolve()}:{attr}"
    return spec


def source_of(cls: type) -> str | None:
    """How to find ``cls`` again (None: a built-in task, found by its name). A class loaded by
    :func:`resolve` keeps the spec it came from; another one is found by its module (a file's path
    when it was defined in a script run as ``__main__``)."""
    if _builtins().get(getattr(cls, "name", None)) is cls:
        return None
    if "_qkov_source" in cls.__dict__:
        return cls.__dict__["_qkov_source"]
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__qkov_file__", None) or (getattr(module, "__file__", None)
                                                     if cls.__module__ == "__main__" else None)
    if file:
        return f"{Path(file).resolve()}:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


def load_class(name: str, source: str | None) -> type:
    """The class a stored task names: its ``source`` when one was recorded, else its name; a
    task that cannot be found says in one line what to install or pass."""
    if source is None:
        return resolve(name)
    try:
        return resolve(source)
    except QkovError as e:
        if name in _entry_points():
            return resolve(name)
        raise QkovError(f"task '{name}' was trained from {source}, which cannot be loaded now ({e}); "
                        f"install its package or put the file back at that path") from None
