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
