"""Fourier analysis: planted signals come back exactly; a grokked modadd model looks like the paper's."""

from __future__ import annotations

import math

import pytest
import torch

import qkov
from qkov import fourier
from qkov.progress import gini, progress_measures


# ------------------------------------------------------------------- basis
@pytest.mark.parametrize("n", [1, 2, 7, 10, 23])
def test_basis_is_orthonormal_with_n_rows(n):
    B = fourier.fourier_basis(n)
    assert B.shape == (n, n)
    torch.testing.assert_close(B @ B.T, torch.eye(n, dtype=B.dtype))
    assert len(fourier.basis_names(n)) == n


def test_even_n_keeps_the_last_cosine():
    names = fourier.basis_names(10)
    assert names[-2:] == ["sin 4", "cos 5"]
    assert fourier.frequency_rows(5, 10) == [9]
    x = torch.cos(math.pi * torch.arange(10, dtype=torch.float64))        # (-1)^x, frequency 5
    coef = fourier.fft1d(x)
    assert coef[9].abs() == pytest.approx(math.sqrt(10))
    assert coef[:9].abs().max() < 1e-9


def test_fft2d_inverts_and_places_cos_times_sin():
    p = 11
    a = torch.arange(p, dtype=torch.float64)
    x = torch.cos(2 * math.pi * 3 * a / p)[:, None] * torch.sin(2 * math.pi * 4 * a / p)[None, :]
    c = fourier.fft2d(x)
    big = (c.abs() > 1e-9).nonzero().tolist()
    assert big == [[5, 8]]                                                  # cos 3 ⊗ sin 4
    B = fourier.fourier_basis(p)
    torch.testing.assert_close(B.T @ c @ B, x)


# ------------------------------------------------------------- planted neurons
def _planted_neurons(p: int, freqs: list[int]) -> torch.Tensor:
    a = torch.arange(p, dtype=torch.float64)[:, None]
    b = torch.arange(p, dtype=torch.float64)[None, :]
    acts = []
    for i, k in enumerate(freqs):
        w = 2 * math.pi * k / p
        acts.append(
            torch.cos(w * a) * torch.sin(w * b) + 0.5 * torch.cos(w * (a + b) + 0.3 * i)  # quadratic terms
            + 0.7 * torch.sin(w * b) - 0.2 * torch.cos(w * a) + 2.0                      # linear + constant
        )
    return torch.stack(acts, dim=-1)                                        # [p, p, m]


