"""The thread policy: its decisions on made-up step times, and weights that do not depend on it."""

from __future__ import annotations

import pytest
import torch

import qkov
from qkov.store import RunConfig
from qkov.tasks import configure, get_task
from qkov.threads import _THREADED_WORK, ThreadPolicy, thread_count_invariant, work_per_step


def simulate(policy: ThreadPolicy, step_time, steps: int = 3000) -> list[int]:
    """Drive ``policy`` through ``steps`` steps whose wall time is ``step_time(threads, i)``;
    the thread count of every step."""
    counts = []
    with policy:
        for i in range(steps):
            counts.append(policy.threads)
            assert torch.get_num_threads() == policy.threads
            policy.step_done(step_time(policy.threads, i))
    return counts


def run_config(name: str, **sets) -> RunConfig:
    task, model_cfg, train_cfg = configure(name, sets)
    return RunConfig(task, model_cfg, train_cfg, 0)


# ----------------------------------------------------------------------- decisions
def test_a_fixed_count_is_never_changed_and_the_old_one_comes_back():
    before = torch.get_num_threads()
    counts = simulate(ThreadPolicy(3, available=2), lambda t, i: 10.0 if i % 2 else 1e-4, steps=200)
    assert set(counts) == {3}
    assert torch.get_num_threads() == before


def test_auto_settles_on_one_thread_when_two_are_5x_slower():
    counts = simulate(ThreadPolicy(0, available=2, idle_cores=lambda: None),     # no idle-time hint
                      lambda t, i: 0.02 if t == 1 else 0.1)
    assert counts[-1] == 1
    assert counts.count(2) <= 10                          # each trial ends at its first step
    assert torch.get_num_threads() == 1                   # conftest's setting, restored


def test_auto_settles_on_two_threads_when_they_are_faster():
    counts = simulate(ThreadPolicy(0, available=2, idle_cores=lambda: 1.0), lambda t, i: 0.01 if t == 1 else 0.006)
    assert counts[-1] == 2
    assert counts[:25] == [1] * 25                        # one thread first: 0.25 s of steps
    assert counts[25:].count(1) < 0.02 * len(counts)      # trials of one thread now and then


def test_busy_cores_mean_no_trial_of_more_threads():
    counts = simulate(ThreadPolicy(0, available=2, idle_cores=lambda: 0.1), lambda t, i: 0.01 if t == 1 else 0.5)
    assert set(counts) == {1}


def test_a_process_that_starts_mid_run_is_left_within_two_steps():
    busy = lambda i: i >= 1500                                                # noqa: E731
    step = 1500
    hint = lambda: 0.0 if step >= 1500 else 1.0                               # noqa: E731

    def step_time(threads: int, i: int) -> float:
        nonlocal step
        step = i
        if busy(i):
            return 0.02 if threads == 1 else 0.2
        return 0.01 if threads == 1 else 0.006

    counts = simulate(ThreadPolicy(0, available=2, idle_cores=hint), step_time)
    assert counts[1499] == 2 and counts[1500:].count(2) <= 2


def test_a_process_that_stops_mid_run_is_noticed_within_seconds():
    step = 0
    hint = lambda: 0.0 if step < 1500 else 1.0                                # noqa: E731

    def step_time(threads: int, i: int) -> float:
        nonlocal step
        step = i
        if i < 1500:
            return 0.02 if threads == 1 else 0.2
        return 0.01 if threads == 1 else 0.006

    counts = simulate(ThreadPolicy(0, available=2, idle_cores=hint), step_time)
    assert set(counts[:1500]) == {1}
    assert counts[1500 + 150:].count(1) < 50               # two threads within 1.5 s of steps


def test_noisy_steps_do_not_keep_it_off_the_faster_count():
    gen = torch.Generator().manual_seed(0)
    noise = torch.empty(3000).log_normal_(0, 0.2, generator=gen).tolist()
    spikes = set(torch.randint(0, 3000, (30,), generator=gen).tolist())       # 1% of steps 5x slower

    def step_time(threads: int, i: int) -> float:
        return (0.01 if threads == 1 else 0.006) * noise[i] * (5 if i in spikes else 1)

    counts = simulate(ThreadPolicy(0, available=2, idle_cores=lambda: 1.0), step_time)
    assert counts.count(2) > 0.9 * len(counts)


