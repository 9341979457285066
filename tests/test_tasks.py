"""The built-in tasks added by the Task API: their data, text, and (slow) their reference runs."""

from __future__ import annotations

import pytest
import torch

import qkov
from qkov.tasks import get_task


def test_min_scores_the_running_minimum_at_every_length():
    task = get_task("min", vocab=10, min_len=2, max_len=5)
    batch = task.sample(64, torch.Generator().manual_seed(0))
    want = batch.tokens.cummin(1).values                                   # [b, p]
    assert torch.equal(batch.targets[:, 1:], want[:, 1:]) and not batch.scored[:, 0].any()
    assert task.expected(task.parse("7 3 9")) == [3]
    assert task.answer_rule().reduce == "min"


def test_analysis_chooses_by_what_the_task_says_not_its_name():
    import inspect

    import qkov.analyze as analyze

    assert "task.name" not in inspect.getsource(analyze)


def test_certify_refuses_min_in_one_line():
    task = get_task("min", vocab=5, min_len=3, max_len=3)
    model = qkov.Transformer(task.model_config())
    with pytest.raises(qkov.QkovError, match="proves 'max' only"):
        qkov.certify(model, task)


@pytest.mark.slow
def test_min_reference_run_reaches_999_at_every_length_and_attends_to_the_minimum(trained):
    run = trained("min")
    assert all(g["accuracy"] >= 0.999 for g in run.final["by_length"].values())
    summary = qkov.analyze(run.model, run.task, checks=False)
    found = {f.id: f.value for f in summary.findings}
    assert found["top_key_is_min"] >= 0.99
    assert found["key_rank_correlation"] < -0.9
    assert found["copying_score"] > 0.9


@pytest.mark.parametrize("name, rule", [("sort", sorted), ("reverse", lambda xs: xs[::-1])])
def test_list_tasks_write_the_output_after_the_separator_and_score_it(name, rule):
    task = get_task(name)
    batch = task.sample(32, torch.Generator().manual_seed(0))
    for tokens, targets in zip(batch.tokens.tolist(), batch.targets.tolist()):
        n = tokens.index(task.sep)
        assert 2 <= n <= 10 and all(t < task.vocab for t in tokens[:n])
        assert targets[n : 2 * n] == rule(tokens[:n])                       # y_i predicted one position early
        assert tokens[n + 1 : 2 * n] == rule(tokens[:n])[: n - 1]
        assert all(t == -100 for t in targets[:n] + targets[2 * n :])
    assert task.expected(task.parse("5 3 9 1")) == rule([5, 3, 9, 1])
    with pytest.raises(qkov.QkovError, match="write the list alone"):
        task.parse("5 3 | 3 5")


def test_list_tasks_count_whole_lists_by_length():
    task = get_task("sort", max_len=4)
    out = task.evaluate(qkov.Transformer(task.model_config()))
    assert set(out["by_length"]) == {"2", "3", "4"} and out["exact"] <= out["accuracy"]
    assert sum(g["n"] for g in out["by_length"].values()) == len(task.eval_batch())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sort", "reverse"])
def test_list_reference_runs_get_99_percent_of_whole_lists_right(trained, name):
    run = trained(name)
    assert all(g["accuracy"] >= 0.99 for g in run.final["by_length"].values()), run.final["by_length"]
    shown = qkov.show(run.model, run.task, "5 3 9 1")[0]            # generated: each output fed back
    assert shown.generated and shown.correct
    assert shown.output == " ".join(map(str, sorted([5, 3, 9, 1]) if name == "sort" else [1, 9, 3, 5]))
    # A list the model gets wholly right teacher-forced it also generates, and only those: each
    # generated output is then the right one, so the next step reads what training fed it.
    batch = run.task.eval_batch()[:64]
    with torch.no_grad():
        right = ((run.model(batch.tokens).argmax(-1) == batch.targets) | ~batch.scored).all(1).tolist()
    lists = [t[: t.index(run.task.sep)] for t in batch.tokens.tolist()]
    assert [s.correct for s in qkov.show(run.model, run.task, *lists)] == right


def test_histogram_counts_each_token_in_the_second_copy():
    task = get_task("histogram")
    batch = task.sample(32, torch.Generator().manual_seed(0))
    for tokens, targets in zip(batch.tokens.tolist(), batch.targets.tolist()):
        n = tokens.index(task.sep)
        xs = tokens[:n]
        assert tokens[n + 1 : 2 * n + 1] == xs
        assert targets[n + 1 : 2 * n + 1] == [xs.count(x) for x in xs]
        assert all(t == -100 for t in targets[: n + 1] + targets[2 * n + 1 :])
    shown_input = task.parse("3 5 3")
    assert task.expected(shown_input) == [2, 1, 2] and task.answer_positions(shown_input) == [4, 5, 6]


@pytest.mark.slow
def test_histogram_reference_run_counts_99_percent_of_positions(trained):
    run = trained("histogram")
    assert run.final["accuracy"] >= 0.99
    assert qkov.show(run.model, run.task, "3 5 3 7")[0].output == "2 1 2 1"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sort", "reverse", "histogram"])
def test_list_findings_name_a_head_that_attends_where_the_answer_is(trained, name):
    """The finding is true of the reference run: its head puts most of its attention, from the
    scored positions, on the input tokens the answer is read from (sort, reverse: the token
    written next; histogram: the tokens equal to its own), well above what it would put there
    if it spread its attention evenly."""
    run = trained(name)
    summary = qkov.analyze(run.model, run.task, checks=False)
    finding = {f.id: f for f in summary.findings}["next_token_head"]
    even = summary.attention["even_on_next"]
    assert 0 < even < 0.5 and finding.value >= 2.5 * even, finding.text   # histogram: 0.322 vs 0.105
    if name != "histogram":                   # one token to find: most of the head's weight is on it
        assert finding.value >= 0.5, finding.text