@pytest.mark.parametrize("p", [23, 24])
def test_planted_neurons_get_exactly_their_frequency(p):
    freqs = [1, 3, 7, 11, p // 2, p // 2]                                   # includes the last frequency
    nf = fourier.neuron_frequencies(_planted_neurons(p, freqs))
    assert nf.freq.tolist() == freqs
    torch.testing.assert_close(nf.fve, torch.ones(len(freqs), dtype=torch.float64))
    assert not nf.dead.any()


def test_mixed_and_dead_neurons():
    p = 23
    two = _planted_neurons(p, [2])[..., 0] + 0.5 * _planted_neurons(p, [5])[..., 0]   # mostly frequency 2
    acts = torch.stack([two, torch.full((p, p), 3.0)], dim=-1)
    nf = fourier.neuron_frequencies(acts)
    assert nf.freq.tolist() == [2, 0]
    assert 0.6 < float(nf.fve[0]) < 1.0
    assert nf.dead.tolist() == [False, True]


def test_key_frequencies_ignore_stray_neurons():
    p = 23
    acts = _planted_neurons(p, [4] * 20 + [9] * 12 + [6])                   # one stray neuron at 6
    assert fourier.key_frequencies(fourier.neuron_frequencies(acts)) == [4, 9]


# ------------------------------------------------------------- planted logits
def _trig_logits(p: int, terms: dict[int, float]) -> torch.Tensor:
    s = torch.arange(p, dtype=torch.float64)
    abc = s[:, None, None] + s[None, :, None] - s[None, None, :]
    return sum(alpha * torch.cos(2 * math.pi * k * abc / p) for k, alpha in terms.items())


def test_planted_logits_fve_restricted_and_excluded_loss():
    p = 23
    logits = _trig_logits(p, {4: 6.0, 9: 5.0})
    assert fourier.logit_fve(logits, [4, 9]) == pytest.approx(1.0)
    assert fourier.logit_fve(logits, [5]) == pytest.approx(0.0, abs=1e-12)
    assert 0.3 < fourier.logit_fve(logits, [4]) < 0.7
    full = fourier._loss(logits)
    everything = torch.ones(p, p, dtype=torch.bool)
    assert fourier.restricted_loss(logits, [4, 9]) == pytest.approx(full, rel=1e-9)
    assert fourier.excluded_loss(logits, [4, 9], everything) > 10 * full
    assert fourier.excluded_loss(logits, [4, 9], everything) == pytest.approx(math.log(p))  # nothing left
    # Removing an unused frequency changes nothing.
    assert fourier.excluded_loss(logits, [7], everything) == pytest.approx(full, rel=1e-9)


def test_sine_terms_count_too():
    p = 13
    s = torch.arange(p, dtype=torch.float64)
    abc = s[:, None, None] + s[None, :, None] - s[None, None, :]
    logits = 3 * torch.sin(2 * math.pi * 5 * abc / p)
    assert fourier.logit_fve(logits, [5]) == pytest.approx(1.0)


def test_bad_frequencies_and_tasks_are_clear_errors():
    with pytest.raises(qkov.QkovError, match=r"out of range for p=23; expected integers in 1..11"):
        fourier.logit_fve(torch.zeros(23, 23, 23), [12])
    model = qkov.Transformer(qkov.get_task("add").model_config())
    with pytest.raises(qkov.QkovError, match="needs a task indexed by residues mod p.*'add'"):
        fourier.neuron_grid(model, qkov.get_task("add"))
    with pytest.raises(qkov.QkovError, match="needs a task indexed by residues"):
        fourier.train_mask(qkov.get_task("fib"))


def test_the_analysis_over_z_p_follows_what_the_task_says_not_its_name():
    from qkov.tasks.arithmetic import ModAddTask

    class ModSum(ModAddTask):                     # a learner's own residue task, under another name
        name = "modsum"

    task = ModSum(p=7, train_frac=0.6)
    model = qkov.Transformer(task.model_config())
    assert fourier.mlp_summary(model, task)["kind"] == "fourier_zp"

    class Plain(ModAddTask):                      # the name alone does not make a residue task
        residue_modulus = None

    plain = Plain(p=7)
    assert plain.name == "modadd" and fourier.mlp_summary(model, plain)["kind"] == "token_spectrum"


def test_gini():
    assert gini(torch.ones(10)) == pytest.approx(0.0)
    assert gini(torch.tensor([0.0] * 9 + [1.0])) == pytest.approx(0.9)


# ------------------------------------------------ non-modular tasks: input spectra
def test_input_spectrum_finds_the_planted_period():
    """A model whose neuron-input map is cos(2π·8t/128) has all its power at k = 8 (period 16)."""
    cfg = qkov.ModelConfig(n_layers=1, n_heads=1, d_model=8, d_mlp=6, d_vocab=128, n_ctx=2)
    model = qkov.Transformer(cfg)
    t = torch.arange(128, dtype=torch.float32)
    with torch.no_grad():
        model.embed.W_E.zero_()
        model.embed.W_E[:, 0] = torch.cos(2 * math.pi * 8 * t / 128)
        model.embed.W_E[:, 1] = torch.sin(2 * math.pi * 3 * t / 128)
        attn = model.blocks[0].attn
        attn.W_V.zero_(), attn.W_O.zero_()
        attn.W_V[0, 0, 0] = attn.W_V[0, 1, 1] = 1.0
        attn.W_O[0, 0, 0] = attn.W_O[0, 1, 1] = 1.0
        model.blocks[0].mlp.W_in.zero_()
        model.blocks[0].mlp.W_in[0, :4] = 1.0                               # neurons 0-3 read the period-16 wave
        model.blocks[0].mlp.W_in[1, 4:] = 1.0                               # neurons 4-5 the period-43 one
    spec = fourier.neuron_input_spectrum(model, detrend=False)
    assert spec.dominant.tolist() == [8, 8, 8, 8, 3, 3]
    torch.testing.assert_close(spec.dominant_share, torch.ones(6, dtype=torch.float64))
    top = spec.top(2)
    assert [(r["k"], r["period"], r["neurons"]) for r in top] == [(8, 16.0, 4), (3, 42.667, 2)]
    assert top[0]["share"] == pytest.approx(4 / 6, abs=1e-3)
    assert fourier.frequency_overlap(spec, spec) == pytest.approx(1.0)
    other = qkov.Transformer(cfg, seed=1)
    assert 0.0 <= fourier.frequency_overlap(spec, other) < 0.5
    with pytest.raises(qkov.QkovError, match="different token ranges"):
        fourier.frequency_overlap(spec, fourier.neuron_input_spectrum(other, n_tokens=100))
    # A straight line in the token is not a period: detrending removes it and keeps the wave.
    with torch.no_grad():
        model.embed.W_E[:, 1] = t / 128                                     # neurons 4-5 now read a ramp
        model.embed.W_E[:, 0] += t / 32                                     # neurons 0-3: wave + ramp
    spec = fourier.neuron_input_spectrum(model)
    assert spec.dominant[:4].tolist() == [8, 8, 8, 8]
    assert spec.dominant_share[:4].min() > 0.99
    assert spec.linear_share[4:].min() == pytest.approx(1.0)
    assert 0.6 < float(spec.linear_share[0]) < 0.85                        # ramp variance 4/3, wave 1/2
    assert fourier.neuron_input_spectrum(model, detrend=False).dominant[:4].tolist() == [1, 1, 1, 1]


# ------------------------------------------------------------- a grokked model
@pytest.fixture(scope="session")
def grokked(small_modadd):
    """The reference suite's grokked p=23 run (``conftest.SMALL_MODADD``: Nanda et al.'s full-batch
    recipe with a float64 loss), trained once per session and shared with tests/test_reference.py."""
    return small_modadd.model, small_modadd.task


@pytest.mark.slow
def test_grokked_modadd_model_is_a_fourier_circuit(grokked):
    model, task = grokked
    s = fourier.mlp_summary(model, task)
    assert task.evaluate(model)["accuracy"] >= 0.99
    assert 2 <= len(s["key_frequencies"]) <= 7
    assert s["neurons"]["frac_fve_ge_0.85"] >= 0.8
    assert s["logit_fve"] >= 0.9
    assert s["restricted_loss"] < s["test_loss"]
    assert s["excluded_loss"] > 100 * s["test_loss"] and s["excluded_loss"] > 1.0


@pytest.mark.slow
def test_grokked_embedding_is_sparse_in_the_key_frequencies(grokked):
    model, task = grokked
    keys = fourier.mlp_summary(model, task)["key_frequencies"]
    from qkov.progress import embedding_fourier_norms

    norms = embedding_fourier_norms(model, task.p).pow(2)
    key_rows = [r for k in keys for r in fourier.frequency_rows(k, task.p)]
    assert float(norms[key_rows].sum() / norms.sum()) > 0.5


# ------------------------------------------------------------ progress measures
@pytest.fixture(scope="session")
def modadd_run(tmp_path_factory):
    task = qkov.get_task("modadd", p=13, train_frac=0.6)
    out = tmp_path_factory.mktemp("progress") / "run"
    cfg = task.train_config().replace(steps=60, eval_every=30, checkpoint_every=30)
    return qkov.train(task, out=out, model_config=task.model_config().replace(d_mlp=64), train_config=cfg, quiet=True)


def test_progress_measures_one_row_per_checkpoint(modadd_run):
    rows = progress_measures(modadd_run.path, modadd_run.task, key_freqs=[1, 5])
    assert [r["step"] for r in rows] == [0, 30, 60]
    assert rows[0]["key_frequencies"] == [1, 5]
    for r in rows:
        assert set(r) >= {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "restricted_loss",
                          "excluded_loss", "sum_sq_weights", "gini_embed_fourier"}
        assert 0 <= r["gini_embed_fourier"] < 1
    # The last row's losses are the trained model's own.
    final = modadd_run.task.evaluate(modadd_run.model)
    assert rows[-1]["test_loss"] == pytest.approx(final["loss"], rel=1e-4)
    assert rows[-1]["train_accuracy"] == pytest.approx(final["train_accuracy"])
    assert rows[-1]["sum_sq_weights"] == pytest.approx(
        sum(float(q.detach().double().pow(2).sum()) for q in modadd_run.model.parameters()), rel=1e-6
    )


def test_progress_measures_are_a_function_of_the_models(modadd_run):
    """(step, model) pairs give the rows the run directory gives; nothing in them reads a file."""
    from_dir = progress_measures(modadd_run.path, modadd_run.task)
    pairs = [(step, model) for step, model in qkov.store.checkpoints(modadd_run.path)]
    assert progress_measures(pairs, modadd_run.task, final_model=modadd_run.model) == from_dir
    assert progress_measures(iter(pairs), modadd_run.task) == from_dir          # last checkpoint = final
    keys = from_dir[0]["key_frequencies"]
    assert progress_measures(pairs[1:], modadd_run.task, key_freqs=keys) == [
        {k: v for k, v in r.items() if k != "key_frequencies"} | ({"key_frequencies": keys} if i == 0 else {})
        for i, r in enumerate(from_dir[1:])
    ]


def test_progress_measures_take_a_task_name(tmp_path):
    task = qkov.get_task("modadd")                                            # the reference p=113
    cfg = task.train_config().replace(steps=1, checkpoint_every=1, eval_every=1)
    run = qkov.train(task, out=tmp_path / "run", train_config=cfg, quiet=True)
    rows = progress_measures(run.path, "modadd", key_freqs=[4, 32])
    assert [r["step"] for r in rows] == [0, 1] and rows == progress_measures(run.path, task, key_freqs=[4, 32])


def test_progress_measures_errors(modadd_run, tmp_path):
    import shutil

    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(modadd_run.path / "config.json", empty / "config.json")
    with pytest.raises(qkov.QkovError, match="holds no step_N.safetensors checkpoints"):
        progress_measures(empty, modadd_run.task)

    mixed = tmp_path / "mixed"
    shutil.copytree(modadd_run.path, mixed)
    task = modadd_run.task
    other = qkov.train(task, out=tmp_path / "other", quiet=True,
                       model_config=task.model_config().replace(d_mlp=32),
                       train_config=task.train_config().replace(steps=1, checkpoint_every=1, eval_every=1))
    shutil.copy(other.path / "checkpoints" / "step_1.safetensors", mixed / "checkpoints" / "step_1.safetensors")
    with pytest.raises(qkov.QkovError, match="checkpoints mix architectures: checkpoints/step_1.safetensors has "
                                             "blocks.0.mlp.W_in \\(128, 32\\)"):
        progress_measures(mixed, task, key_freqs=[1])

    with pytest.raises(qkov.QkovError, match="needs a task indexed by residues"):
        progress_measures(modadd_run.path, qkov.get_task("add"))
    with pytest.raises(qkov.QkovError, match="progress_measures got no checkpoints"):
        progress_measures([], task)
