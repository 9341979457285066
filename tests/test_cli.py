"""The command line: bad input gets one clear line on stderr, exit code 2, and nothing on disk."""

import json
import subprocess
import sys

import pytest

from qkov import ModelConfig, TrainConfig
from qkov.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "mx"], "unknown task 'mx'. Known tasks: add, brackets, fib, histogram, induction, max, min, modadd, "
                          "reverse, sort."),
        (["train", "max", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "max", "--set", "foo=1"], "unknown key 'foo' for task 'max'; known keys:"),
        (["train", "max", "--set", "lr"], "--set expects key=value, got 'lr'"),
        (["train", "max", "--set", "lr=fast"], "lr='fast' is not a number"),
        (["train", "max", "--set", "steps=1.5"], "steps='1.5' is not an integer"),
        (["train", "max", "--set", "act_fn=tanh"], "act_fn='tanh' is not supported; expected one of relu, gelu"),
        (["train", "max", "--set", "d_model=30", "--set", "n_heads=4"],
         "d_model=30 is not divisible by n_heads=4; pass d_head explicitly"),
        (["train", "max", "--set", "n_ctx=4"],
         "n_ctx=4 is shorter than the task's longest sequence (6); pass --set n_ctx=6"),
        (["train", "max", "--set", "d_vocab=10"], "d_vocab=10 is too small for task 'max'"),
        (["train", "modadd", "--set", "d_vocab_out=50"], "d_vocab_out=50 is too small for task 'modadd'"),
        (["train", "max", "--set", "min_len=5", "--set", "max_len=3"], "need 1 <= min_len <= max_len"),
        (["train", "max", "--steps", "0"], "steps=0 must be a positive integer"),
        (["train", "max", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
        (["train"], "qkov train needs a TASK"),
        (["eval", "no/such/run"], "run directory no/such/run does not exist"),
        (["analyze", "no/such/run"], "run directory no/such/run does not exist"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("qkov: ") and err.count("\n") == 1, err
    assert message in err
    assert list(tmp_path.iterdir()) == [], "bad input must not leave files behind"


def test_train_eval_analyze_round_trip(capsys, tmp_path):
    out = tmp_path / "run"
    code, text, _ = run_cli(capsys, "train", "max", "--out", str(out), "--steps", "40", "--set", "eval_every=20",
                            "--quiet")
    assert code == 0 and "length 6: accuracy" in text and f"saved to {out}" in text
    code, text, _ = run_cli(capsys, "eval", str(out))
    assert code == 0 and text.startswith("max: accuracy")
    code, text, _ = run_cli(capsys, "analyze", str(out), "--json")
    d = json.loads(text)
    assert d["task"]["name"] == "max" and d["model"]["d_model"] == 32
    assert set(d["eval"]["by_length"]) == {"2", "3", "4", "5", "6"}
    assert d["heads"][0].keys() >= {"layer", "head", "copying_score", "ov_self_top1"}
    # --resume continues it
    code, text, _ = run_cli(capsys, "train", "--resume", str(out), "--steps", "60", "--quiet")
    assert code == 0 and "(step 60)" in text


def test_set_reaches_task_model_and_train_fields(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "modadd", "--out", str(out), "--steps", "5", "--quiet",
                           "--set", "p=7", "--set", "train_frac=0.5", "--set", "model.d_mlp=32",
                           "--set", "train.betas=0.9,0.95", "--set", "eval_every=5")
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"]["p"] == 7 and cfg["model"]["d_vocab"] == 8 and cfg["model"]["d_vocab_out"] == 7
    assert cfg["model"]["d_mlp"] == 32 and cfg["train"]["betas"] == [0.9, 0.95]


def test_show_config_lists_every_set_key_and_trains_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text, _ = run_cli(capsys, "train", "induction", "--set", "lr=3e-3", "--show-config")
    assert code == 0 and list(tmp_path.iterdir()) == []
    assert "task:\n  vocab=256\n  n_ctx=32" in text and "  lr=0.003" in text and "  target_accuracy=None" in text
    assert "  model.n_ctx=32" in text            # a model key shadowed by the task's n_ctx needs its prefix
    keys = {line.strip().split("=")[0].split(".")[-1] for line in text.splitlines() if line.startswith("  ")}
    assert set(ModelConfig().to_dict()) | set(TrainConfig().to_dict()) <= keys


def test_the_summary_says_when_the_target_was_first_reached(capsys, tmp_path):
    code, text, _ = run_cli(capsys, "train", "max", "--out", str(tmp_path / "a"), "--steps", "400", "--quiet",
                            "--set", "target_accuracy=0.9", "--set", "eval_every=50")
    step = int(text.split("first reached at step ")[1].split(";")[0])
    assert code == 0 and "training stopped there" in text and f"(step {step})" in text and step < 400
    code, text, _ = run_cli(capsys, "train", "max", "--out", str(tmp_path / "b"), "--steps", "20", "--quiet",
                            "--set", "eval_every=10")
    assert code == 0 and "accuracy 99% not reached (no --set target_accuracy; ran all 20 steps)" in text


def test_real_process_exit_code_and_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "qkov", "train", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.startswith("qkov: unknown task 'nope'. Known tasks: add, brackets, fib, histogram, induction, "
                               "max, min, modadd, reverse, sort.")
    assert p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr


def test_analyze_compare_prints_the_frequency_overlap(capsys, short_trained):
    """``qkov analyze ADD --compare FIB``: the two MLP models' neuron-input spectra overlap, as
    ``qkov.fourier.frequency_overlap`` computes it; an attention-only model gets one clear line."""
    from qkov.fourier import frequency_overlap

    add, fib, mx = short_trained("add", 30), short_trained("fib", 30), short_trained("max", 200)
    code, text, _ = run_cli(capsys, "analyze", str(add.path), "--compare", str(fib.path), "--json")
    cmp = json.loads(text)["compare"]
    assert code == 0 and cmp["task"] == "fib" and cmp["n_tokens"] == 128
    assert cmp["frequency_overlap"] == round(frequency_overlap(add.model, fib.model, n_tokens=128), 4)
    assert 0.0 < cmp["frequency_overlap"] <= 1.0
    code, text, _ = run_cli(capsys, "analyze", str(add.path), "--compare", str(fib.path))
    assert code == 0 and f"compared with {fib.path} (fib): neuron-input spectra overlap" in text
    code, _, err = run_cli(capsys, "analyze", str(add.path), "--compare", str(mx.path))
    assert code == 2 and err.count("\n") == 1 and "attention-only" in err, err
