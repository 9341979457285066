"""The reference models reach their published accuracy with the default settings and seed 0 (slow).

Each model is trained once per session by the ``trained`` fixture (``conftest.py``) through
``qkov.train`` with the task's reference configs, as ``qkov train TASK`` does. The numbers are
measured again here with the trained model's plain forward (``task.evaluate(run.model)``), not
taken from the trainer's own eval.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_max_is_right_at_every_length(trained):
    run = trained("max")
    m = run.task.evaluate(run.model)                      # 10,000 sampled lists per length
    assert sorted(m["by_length"]) == ["2", "3", "4", "5", "6"]
    for length, g in m["by_length"].items():
        assert g["n"] == 10_000
        assert g["accuracy"] >= 0.999, (length, g)


def test_add_is_right_on_every_pair(trained):
    run = trained("add")
    m = run.task.evaluate(run.model)                      # the training set is every pair
    assert m["n"] == 8256                                 # (a, b) with a + b <= 127
    assert m["accuracy"] == 1.0, m


def test_fib_is_right_at_every_position(trained):
    run = trained("fib")
    m = run.task.evaluate(run.model)
    assert m["n"] == 3 * 1408                             # every start whose 5 terms stay <= 127
    assert sorted(m["by_position"]) == ["1", "2", "3"]
    for pos, g in m["by_position"].items():
        assert g["accuracy"] >= 0.995, (pos, g)


def test_small_modadd_generalises(small_modadd):
    run = small_modadd                                    # conftest.SMALL_MODADD; tests/test_fourier.py reads it too
    m = run.task.evaluate(run.model)
    assert m["train_accuracy"] == 1.0, m
    assert m["accuracy"] >= 0.99, m                       # on the 40% of pairs never trained on
    assert m["n"] == len(run.task.dataset("test")) == 212


def test_induction_loss_is_far_lower_on_the_repeats(trained):
    run = trained("induction")
    m = run.task.evaluate(run.model)
    # The task's own data: the repeated segment against every other position.
    assert m["loss"] < 0.2 * m["loss_rest"], m
    # The standard test, [x, x] with x random: the second half against the first.
    assert m["repeated"]["loss"] < 0.2 * m["repeated"]["loss_first_half"], m["repeated"]


def test_a_converged_run_records_no_negative_loss(small_modadd):
    """Every loss the trainer recorded (eval and train, overall and per group) and the Fourier
    losses of the grokked model are >= 0: log-sum-exp minus the answer's logit never rounds below."""
    from qkov.fourier import modular_analysis

    def losses(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if "loss" in k and isinstance(v, float):
                    yield k, v
                yield from losses(v)

    found = [kv for row in small_modadd.metrics for kv in losses(row)]
    assert len(found) >= 2 * len(small_modadd.metrics) - 1           # loss and train_loss in every row
    assert all(v >= 0 for _, v in found), [kv for kv in found if kv[1] < 0][:5]
    assert small_modadd.metrics[-1]["loss"] < 1e-2                    # converged: the clamp had rounding to fix
    fourier = modular_analysis(small_modadd.model, small_modadd.task)
    assert all(v >= 0 for k, v in fourier.items() if "loss" in k and v is not None), fourier
