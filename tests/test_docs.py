"""Every example in qkov's docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import qkov

MODULES = sorted(m.name for m in pkgutil.walk_packages(qkov.__path__, "qkov.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"


def test_the_examples_are_there():
    """The modules whose API the README tours carry runnable examples (a guard against the
    collection above silently finding none)."""
    attempted = {name: doctest.testmod(importlib.import_module(name)).attempted
                 for name in ("qkov.circuits", "qkov.fastpath", "qkov.model", "qkov.train", "qkov.tasks")}
    assert all(n > 0 for n in attempted.values()), attempted
