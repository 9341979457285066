"""Head detectors: hand-built patterns, a model with planted heads, TransformerLens agreement,
and the trained reference induction model's circuit (slow)."""

from __future__ import annotations

import math

import pytest
import torch

import qkov
from qkov import ModelConfig, QkovError, Transformer
from qkov.circuits import heads
from qkov.circuits.heads import (
    detection_pattern,
    detection_score,
    duplicate_token_scores,
    head_scores,
    induction_scores,
    previous_token_scores,
    repeated_random_tokens,
)


# ------------------------------------------------------------------ patterns by hand
def test_detection_patterns_on_a_small_sequence():
    tokens = torch.tensor([5, 7, 5, 7, 9])
    prev = detection_pattern(tokens, "previous_token")[0]
    assert prev.nonzero().tolist() == [[1, 0], [2, 1], [3, 2], [4, 3]]
    dup = detection_pattern(tokens, "duplicate_token")[0]
    assert dup.nonzero().tolist() == [[2, 0], [3, 1]]            # each repeat -> its first occurrence
    ind = detection_pattern(tokens, "induction")[0]
    assert ind.nonzero().tolist() == [[2, 1], [3, 2]]            # -> the token after the first occurrence


def test_perfect_and_uniform_heads():
    n = 6
    tokens = repeated_random_tokens(20, n // 2, n=1, seed=0)        # [x, x], 3 distinct tokens
    causal_uniform = torch.tril(torch.ones(n, n))
    causal_uniform /= causal_uniform.sum(-1, keepdim=True)
    for kind, offset in (("previous_token", 1), ("duplicate_token", n // 2), ("induction", n // 2 - 1)):
        det = detection_pattern(tokens, kind)
        perfect = torch.eye(n).roll(-offset, dims=1).tril()
        perfect[:offset] = causal_uniform[:offset]               # rows with no target: anything
        assert float(detection_score(perfect, det)) == pytest.approx(1.0)
        rows = [i for i in range(n) if i >= offset and (kind == "previous_token" or i >= n // 2)]
        expected = sum(1 / (i + 1) for i in rows) / len(rows)   # uniform over i + 1 keys
        assert float(detection_score(causal_uniform, det)) == pytest.approx(expected)


def test_detection_score_batches_over_heads():
    tokens = repeated_random_tokens(50, 4, n=3, seed=1)
    pattern = torch.rand(3, 2, 8, 8).tril()
    pattern /= pattern.sum(-1, keepdim=True)                      # [batch, head, q, k]
    score = detection_score(pattern, detection_pattern(tokens, "induction"))
    assert score.shape == (2,)
    by_hand = torch.stack([pattern[:, :, i, i - 3] for i in range(4, 8)]).mean((0, 1))
    assert torch.allclose(score, by_hand)


def test_repeated_random_tokens():
    t = repeated_random_tokens(64, 16, n=5, seed=3)
    assert t.shape == (5, 32) and t.dtype == torch.int64
    assert torch.equal(t[:, :16], t[:, 16:])
    assert all(len(set(row[:16].tolist())) == 16 for row in t)   # distinct within a copy
    assert torch.equal(t, repeated_random_tokens(64, 16, n=5, seed=3))
    assert torch.equal(t, repeated_random_tokens(64, 16, n=5, seed=torch.Generator().manual_seed(3)))
    small = repeated_random_tokens(3, 8, n=2, seed=0)            # vocab < half: with replacement
    assert small.shape == (2, 16) and int(small.max()) < 3


# --------------------------------------------------------- a model with planted heads
def planted_model(d_vocab: int = 10, n_ctx: int = 16) -> Transformer:
    """Two layers: L0H0 previous-token, L1H0 induction, L1H1 duplicate-token; L0H1 does nothing.

    Residual stream: [position one-hot | token one-hot | previous-token one-hot]. L0H0 attends
    from position i to i - 1 through W_pos and writes that token into the third block; L1H0
    matches the query's token against that block (induction, K-composition with L0H0); L1H1
    matches token against token and is pushed away from its own position.
    """
    T, V = n_ctx, d_vocab
    d_head = T + V
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=T + 2 * V, d_head=d_head, d_vocab=V, n_ctx=T)
    model = Transformer(cfg, seed=0)
    s = 30 * math.sqrt(d_head)                                   # logit gap 30 after 1/sqrt(d_head)
    pos, tok, prev = range(0, T), range(T, T + V), range(T + V, T + 2 * V)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[torch.arange(V), torch.tensor(tok)] = 1.0
        model.pos_embed.W_pos[torch.arange(T), torch.tensor(pos)] = 1.0
        model.unembed.W_U[torch.tensor(tok), torch.arange(V)] = 1.0
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        for p in pos:                                            # L0H0: query p -> key p - 1
            a0.W_Q[0, p, p] = s
            if p + 1 < T:
                a0.W_K[0, p, p + 1] = 1.0
        for t in range(V):                                       # ... copying that key's token
            a0.W_V[0, tok[t], t] = 1.0
            a0.W_O[0, t, prev[t]] = 1.0
        for t in range(V):                                       # L1H0: my token == key's previous token
            a1.W_Q[0, tok[t], t] = s
            a1.W_K[0, prev[t], t] = 1.0
        for p in pos:                                            # (position 0 has no previous token)
            a1.W_Q[0, p, V] = s
        a1.W_K[0, pos[0], V] = -1.0
        for t in range(V):                                       # L1H1: my token == key's token
            a1.W_Q[1, tok[t], t] = s
            a1.W_K[1, tok[t], t] = 1.0
        for p in pos:                                            # ... but not my own position
            a1.W_Q[1, p, V + p] = s
            a1.W_K[1, p, V + p] = -1.0
    return model


def test_planted_heads_score_one_where_planted():
    model = planted_model()
    scores = head_scores(model, seed=0, n=32)
    assert set(scores) == {"previous_token", "duplicate_token", "induction"}
    for kind, (layer, head) in (("previous_token", (0, 0)), ("induction", (1, 0)), ("duplicate_token", (1, 1))):
        s = scores[kind]
        assert s.shape == (2, 2)
        assert s[layer, head] > 0.999, (kind, s)
        others = [float(v) for i, v in enumerate(s.flatten()) if i != 2 * layer + head]
        assert max(others) < 0.5, (kind, s)
    # The single-kind functions agree with the combined pass.
    assert torch.equal(previous_token_scores(model, seed=0, n=32), scores["previous_token"])
    assert torch.equal(induction_scores(model, seed=0, n=32), scores["induction"])
    assert torch.equal(duplicate_token_scores(model, seed=0, n=32), scores["duplicate_token"])


def test_scores_read_as_diagonals_on_repeated_tokens():
    """On [x, x] with distinct tokens the detectors are the diagonals the docstring names."""
    model = Transformer(ModelConfig(n_layers=2, n_heads=3, d_model=24, d_vocab=40, n_ctx=20), seed=1)
    half = 10
    tokens = repeated_random_tokens(40, half, n=8, seed=2)
    _, cache = model.run_with_cache(tokens)
    pattern = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"] for l in range(2)])  # [L, b, h, q, k]
    prev = pattern.diagonal(-1, -2, -1).mean((1, 3))                                  # q = k + 1
    dup = pattern.diagonal(-half, -2, -1).mean((1, 3))                                # q = k + half
    ind = pattern.diagonal(-(half - 1), -2, -1)[..., 1:].mean((1, 3))                 # q = k + half - 1, q >= half
    scores = head_scores(model, tokens)
    torch.testing.assert_close(scores["previous_token"], prev)
    torch.testing.assert_close(scores["duplicate_token"], dup)
    torch.testing.assert_close(scores["induction"], ind)


def test_defaults_use_model_vocab_and_context(monkeypatch):
    model = Transformer(ModelConfig(n_layers=1, n_heads=2, d_model=16, d_vocab=30, n_ctx=13), seed=0)
    seen = []
    real = heads._patterns
    monkeypatch.setattr(heads, "_patterns", lambda m, t, L: seen.append(t) or real(m, t, L))
    induction_scores(model, n=7, seed=5)
    tokens = torch.cat(seen)
    assert tokens.shape == (7, 12) and int(tokens.max()) < 30     # half = n_ctx // 2
    assert torch.equal(tokens, repeated_random_tokens(30, 6, n=7, seed=5))


def test_chunking_does_not_change_scores(monkeypatch):
    model = Transformer(ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=50, n_ctx=16), seed=0)
    whole = head_scores(model, n=10, seed=0)
    monkeypatch.setattr(heads, "_PATTERN_BUDGET", 2 * 2 * 16 * 16 * 3)  # 3 sequences at a time
    chunked = head_scores(model, n=10, seed=0)
    for kind in whole:
        torch.testing.assert_close(chunked[kind], whole[kind])


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tokens=torch.zeros(1, 17, dtype=torch.long)), "longer than n_ctx=16"),
        (dict(tokens=torch.zeros(1, 4)), "integer ids"),
        (dict(tokens=torch.tensor([[1, 2, 30]])), r"0\.\.9"),
        (dict(tokens=torch.tensor([[1]])), "too short"),
        (dict(half=9), "half <= 8"),
        (dict(half=1), "at least 2"),
        (dict(vocab=11), "vocab <= 10"),
        (dict(n=0), "n=0"),
        (dict(seed=1.5), "seed"),
        (dict(kinds=("prev",)), "unknown head kind 'prev'"),
        (dict(tokens=torch.tensor([[1, 2, 3]]), half=2), "without tokens"),
        (dict(tokens=torch.tensor([[1, 2, 3, 4]]), kinds=("induction",)), "undefined"),
    ],
)
def test_bad_arguments_raise_qkov_error(kwargs, match):
    model = planted_model(d_vocab=10, n_ctx=16)
    with pytest.raises(QkovError, match=match):
        head_scores(model, **kwargs)


