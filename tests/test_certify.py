"""Certified accuracy: the tables rebuild the forward, brute force is the exact accuracy, and every
proof is sound (a bound never beats brute force; every input a proof certifies is one the model
gets right; the cases cover every input once), on generated tables, random and trained models."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkov
from qkov.certify import Tables, brute_force, case_counts, cubic, subcubic, tables
from qkov.certify.brute import all_inputs, right
from qkov.certify.cases import case_of
from qkov.cli import main


def with_biases(model: qkov.Transformer, seed: int, scale: float = 0.3) -> qkov.Transformer:
    """``model`` with every bias drawn at random (the reference init leaves them at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def small_model(seed: int, d_vocab: int = 6, n_ctx: int = 5, **cfg) -> qkov.Transformer:
    config = qkov.ModelConfig(n_layers=1, n_heads=1, d_model=8, d_vocab=d_vocab, n_ctx=n_ctx, **cfg)
    return with_biases(qkov.Transformer(config, seed=seed), seed)


def forward_right(model, tokens: torch.Tensor, tie: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """``(right, clear)``: the float64 forward's max-token logit beats every other, and by more than ``tie``."""
    with torch.no_grad():
        logits = model.double()(tokens)[:, -1]
    model.float()
    m = tokens.max(1).values
    top = logits.gather(1, m[:, None])[:, 0]
    others = logits.scatter(1, m[:, None], -torch.inf).amax(1)
    return others < top, (top - others).abs() > tie


def assert_exact(t: Tables, exact) -> None:
    """Brute force's wrong inputs are those ``right`` rejects (inputs within rounding of a tie aside)."""
    X = all_inputs(t.d_vocab, t.length)
    logits = t.logits(X)
    m = X.max(1).values
    gap = logits.gather(1, m[:, None])[:, 0] - logits.scatter(1, m[:, None], -torch.inf).amax(1)
    tie = gap.abs() <= 1e-9 * max(t.logit_scale, 1e-300)
    flat = torch.zeros(len(X), dtype=torch.bool)                  # inputs brute force calls wrong
    powers = t.d_vocab ** torch.arange(t.length - 1, -1, -1)
    flat[(exact.wrong_inputs * powers).sum(1)] = True
    assert torch.equal(flat[~tie], ~right(t, X)[~tie])
    assert abs(exact.correct - int(right(t, X).sum())) <= int(tie.sum())


def assert_sound(t: Tables, proof) -> None:
    """Every input certified is right, the count is what ``certifies`` says, the bound <= exact."""
    X = all_inputs(t.d_vocab, t.length)
    ok, cert = right(t, X), proof.certifies(X)
    assert not (cert & ~ok).any(), X[cert & ~ok][:5]
    assert proof.certified == int(cert.sum())
    assert proof.bound <= brute_force(t).accuracy


# ----------------------------------------------------------------- tables and brute force
@pytest.mark.parametrize("seed", range(3))
def test_tables_rebuild_the_forward_with_biases(seed):
    model = small_model(seed, d_vocab=7)
    for n in range(1, 6):
        X = all_inputs(7, n)
        with torch.no_grad():
            want = model.double()(X)[:, -1]
        model.float()
        assert torch.allclose(tables(model, n).logits(X), want, atol=1e-10, rtol=1e-10)


def test_brute_force_is_the_forwards_accuracy_on_every_input():
    for seed in range(4):
        model = small_model(seed)
        for n in range(1, 6):
            t, X = tables(model, n), all_inputs(6, n)
            fwd, clear = forward_right(model, X)
            assert torch.equal(right(t, X)[clear], fwd[clear])
            exact = brute_force(t)
            assert_exact(t, exact)
            assert int(exact.wrong.sum()) == exact.total - exact.correct == len(exact.wrong_inputs)


@pytest.mark.parametrize("d_vocab,length", [(1, 1), (2, 1), (3, 2), (4, 3), (5, 4), (3, 6)])
def test_the_cases_hold_every_input_once(d_vocab, length):
    counts, pure = case_counts(d_vocab, length)
    assert int(counts.sum() + pure.sum()) == d_vocab ** length
    m, q, k, c = case_of(all_inputs(d_vocab, length))
    seen = torch.zeros_like(counts)
    seen_pure = torch.zeros_like(pure)
    rest = k >= 0
    one = torch.ones(len(m), dtype=torch.long)
    seen.index_put_((m[rest], q[rest], k[rest], c[rest]), one[rest], accumulate=True)
    seen_pure.index_put_((m[~rest], q[~rest]), one[~rest], accumulate=True)
    assert torch.equal(seen, counts) and torch.equal(seen_pure, pure)


# ----------------------------------------------------------------- soundness on generated tables
@st.composite
def max_like_tables(draw) -> Tables:
    """Tables of a model that is more or less a max model: attention grows with the key token
    (slope ``beta``), the OV circuit copies (``gamma``), plus noise; a few extra outputs."""
    V, n, e = draw(st.integers(2, 7)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    beta, gamma = draw(st.floats(0, 4)), draw(st.floats(0, 12))
    noise, extra = draw(st.floats(0, 2)), draw(st.integers(0, 2))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64) * noise  # noqa: E731
    A, B = r(V, e), r(V, e)
    A[:, 0] += 1
    B[:, 0] += beta * torch.arange(V, dtype=torch.float64)
    EVOU = r(V, V + extra)
    EVOU[:, :V] += gamma * torch.eye(V, dtype=torch.float64)
    return Tables(n, A @ B.T, r(V, n), EVOU, r(n, V + extra) / 2, r(V, V + extra) / 2,
                  attn_scale=draw(st.sampled_from([1.0, 2.0])), EQKE_factors=(A, B))


def check_generated(t: Tables) -> None:
    assert_exact(t, brute_force(t))
    for proof in (cubic(t), cubic(t, windows=()), subcubic(t)):
        assert_sound(t, proof)
    counts, pure = case_counts(t.d_vocab, t.length)
    assert int(counts.sum() + pure.sum()) == t.inputs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_like_tables())
def test_proofs_are_sound_on_generated_tables(t):
    check_generated(t)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_like_tables())
