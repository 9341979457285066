"""``qkov show``: what a model does on inputs a person writes, and how every task reads and writes them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import qkov
from qkov.cli import main
from qkov.errors import QkovError
from qkov.show import show
from qkov.tasks import Task, get_task

WALKTHROUGH = ("35 14 47 61 38 54", "52 59", "46 41 41")


@pytest.fixture(scope="module")
def max_run(short_trained):
    return short_trained("max", 200)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------- the walkthrough's examples
@pytest.mark.slow
def test_trained_max_answers_the_walkthroughs_examples(trained, capsys):
    run = trained("max")
    first, second, third = show(run.model, run.task, *WALKTHROUGH)
    assert (first.output, second.output, third.output) == ("61", "59", "46")
    assert all(s.correct for s in (first, second, third))
    # the last position attends to the 61 at position 3, and the answer's top logit is 61
    row = first.patterns["0.0"][5]
    assert max(range(6), key=row.__getitem__) == 3 and row[3] > 0.9
    assert first.top[0][0]["label"] == "61" and first.top[0][0]["prob"] > 0.99
    # the CLI says the same, as JSON
    code, out, _ = run_cli(capsys, "show", run.path, *WALKTHROUGH, "--json")
    shown = json.loads(out)
    assert code == 0 and [s["output"] for s in shown] == ["61", "59", "46"]
    assert shown[0]["expected"] == "61" and shown[0]["correct"] is True
    assert shown[1]["tokens"] == [52, 59] and shown[1]["input"] == "52 59"


def test_show_prints_answer_logits_and_a_pattern_table(max_run, capsys):
    code, out, _ = run_cli(capsys, "show", max_run.path, *WALKTHROUGH)
    assert code == 0
    first = out.split("\n\n")[0]
    assert "answer    61" in first and "expected  61  (correct)" in first
    assert "top logits:\n  at (5) 54: 61 " in first
    table = first.split("(rows: query, columns: key):\n")[1].splitlines()
    assert table[0].split() == ["(0)", "35", "(1)", "14", "(2)", "47", "(3)", "61", "(4)", "38", "(5)", "54"]
    assert table[1].split()[:2] == ["(5)", "54"] and len(table[1].split()) == 2 + 6


def test_json_has_every_field_and_full_patterns(max_run, capsys):
    code, out, _ = run_cli(capsys, "show", max_run.path, "52 59", "46 41 41", "--json")
    shown = json.loads(out)
    assert code == 0 and len(shown) == 2
    for s in shown:
        assert s.keys() >= {"input", "tokens", "output", "expected", "correct", "patterns", "top", "positions"}
        pattern = torch.tensor(s["patterns"]["0.0"])                               # [query_pos, key_pos]
        n = len(s["tokens"])
        assert pattern.shape == (n, n)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(n), atol=1e-3, rtol=0)
        assert pattern.triu(1).abs().max() == 0                                    # causal
    assert shown[1]["positions"] == [2] and shown[1]["expected"] == "46"


def test_html_draws_every_heads_attention(tmp_path, capsys):
    task = get_task("induction", n_ctx=12, min_seg=2, max_seg=6)
    run = qkov.train(task, out=tmp_path / "run", train_config=task.train_config().replace(steps=2, eval_every=1),
                     quiet=True)
    page = tmp_path / "show.html"
    code, out, _ = run_cli(capsys, "show", run.path, "7 3 9 1 7 3 9", "5 5", "--html", page)
    assert code == 0 and f"wrote {page}" in out
    text = page.read_text()
    for head in ("0-0", "0-1", "1-0", "1-1"):
        assert f'id="fig-attention-{head}"' in text
    assert text.count("plotly.js v") == 1 and "7 3 9 1 7 3 9" in text


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("text,message", [
    ("35 x 61", "input '35 x 61': 'x' is not a number; max reads 2 to 6 numbers 0..63"),
    ("35 64", "input '35 64': 64 is outside the vocabulary (numbers 0..63)"),
    ("1 2 3 4 5 6 7", "input '1 2 3 4 5 6 7' has 7 tokens; max reads 2 to 6 numbers"),
    ("5", "input '5' has 1 token; max reads 2 to 6"),
    ("", "input '' has 0 tokens"),
])
def test_bad_input_one_line_exit_2(max_run, capsys, tmp_path, text, message):
    html = tmp_path / "show.html"
    code, out, err = run_cli(capsys, "show", max_run.path, "52 59", text, "--html", html)
    assert code == 2 and out == ""                       # every input is read before any is shown
    assert err.startswith("qkov: ") and err.count("\n") == 1 and message in err, err
    assert not html.exists()


def test_bad_input_in_a_real_process(max_run):
    p = subprocess.run([sys.executable, "-m", "qkov", "show", str(max_run.path), "35 14 x"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith("qkov: input '35 14 x': 'x' is not a number") and p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr


def test_python_api_reads_text_or_token_ids(max_run):
    by_text, by_ids = show(max_run.model, "max", "52 59", [52, 59])
    assert by_text.tokens == by_ids.tokens == [52, 59] and by_text.output == by_ids.output
    assert by_ids.input == "52 59"
    with pytest.raises(QkovError, match="input 3 is neither text nor a list of token ids"):
        show(max_run.model, "max", 3)
    with pytest.raises(QkovError, match="show needs at least one input"):
        show(max_run.model, "max")
    print(show(max_run.model, "max", "52 59"))          # a ShownList prints as the CLI does


# ----------------------------------------------------------------- every task's text
@pytest.mark.parametrize("name,text,tokens,positions,expected", [
    ("max", "35 14 47 61 38 54", [35, 14, 47, 61, 38, 54], [5], "61"),
    ("max", "52 59", [52, 59], [1], "59"),
    ("add", "52 59", [52, 59], [1], "111"),
    ("fib", "1 2 3 5 8", [1, 2, 3, 5, 8], [1, 2, 3], "3 5 8"),
    ("fib", "4 7", [4, 7], [1], "11"),
    ("modadd", "100 50", [100, 50, 113], [2], "37"),
    ("modadd", "100 50 =", [100, 50, 113], [2], "37"),
    ("induction", "7 3 9 1 7 3 9", [7, 3, 9, 1, 7, 3, 9], [4, 5, 6], "3 9 1"),
    ("induction", "1 2 3", [1, 2, 3], [2], "?"),
])
def test_every_task_reads_and_writes_its_text(name, text, tokens, positions, expected):
    task = get_task(name)
    assert task.parse(text) == tokens
    assert task.parse(task.format(tokens)) == tokens
    assert task.answer_positions(tokens) == positions
    assert task.format_answer(task.expected(tokens)) == expected
    for example in task.example_tokens(3):                # the report's default examples parse back
        assert task.parse(task.format(example)) == example


@pytest.mark.parametrize("name,text,message", [
    ("add", "100 50", "100 + 50 = 150 is above max_sum=127"),
    ("add", "1 2 3", "has 3 tokens; add reads two numbers with a sum of at most 127"),
    ("fib", "100 50", "the next term 100 + 50 = 150 is above max_value=127"),
    ("modadd", "= 3", "'=' comes last, after two numbers"),
    ("modadd", "113 3", "113 is outside the vocabulary (numbers 0..112 and '=')"),
    ("induction", " ".join(["1"] * 33), "has 33 tokens; induction reads 1 to 32 numbers 0..255"),
])
def test_every_task_names_a_bad_input(name, text, message):
    with pytest.raises(QkovError, match="^input ") as err:
        get_task(name).parse(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_max_examples_have_several_lengths():
    lengths = [len(t) for t in get_task("max").example_tokens(4)]
    assert lengths == [2, 3, 5, 6]


class Brackets(Task):
    """A task whose text is not numbers: is a bracket string balanced? (only its text is real)"""

    name = "brackets"
    defaults = {"n": 8}
    seq_len = property(lambda self: self.n)
    d_vocab = property(lambda self: 2)

    def token_labels(self):
        return ["(", ")"]

    def parse(self, text):
        tokens = [self.token_labels().index(c) for c in text if c in "()"]
        self.check_input(text, tokens)
        return tokens

    def format(self, tokens):
        return "".join(self.token_labels()[t] for t in tokens)

    def format_answer(self, outputs):
        return " ".join("balanced" if t == 1 else "unbalanced" for t in outputs)

    def example_tokens(self, n):
        return [[0, 1]] * n


def test_a_task_that_reads_brackets_needs_nothing_else():
    task = Brackets()
    cfg = qkov.ModelConfig(n_layers=1, n_heads=1, d_model=16, d_vocab=2, n_ctx=8)
    torch.manual_seed(0)
    (shown,) = show(qkov.Transformer(cfg), task, "(()())")
    assert shown.tokens == [0, 0, 1, 0, 1, 1] and shown.input == "(()())"
    assert shown.labels[1] == "(1) (" and shown.positions == [5]
    assert shown.output in ("balanced", "unbalanced") and shown.expected is None and shown.correct is None
    with pytest.raises(QkovError, match=r"input '\(\(\(\(\(\(\(\(\(' has 9 tokens"):
        show(qkov.Transformer(cfg), task, "(" * 9)


# ----------------------------------------------------------------- generated answers
def next_token_model(task, sep_writes: int):
    """A one-layer ``task`` model whose output is its input token + 1 (mod vocab), and
    ``sep_writes`` at the separator: the direct path only (one-hot embedding, no attention output)."""
    cfg = qkov.ModelConfig(n_layers=1, n_heads=1, d_model=task.d_vocab, d_vocab=task.d_vocab,
                           d_vocab_out=task.d_vocab_out, n_ctx=task.seq_len)
    model = qkov.Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E.copy_(torch.eye(task.d_vocab))
        for t in range(task.vocab):
            model.unembed.W_U[t, (t + 1) % task.vocab] = 1.0
        model.unembed.W_U[task.sep, sep_writes] = 1.0
    return model


@pytest.mark.parametrize("name", ["sort", "reverse"])
def test_a_generated_answer_feeds_each_output_back(name):
    task = get_task(name)
    model = next_token_model(task, sep_writes=7)
    (shown,) = show(model, task, "5 3 9 1")
    # Generated: 7 at '|', then each output + 1. Teacher-forced, the model would answer
    # 7 2 4 6 for sort (the right outputs 1 3 5 + 1) and 7 2 10 4 for reverse (1 9 3 + 1).
    assert shown.generated and shown.output == "7 8 9 10" and shown.predictions == [7, 8, 9, 10]
    assert shown.tokens == [5, 3, 9, 1, task.sep, 7, 8, 9] and shown.labels[5] == "(5) 7"
    assert shown.positions == [4, 5, 6, 7] and shown.correct is False
    assert len(shown.patterns["0.0"]) == 8                        # the attention on the generated sequence
    assert "answer    7 8 9 10  (generated: each output token fed back)" in shown.to_text()
    assert "(wrong: the generated answer differs from it at outputs 1, 2, 3, 4 of 4)" in shown.to_text()


def test_each_step_reads_the_models_own_outputs_not_the_true_answer():
    task = get_task("sort")
    torch.manual_seed(0)
    model = qkov.Transformer(task.model_config())                 # untrained: its outputs are not the answer
    calls = []
    forward = model.run_with_cache

    def spy(tokens, **kwargs):
        calls.append(tokens[0].tolist())
        return forward(tokens, **kwargs)

    model.run_with_cache = spy
    (shown,) = show(model, task, "5 3 9 1")
    assert shown.predictions != [1, 3, 5, 9]
    # one run per output, each on the list, '|' and every output generated before it
    assert calls == [[5, 3, 9, 1, task.sep] + shown.predictions[:i] for i in range(4)]
    assert shown.tokens == calls[-1]


def test_a_given_sequence_is_read_in_one_run():
    task = get_task("histogram")                                  # the copy is input, not generated
    torch.manual_seed(0)
    model = qkov.Transformer(task.model_config())
    (shown,) = show(model, task, "3 5 3")
    assert not shown.generated and shown.tokens == task.parse("3 5 3") == [3, 5, 3, task.sep, 3, 5, 3]
    assert "generated" not in shown.to_text() and shown.expected == "2 1 2"


def test_a_bidirectional_heads_table_shows_every_key_zeros_included():
    task = qkov.get_task("brackets")
    model = qkov.Transformer(task.model_config(), seed=0)
    (shown,) = qkov.show(model, task, "(()")
    assert shown.causal is False
    shown.patterns["0.0"][0] = [0.0, 0.0, 0.0, 0.0, 1.0]   # a head reading only the last key ([end])
    row = shown.table("0.0").splitlines()[1].split()
    assert row[-5:] == ["0.00", "0.00", "0.00", "0.00", "1.00"]
    causal = qkov.Transformer(qkov.get_task("max").model_config(), seed=0)
    (m,) = qkov.show(causal, "max", "3 5 8")
    m.positions = [0]                         # the first query of a causal model: later keys blank
    assert m.causal and m.table("0.0").splitlines()[1].split() == ["(0)", "3", "1.00"]
