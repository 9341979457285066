"""Shared fixtures. ``trained(task_name)`` trains a reference model once per test session: no test
trains a model that another test has already trained with the same settings."""

from __future__ import annotations

import pytest
import torch

import qkov
from qkov.tasks import configure

# The models under test are tiny: intra-op threads only add synchronisation, and on a shared
# 2-core machine a second thread that has to wait for a busy core made tests up to 10x slower.
torch.set_num_threads(1)

# A small prime with a larger train fraction groks in ~2,000 full-batch steps (p=43 with the
# reference 30% memorises and stays near chance for 7,000 steps). Nanda et al.'s recipe otherwise
# (AdamW, wd 1, betas (0.9, 0.98), 10 warmup steps, float64 loss) with lr 3e-3 and d_mlp 128.
SMALL_MODADD = dict(p=23, train_frac=0.6, d_mlp=128, lr=3e-3, steps=2500)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """``trained(task_name, seed=0, **sets) -> qkov.Run`` with the task's reference defaults, cached.

    The first call for a (task, seed) trains into a temporary run directory (``run.path``), so
    tests that need a directory (``qkov analyze DIR``) and tests that need the model share one
    training run per session.
    """
    runs: dict[tuple, qkov.Run] = {}

    def get(task_name: str, seed: int = 0, **sets) -> qkov.Run:
        """``sets``: overrides as ``qkov train --set key=value`` takes them (``p=23``, ``lr=3e-3``,
        ``steps=2000``, ...); each distinct set of overrides is its own cached run."""
        key = (task_name, seed, tuple(sorted(sets.items())))
        if key not in runs:
            out = tmp_path_factory.mktemp(f"{task_name}-seed{seed}")
            task, model_cfg, train_cfg = configure(task_name, sets)
            runs[key] = qkov.train(
                task, out=out / "run", seed=seed, model_config=model_cfg, train_config=train_cfg, quiet=True
            )
        return runs[key]

    return get


@pytest.fixture(scope="session")
def small_modadd(trained) -> qkov.Run:
    """The grokked p=23 ``modadd`` run (``SMALL_MODADD``), trained once for every test that reads it."""
    return trained("modadd", **SMALL_MODADD)


@pytest.fixture(scope="session")
def short_trained(tmp_path_factory):
    """``short_trained(task_name, steps) -> qkov.Run``: a short run in a temporary directory, cached.

    For tests that need a model with a run directory (reports, the CLI) but not a fully trained one.
    """
    runs: dict[tuple[str, int], qkov.Run] = {}

    def get(task_name: str, steps: int) -> qkov.Run:
        key = (task_name, steps)
        if key not in runs:
            task = qkov.get_task(task_name)
            cfg = task.train_config().replace(steps=steps, eval_every=max(1, steps // 5))
            out = tmp_path_factory.mktemp(f"{task_name}-{steps}steps")
            runs[key] = qkov.train(task, out=out / "run", train_config=cfg, quiet=True)
        return runs[key]

    return get
