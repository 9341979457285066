"""The ``brackets`` task: its data (labels, kinds, the hard cases), its text and (slow) its reference run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import qkov
from qkov.tasks import get_task
from qkov.tasks.brackets import CLOSE, END, KINDS, OPEN, PAD, START, elevation, is_balanced


def balanced_by_hand(s: str) -> bool:
    depth = 0
    for c in s:
        depth += 1 if c == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def strings(batch) -> list[str]:
    task = get_task("brackets")
    return [task.format(t) for t in batch.tokens.tolist()]


@pytest.fixture(scope="module")
def task():
    return get_task("brackets")


def test_hand_examples_are_labelled_as_a_loop_labels_them(task):
    cases = {"()": 1, "(()())": 1, "(())()": 1, "(()": 0, ")(": 0, "())(()": 0, "(((": 0, "(": 0,
             "()" * 20: 1, "(" * 20 + ")" * 20: 1, "(" * 20 + ")" * 19 + "(": 0}
    for s, want in cases.items():
        tokens = task.parse(s)
        assert tokens[0] == START and tokens[-1] == END and len(tokens) == len(s) + 2
        assert task.expected(tokens) == [want] == [int(balanced_by_hand(s))], s
        assert task.format(tokens) == s
    assert task.format_answer([1]) == "balanced" and task.format_answer([0]) == "unbalanced"
    assert task.answer_positions(task.parse("(()")) == [0] and task.output_labels() == ["unbalanced", "balanced"]


def test_a_batch_is_start_brackets_end_then_padding_scored_at_start_only(task):
    batch = task.sample(512, torch.Generator().manual_seed(0))
    assert batch.tokens.shape == (512, 42) and batch.scored[:, 0].all() and not batch.scored[:, 1:].any()
    for row, s, label in zip(batch.tokens.tolist(), strings(batch), batch.targets[:, 0].tolist()):
        end = row.index(END)
        assert row[0] == START and 1 <= end - 1 <= 40 and len(s) == end - 1
        assert all(t in (OPEN, CLOSE) for t in row[1:end]) and all(t == PAD for t in row[end + 1:])
        assert label == int(balanced_by_hand(s))
    share = batch.targets[:, 0].float().mean()
    assert 0.25 < share < 0.45                      # balanced strings are a third of the mix, not rare


def test_each_kind_is_what_it_says_and_the_hard_cases_are_hard(task):
    g = torch.Generator().manual_seed(1)
    made = {k: task.make(k, 2000, g) for k in KINDS}
    for kind, batch in made.items():
        tokens = batch.tokens
        opens, closes = (tokens == OPEN).sum(1), (tokens == CLOSE).sum(1)
        lowest = elevation(tokens).min(1).values
        label = batch.targets[:, 0]
        assert torch.equal(label.bool(), is_balanced(tokens))
        if kind == "balanced":
            assert label.all() and (opens == closes).all() and (lowest >= 0).all()
            long = [x for x in strings(batch) if len(x) >= 20]          # every even length, long ones all different
            assert len(set(long)) > 0.99 * len(long) > 900 and ((opens + closes) == 40).any()
        elif kind == "equal_negative":      # the counts agree; only the elevation says no
            assert not label.any() and (opens == closes).all() and (lowest < 0).all()
            assert (lowest == -1).float().mean() > 0.2                    # often a dip to -1 only
        elif kind == "one_flipped":         # counts two apart; about half never go below zero
            assert not label.any() and ((opens - closes).abs() == 2).all()
            assert 0.3 < (lowest >= 0).float().mean() < 0.7
        elif kind == "odd":
            assert not label.any() and ((opens + closes) % 2 == 1).all() and ((opens - closes).abs() == 1).all()
        else:                                # random: every length, now and then balanced
            n = opens + closes
            assert n.min() == 1 and n.max() == 40 and 0.005 < label.float().mean() < 0.05


def test_the_eval_set_holds_every_kind_and_evaluate_reports_each(task):
    batch, kinds = task.eval_batch(), task.kinds()
    assert kinds.bincount().tolist() == [task.eval_rows] * len(KINDS) and len(batch) == len(kinds)
    assert torch.equal(batch.tokens, get_task("brackets").eval_batch().tokens)     # from the eval seed
    out = task.evaluate(qkov.Transformer(task.model_config()))
    assert set(out["by_kind"]) == set(KINDS)
    assert sum(g["n"] for g in out["by_kind"].values()) == out["n"] == len(batch)
    mean = sum(g["accuracy"] for g in out["by_kind"].values()) / len(KINDS)
    assert out["accuracy"] == pytest.approx(mean)


def test_a_target_accuracy_asks_for_it_on_every_kind(task):
    from qkov.evaluation import target_reached

    row = {"accuracy": 0.995, "loss": 0.02, "by_kind": {k: {"accuracy": 0.995, "loss": 0.02, "n": 1} for k in KINDS}}
    assert target_reached(row, 0.99)
    row["by_kind"]["equal_negative"]["accuracy"] = 0.98
    assert not target_reached(row, 0.99)


def test_bad_input_is_one_line(task):
    for text, says in [("(a)", "'a' is not a bracket"), ("(" * 41, "has 41 brackets"), ("", "has 0 brackets"),
                       ("1 2", "'1' is not a bracket")]:
        with pytest.raises(qkov.QkovError, match=says) as e:
            task.parse(text)
        assert "\n" not in str(e.value) and "'(()())'" in str(e.value)
    assert task.parse(" ( ( ) ) ") == task.parse("(())")


def test_padding_does_not_change_the_answer(task):
    model = qkov.Transformer(task.model_config())
    tokens = task.parse("(()))(")
    short = model(torch.tensor([tokens]))[0, 0]
    padded = model(torch.tensor([tokens + [PAD] * (42 - len(tokens))]))[0, 0]
    assert torch.allclose(short, padded, atol=1e-6)


# ------------------------------------------------------------------ the reference run (slow)
@pytest.fixture(scope="module")
def run(trained):
    return trained("brackets")


@pytest.mark.slow
def test_reference_run_reaches_99_percent_on_every_kind(run):
    assert all(g["accuracy"] >= 0.99 for g in run.final["by_kind"].values()), run.final["by_kind"]


@pytest.mark.slow
def test_show_answers_balanced_or_not(run):
    shown = qkov.show(run.model, run.task, "(()())", "(()", "())(()", "(((())))()")
    assert [s.output for s in shown] == ["balanced", "unbalanced", "unbalanced", "balanced"]
    assert all(s.correct for s in shown)
    cli = [sys.executable, "-m", "qkov", "show", str(run.path)]
    out = subprocess.run(cli + ["(()())"], capture_output=True, text=True)
    assert out.returncode == 0 and "answer    balanced" in out.stdout
    bad = subprocess.run(cli + ["(()x"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "not a bracket" in bad.stderr


@pytest.mark.slow
def test_findings_name_the_count_head_and_the_elevation_parts_and_their_ablations_agree(run):
    summary = qkov.analyze(run.model, run.task)
    a, checks = summary.attention, {c["id"]: c for c in summary.checks}
    heads = a["heads_at_start"]
    count = heads[a["proportion_head"]]
    assert count["on_brackets"] >= 0.5 and count["from_uniform"] == min(h["from_uniform"] for h in heads.values())
    assert count["from_uniform"] < 0.3                         # roughly uniform over the brackets
    # Ablating the count head breaks what only counting tells apart; the elevation goes through
    # the negative head and MLP 0 (pair accuracies near chance, 50%).
    assert checks["proportion_head_needed"]["holds"] and checks["proportion_head_needed"]["after"] < 0.8
    assert checks["negative_head_needed"]["holds"] and checks["mlp0_needed"]["holds"]
    neg = heads[a["negative_head"]]
    assert neg["on_negative_ratio"] > 1 and neg["on_close"] > 0.9 > a["close_share"]
    found = {f.id: f for f in summary.findings}
    assert found["accuracy_by_kind"].value >= 0.99 and f"Head {a['proportion_head']} " in found["proportion_head"].text
    # Layer 0 does not sum prefixes or suffixes: from each bracket, its weight on later ones is uniform's, near enough.
    assert abs(found["no_prefix_sums"].value - a["later_brackets_uniform"]) < 0.1