def test_proofs_are_sound_on_hundreds_of_generated_tables(t):
    check_generated(t)


def test_a_clean_max_circuit_is_certified_in_full():
    V, n = 6, 4
    A, B = torch.ones(V, 1, dtype=torch.float64), 6.0 * torch.arange(V, dtype=torch.float64)[:, None]
    zeros = torch.zeros
    t = Tables(n, A @ B.T, zeros(V, n, dtype=torch.float64), 20 * torch.eye(V, dtype=torch.float64),
               zeros(n, V, dtype=torch.float64), zeros(V, V, dtype=torch.float64), 1.0, EQKE_factors=(A, B))
    assert brute_force(t).accuracy == 1.0
    assert cubic(t).bound == 1.0
    assert 0.5 < subcubic(t).bound <= 1.0


# ----------------------------------------------------------------- certify: API, errors, JSON
def test_certify_reports_each_length():
    task = qkov.get_task("max", vocab=5, min_len=2, max_len=4)
    model = with_biases(qkov.Transformer(task.model_config(), seed=1), 1)
    cert = qkov.certify(model, task)
    d = json.loads(json.dumps(cert.to_dict()))
    assert d["task"] == task.to_dict() and sorted(d["lengths"]) == ["2", "3", "4"]
    four = d["lengths"]["4"]
    assert four["inputs"] == 5 ** 4 and set(four["bounds"]) == {"cubic", "subcubic"}
    assert set(four["flops"]) == set(four["seconds"]) == {"tables", "brute_force", "cubic", "subcubic"}
    assert all(b <= four["exact"] for b in four["bounds"].values())
    lost = sum(r["uncertified"] for r in four["failing_cases"])
    assert lost == four["inputs"] - four["certified"]["cubic"]
    assert all(set(r) == {"max", "query", "uncertified", "inputs", "wrong"} for r in four["failing_cases"])
    only = qkov.certify(model, task, length=3, exact_limit=0)
    assert list(only.lengths) == [3] and only[3].exact is None and "not computed" in only.format()
    bare = qkov.certify(model, length=2)          # no task: the answer is the max, any length
    assert bare[2].bounds == cert[2].bounds


@pytest.mark.parametrize("cfg,what", [
    (dict(n_layers=2), "n_layers=2"), (dict(d_mlp=16), "an MLP"), (dict(normalization="LN"), "LayerNorm"),
    (dict(n_heads=2), "n_heads=2"),
])
def test_models_the_proofs_do_not_fit_get_one_line(cfg, what):
    model = qkov.Transformer(qkov.ModelConfig(d_model=8, d_vocab=5, n_ctx=3, **cfg))
    with pytest.raises(qkov.QkovError, match="1-layer, 1-head, attention-only") as e:
        qkov.certify(model, qkov.get_task("max", vocab=5, max_len=3))
    assert what in str(e.value) and "\n" not in str(e.value)


def test_tasks_without_an_answer_rule_and_bad_arguments_get_one_line():
    model = qkov.Transformer(qkov.ModelConfig(d_model=8, d_vocab=8, n_ctx=3))
    with pytest.raises(qkov.QkovError, match="task 'add' cannot be certified"):
        qkov.certify(model, qkov.get_task("add", max_sum=7))
    task = qkov.get_task("max", vocab=8, max_len=3)
    with pytest.raises(qkov.QkovError, match="length=5 is not one the task scores; pass one of 2, 3"):
        qkov.certify(model, task, length=5)
    with pytest.raises(qkov.QkovError, match="unknown proof"):
        qkov.certify(model, task, proofs=("quartic",))


