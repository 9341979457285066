"""A sweep's points: seeds and ``--set key=v1,v2`` value lists, their cartesian product, each
point's config hash and directory name, all checked before anything is written.

>>> points = plan("max", parse_seeds("0:2"), parse_grid(["max_len=4,5", "min_len=4"]))
>>> [p.name[:-11] for p in points]
['seed0000-max_len=4-min_len=4', 'seed0001-max_len=4-min_len=4', 'seed0000-max_len=5-min_len=4', \
'seed0001-max_len=5-min_len=4']
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import registry, store
from ..errors import QkovError
from ..store import RunConfig
from ..tasks import Task, configure
from ..train import check_setup

__all__ = ["Point", "check_sweep_dir", "parse_grid", "parse_seeds", "plan", "run_name"]

MAX_SEEDS = 1_000_000  # seeds in one sweep (a registry row and a run directory each)


def parse_seeds(text: str) -> list[int]:
    """``A:B`` (A..B-1), ``N``, or a comma-separated list of both.

    >>> parse_seeds("0:3,10")
    [0, 1, 2, 10]
    """
    seeds: list[int] = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", part)
        if not m:
            raise QkovError(f"--seeds {text!r} does not parse; expected A:B (seeds A..B-1), N, or a list, e.g. 0:151")
        a, b = int(m[1]), int(m[2]) if m[2] is not None else int(m[1]) + 1
        if b <= a:
            raise QkovError(f"--seeds {part.strip()} is an empty range; expected A:B with B > A, e.g. --seeds 0:151")
        if b - a + len(seeds) > MAX_SEEDS:  # before the list is made (0:10**12 would fill the memory)
            raise QkovError(f"--seeds {text!r} names more than {MAX_SEEDS:,} seeds, the most one sweep takes; "
                            f"split it into several sweeps")
        seeds.extend(range(a, b))
    if len(set(seeds)) != len(seeds):
        raise QkovError(f"--seeds {text!r} names a seed twice; give each seed once")
    return seeds


def _split_values(text: str) -> list[str]:
    """Split on the commas outside brackets: ``1e-3,3e-3`` -> 2 values, ``[0.9,0.98],[0.9,0.99]`` -> 2."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[(" and 1 or (-1 if ch in "])" else 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``--set key=v1,v2`` items as ``{key: [v1, v2]}`` (values parsed later, per field).

    >>> parse_grid(["lr=1e-3,3e-3", "betas=[0.9,0.98]"])
    {'lr': ['1e-3', '3e-3'], 'betas': ['[0.9,0.98]']}
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise QkovError(f"--set expects key=v1,v2,..., got {item!r}; e.g. --set lr=1e-3,3e-3")
        if key in grid:
            raise QkovError(f"--set {key} is given twice; list its values once: --set {key}=v1,v2")
        vals = [v.strip() for v in _split_values(values)]
        if not all(vals):
            raise QkovError(f"--set {item!r} has an empty value; expected key=v1,v2,... e.g. --set lr=1e-3,3e-3")
        grid[key] = vals
    return grid


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its configs, seed, config hash and directory name."""

    rc: RunConfig
    hash: str
    name: str

    @property
    def seed(self) -> int:
        return self.rc.seed


def run_name(rc: RunConfig, digest: str) -> str:
    """``seed0007-<settings>-<hash[:10]>``: readable, unique for the config (the hash)."""
    sets = "-".join(f"{k}={v}" for k, v in sorted(registry.settings_of(rc).items()))
    sets = re.sub(r"[^A-Za-z0-9._=+-]", "_", sets)[:80]
    return "-".join(x for x in (f"seed{rc.seed:04d}", sets, digest[:10]) if x)


def plan(task: Task | str, seeds: list[int], grid: dict[str, list[Any]] | None = None) -> list[Point]:
    """The sweep's points, seeds varying fastest; every config is checked here, before anything
    is written (an unknown key, a value that does not parse, or a point that cannot fit in
    memory, ``qkov.train.check_setup``, is a QkovError)."""
    if not seeds:
        raise QkovError("the sweep has no seeds; pass a non-empty range, e.g. --seeds 0:10")
    grid = grid or {}
    for key, values in grid.items():
        if not values:
            raise QkovError(f"--set {key} has no values; expected --set {key}=v1,v2")
    points, names = [], set()
    for combo in itertools.product(*grid.values()):
        t, m, tr = configure(task, dict(zip(grid, combo)))
        check_setup(RunConfig(t, m, tr), what=f"a point of the sweep ({_settings(grid, combo)})")  # fits in memory
        for seed in seeds:
            rc = RunConfig(t, m, tr, seed)
            digest = registry.config_hash(rc)
            point = Point(rc, digest, run_name(rc, digest))
            if point.name not in names:     # two spellings of one value are one point
                names.add(point.name)
                points.append(point)
    return points


def _settings(grid: dict[str, list[Any]], combo: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(grid, combo)) or "the task's reference settings"


def check_sweep_dir(out: Path, task: str) -> None:
    """Refuse a path that is a file, a run directory, or a sweep directory of another task."""
    if out.exists() and not out.is_dir():
        raise QkovError(f"{out} is a file; pass a directory for the sweep, e.g. --out sweeps/{task}")
    if store.is_run_dir(out):
        raise QkovError(f"{out} is one run's directory; pass a directory for the whole sweep, e.g. --out sweeps/{task}")
    for d in registry.run_dirs(out):
        other = store.read_config(d).task.name
        if other != task:
            raise QkovError(f"{out} holds runs of task '{other}' ({d.name}), not '{task}'; pass another --out")