def test_one_core_means_one_thread():
    assert set(simulate(ThreadPolicy(0, available=1), lambda t, i: 0.01, steps=100)) == {1}


# ----------------------------------------------------------------------- for_run
def test_small_steps_keep_one_thread_and_larger_ones_adapt():
    assert work_per_step(run_config("max")) < _THREADED_WORK
    for name in ("add", "fib", "induction", "modadd"):
        assert work_per_step(run_config(name)) >= _THREADED_WORK, name
    policy = ThreadPolicy.for_run(run_config("max"))
    assert policy.requested == 1 and "too small" in policy.reason
    assert ThreadPolicy.for_run(run_config("add", threads=2)).requested == 2
    assert ThreadPolicy.for_run(run_config("add")).requested == (0 if thread_count_invariant() else 1)


# ----------------------------------------------------------------------- bit-exactness
needs_invariance = pytest.mark.skipif(
    not torch.backends.mkl.is_available(), reason="torch without MKL: no strict CNR mode, auto keeps one thread")


@needs_invariance
def test_importing_qkov_turns_on_mkls_strict_mode():
    """Before any matmul of the session (conftest imports qkov first): MKL refuses the change later."""
    assert thread_count_invariant()
SMALL = [("add", {"steps": 6}), ("fib", {"steps": 12}), ("induction", {"steps": 12}),
         ("modadd", {"p": 23, "steps": 20})]


def weights(name: str, sets: dict, threads: int) -> dict[str, torch.Tensor]:
    task, model_cfg, train_cfg = configure(name, sets)
    cfg = train_cfg.replace(threads=threads, eval_every=train_cfg.steps, checkpoint_every=0)
    return qkov.train(task, seed=0, model_config=model_cfg, train_config=cfg, quiet=True).model.state_dict()


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"not bit-identical: {differ}"


@needs_invariance
# Slow tier: two threads on a shared 2-core machine can take tens of seconds.
@pytest.mark.slow
@pytest.mark.parametrize("name, sets", SMALL)
def test_one_and_two_threads_train_the_same_weights(name, sets):
    assert_bit_identical(weights(name, sets, 1), weights(name, sets, 2))


@needs_invariance
# Slow tier: two threads on a shared 2-core machine can take tens of seconds.
@pytest.mark.slow
@pytest.mark.parametrize("name, sets", [("add", {"steps": 6}), ("induction", {"steps": 12})])
def test_switching_threads_every_step_trains_the_same_weights(name, sets, monkeypatch):
    def alternate(self, seconds):
        self.threads = 3 - self.threads
        torch.set_num_threads(self.threads)

    one = weights(name, sets, 1)
    monkeypatch.setattr(ThreadPolicy, "step_done", alternate)
    assert_bit_identical(one, weights(name, sets, 2))


def test_the_reference_tasks_pick_an_auto_mode():
    """Every reference task either adapts or keeps one thread, never torch's full count unmeasured."""
    for name in ("max", "add", "fib", "induction", "modadd"):
        task = get_task(name)
        policy = ThreadPolicy.for_run(RunConfig(task, task.model_config(), task.train_config(), 0))
        assert policy.requested in (0, 1), name


# ----------------------------------------------------------------------- qkov tour
@pytest.mark.slow
def test_the_tour_trains_with_the_thread_count_given_and_reuses_across_counts(tmp_path):
    from qkov.store import read_config
    from qkov.tour import tour

    first = tour(tmp_path, steps=5, tasks=("max",), quiet=True, threads=1)
    assert read_config(tmp_path / "max").train.threads == 1 and not first.entries[0].reused
    assert tour(tmp_path, steps=5, tasks=("max",), quiet=True).entries[0].reused   # threads=0 reuses it


def test_the_tour_takes_only_threads_as_a_setting(capsys):
    from qkov.cli import main

    assert main(["tour", "-o", "unused", "--set", "lr=3e-3"]) == 2
    assert "takes only --set threads=N; got lr" in capsys.readouterr().err
    assert main(["tour", "-o", "unused", "--set", "threads=-1"]) == 2
    assert "threads=-1 must be an integer >= 0" in capsys.readouterr().err