def test_not_a_model():
    with pytest.raises(QkovError, match="TransformerLens model"):
        previous_token_scores(object())


# ---------------------------------------------------------------- TransformerLens
def _tl_model(monkeypatch, tokens):
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(
        n_layers=2, n_heads=3, d_model=24, d_head=8, d_vocab=7, n_ctx=20, attn_only=True,
        act_fn="relu", normalization_type=None, seed=0,
    )
    model = tl.HookedTransformer(cfg)
    with torch.no_grad():
        for block in model.blocks:                                # sharper patterns than the init's
            block.attn.W_Q.mul_(4.0)
    # detect_head tokenizes its string prompt; this model has no tokenizer, so hand it ours.
    monkeypatch.setattr(model, "to_tokens", lambda *args, **kwargs: tokens)
    return model


def test_detection_patterns_match_transformer_lens():
    hd = pytest.importorskip("transformer_lens.head_detector")
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens = torch.randint(0, 5, (1, 15), generator=gen)     # small vocab: many repeats
        for kind in ("previous_token", "duplicate_token", "induction"):
            theirs = getattr(hd, f"get_{kind}_head_detection_pattern")(tokens)
            assert torch.equal(detection_pattern(tokens, kind)[0], theirs.bool()), kind


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated")
def test_scores_match_transformer_lens_detect_head(monkeypatch):
    """detect_head ("mul") divides by every query row; ours by the rows that have a target."""
    hd = pytest.importorskip("transformer_lens.head_detector")
    tokens = torch.randint(0, 7, (1, 16), generator=torch.Generator().manual_seed(1))
    model = _tl_model(monkeypatch, tokens)
    ours = head_scores(model, tokens)
    for kind in ("previous_token", "duplicate_token", "induction"):
        theirs = hd.detect_head(model, "(tokens)", f"{kind}_head")
        rows = int(detection_pattern(tokens, kind).any(-1).sum())
        torch.testing.assert_close(ours[kind] * rows / tokens.shape[1], theirs.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated")
def test_transformer_lens_and_qkov_models_score_alike(monkeypatch):
    tokens = repeated_random_tokens(7, 3, n=4, seed=0)
    tl_model = _tl_model(monkeypatch, tokens)
    model = Transformer(ModelConfig(n_layers=2, n_heads=3, d_model=24, d_head=8, d_vocab=7, n_ctx=20), seed=0)
    model.load_state_dict(tl_model.state_dict())
    for kind, theirs in head_scores(tl_model, seed=4, n=5).items():
        torch.testing.assert_close(head_scores(model, seed=4, n=5)[kind], theirs)


# ------------------------------------------------------- the reference induction model
@pytest.mark.slow
def test_reference_induction_model_forms_an_induction_circuit(trained):
    run = trained("induction")
    model = run.model
    prev = previous_token_scores(model, seed=0, n=256)           # on [x, x], x random, half = n_ctx // 2
    ind = induction_scores(model, seed=0, n=256)
    assert prev[0].max() > 0.7, prev
    assert ind[1].max() > 0.7, ind
    prev_head = int(prev[0].argmax())
    k = qkov.circuits.composition_scores(model, "K")              # [L, H, L, H]
    l1, h1, l2, h2 = (int(i) for i in torch.unravel_index(k.argmax(), k.shape))
    assert (l1, h1) == (0, prev_head), (k, prev)
    assert l2 == 1
    # The loss on the repeated part is far below (< 1/5 of) the loss on the rest, in the task's
    # own data and on [x, x] (measured, seed 0: 0.45 vs 5.82 and 0.56 vs 5.79 nats).
    final = run.final
    assert final["loss"] < 0.2 * final["loss_rest"], final
    rep = final["repeated"]
    assert rep["loss"] < 0.2 * rep["loss_first_half"], rep


def test_analyze_names_a_previous_token_or_induction_head_only_when_one_is_there():
    """An untrained two-layer model has no previous-token or induction head: analyze says so
    with the highest score, instead of naming the best of the random heads as one."""
    task = qkov.get_task("induction")
    model = Transformer(task.model_config(), seed=0)
    found = {f.id: f for f in qkov.analyze(model, task, checks=False).findings}
    for kind, words in (("previous_token", "a previous-token head"), ("induction", "an induction head")):
        assert found[kind].value < 0.5
        assert found[kind].text.startswith("No head") and f"is {words}: the highest score is" in found[kind].text


def test_accuracy_finding_names_the_weakest_group_of_any_breakdown(monkeypatch):
    task = qkov.get_task("max")
    model = Transformer(task.model_config(), seed=0)
    by_kind = {"random": {"accuracy": 0.99, "loss": 0.1, "n": 10}, "flipped": {"accuracy": 0.5, "loss": 1.0, "n": 10}}
    monkeypatch.setattr(type(task), "evaluate", lambda self, m: {"accuracy": 0.7, "loss": 0.5, "by_kind": by_kind})
    text = qkov.analyze(model, task, checks=False).findings[0].text
    assert text == "Accuracy 70.00% overall; lowest at kind flipped: 50.00%."