def test_cli_certify(tmp_path, capsys):
    task = qkov.get_task("max", vocab=6, min_len=3, max_len=3)
    qkov.train(task, out=tmp_path / "max", train_config=task.train_config().replace(steps=2, eval_every=1),
               quiet=True)
    assert main(["certify", str(tmp_path / "max"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert list(d["lengths"]) == ["3"] and d["lengths"]["3"]["inputs"] == 216
    assert main(["certify", str(tmp_path / "max"), "--length", "3"]) == 0
    assert "length 3: 216 inputs" in capsys.readouterr().out
    assert main(["certify", str(tmp_path / "max"), "--length", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkov: length=4") and err.count("\n") == 1


# ----------------------------------------------------------------- trained models (slow)
@pytest.mark.slow
def test_max_of_4_bounds_beside_its_exact_accuracy(trained):
    run = trained("max", min_len=4, max_len=4)
    t = tables(run.model, 4)
    exact = brute_force(t)
    assert exact.accuracy > 0.999
    sample = torch.randint(0, 64, (200_000, 4), generator=torch.Generator().manual_seed(0))
    fwd, clear = forward_right(run.model, sample)
    assert torch.equal(right(t, sample)[clear], fwd[clear])          # brute force's rule is the forward's
    with torch.no_grad():
        f32 = run.model(sample)[:, -1].argmax(-1) == sample.max(1).values
    assert (f32 == fwd)[clear].float().mean() > 0.9999
    wrong_fwd, _ = forward_right(run.model, exact.wrong_inputs)
    assert not wrong_fwd.any()                                      # the inputs it calls wrong are wrong
    for proof in (cubic(t), subcubic(t)):
        assert proof.bound <= exact.accuracy
        assert not proof.certifies(exact.wrong_inputs).any()        # nothing wrong is certified
    assert cubic(t).bound > exact.accuracy - 0.02
    assert subcubic(t).bound > 0.5


@pytest.mark.slow
def test_reference_max_is_certified_at_every_length(trained):
    run = trained("max")
    cert = qkov.certify(run)
    assert sorted(cert.lengths) == [2, 3, 4, 5, 6]
    for n, c in cert.lengths.items():
        assert (c.exact is not None) == (n <= 4)
        assert c.bounds["cubic"] > 0.95 and c.bounds["subcubic"] > 0.5
        if c.exact is not None:
            assert all(b <= c.exact for b in c.bounds.values())
    for n in (5, 6):                                                 # past brute force: a large sample
        t = tables(run.model, n)
        sample = torch.randint(0, 64, (100_000, n), generator=torch.Generator().manual_seed(n))
        fwd, _ = forward_right(run.model, sample)
        for proof in (cubic(t), subcubic(t)):
            assert not (proof.certifies(sample) & ~fwd).any()


def perturbed(model: qkov.Transformer, scale: float, seed: int) -> qkov.Transformer:
    copy = qkov.Transformer(model.cfg)
    copy.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    return copy


@pytest.mark.slow
def test_proofs_are_sound_on_perturbed_trained_models(trained):
    base = trained("max", min_len=4, max_len=4).model

    @settings(max_examples=25, deadline=None)
    @given(st.floats(0, 0.6), st.integers(0, 2**31), st.sampled_from([2, 3]))
    def check(scale, seed, n):
        t = tables(perturbed(base, scale, seed), n)
        exact = brute_force(t)
        for proof in (cubic(t), subcubic(t)):
            assert proof.bound <= exact.accuracy
            assert not proof.certifies(exact.wrong_inputs).any()

    check()


@pytest.mark.slow
def test_tables_of_a_transformer_lens_model():
    import transformer_lens as tl

    cfg = tl.HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=8, n_heads=1, d_vocab=6,
                                     attn_only=True, normalization_type=None, seed=0)
    model = tl.HookedTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "b_" in name:
                p.copy_(torch.randn(p.shape) * 0.3)
    X = all_inputs(6, 4)
    with torch.no_grad():
        want = model.to(torch.float64)(X)[:, -1]
    assert torch.allclose(tables(model, 4).logits(X), want, atol=1e-10)


@pytest.mark.slow
def test_the_report_of_a_max_model_has_certified_accuracy(trained):
    from qkov.report import gather, sections

    data = gather(trained("max"))
    c = data.certified
    assert c.lengths == [2, 3, 4, 5, 6] and c.exact[3] is None and len(c.lost) == 5
    assert all(b <= e for b, e in zip(c.bounds["cubic"][:3], c.exact[:3]))
    secs = {s.id: s for s in sections(data)}
    assert [name for name, _ in secs["certified"].figures] == ["certified-bounds", "proof-losses"]
