"""qkov.circuits on qkov models: circuits equal their dense einsum formulas, scores behave."""

import math

import pytest
import torch

import qkov.circuits as C
from qkov.config import ModelConfig
from qkov.errors import QkovError
from qkov.model import Transformer


def random_model(seed=0, **cfg):
    """A float64 qkov model with random weights, biases and LayerNorm parameters."""
    base = dict(n_layers=2, n_heads=3, d_model=8, d_head=4, d_vocab=12, n_ctx=5)
    model = Transformer(ModelConfig(**{**base, **cfg}), seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.split(".")[-1].startswith("W_"):              # biases and LN w, b
                p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def close(x, y, tol=1e-10):
    torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def model():
    return random_model(d_vocab_out=10)                               # non-square vocabularies


def test_qk_and_ov_in_the_residual_basis(model):
    w = C.weights(model)
    close(C.qk(model, 1, 2).AB, w.W_Q[1, 2] @ w.W_K[1, 2].T)
    close(C.ov(model, 0, 1).AB, w.W_V[0, 1] @ w.W_O[0, 1])
    # With biases, [x, 1] is an affine map of x: the constant-1 coordinate carries b_Q, b_K, b_V.
    x, y = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    x1, y1 = C.full._with_one(x), C.full._with_one(y)
    q, k = x @ w.W_Q[1, 2] + w.b_Q[1, 2], y @ w.W_K[1, 2] + w.b_K[1, 2]
    close(x1 @ C.qk(model, 1, 2, include_bias=True).AB @ y1.T, q @ k.T)
    out = x1 @ C.ov(model, 0, 1, include_bias=True).AB
    close(out[:, :-1], (x @ w.W_V[0, 1] + w.b_V[0, 1]) @ w.W_O[0, 1])
    close(out[:, -1], torch.zeros(3, dtype=torch.float64))           # a head's output adds 0 to the 1


def test_full_circuits_equal_einsum(model):
    w = C.weights(model)
    E, P, U = w.W_E, w.W_pos, w.W_U
    ov = torch.einsum("vd,de,ef,fu->vu", E + P[3], w.W_V[1, 0], w.W_O[1, 0], U)
    fo = C.full_ov(model, 1, 0, pos=3)
    assert fo.shape == (12, 10) and fo.mdim == 4
    close(fo.AB, ov)
    close(C.full_ov(model, 1, 0).AB, E @ w.W_V[1, 0] @ w.W_O[1, 0] @ U)
    close(C.full_ov(model, torch.tensor(1), 0).AB, C.full_ov(model, 1, 0).AB)   # 0-d int tensors index too
    close(C.full_ov(model, 1, 0, include_bias=True).AB, (E @ w.W_V[1, 0] + w.b_V[1, 0]) @ w.W_O[1, 0] @ U)
    qk = torch.einsum("vd,de,fe,uf->vu", E + P[4], w.W_Q[0, 2], w.W_K[0, 2], E + P[1])
    close(C.full_qk(model, 0, 2, q_pos=4, k_pos=1).AB, qk)
    close(C.full_qk(model, 0, 2).AB, E @ w.W_Q[0, 2] @ w.W_K[0, 2].T @ E.T)
    qb = (E + P[4]) @ w.W_Q[0, 2] + w.b_Q[0, 2]
    kb = (E + P[1]) @ w.W_K[0, 2] + w.b_K[0, 2]
    close(C.full_qk(model, 0, 2, 4, 1, include_bias=True).AB, qb @ kb.T)
    close(C.positional_qk(model, 1, 1).AB, P @ w.W_Q[1, 1] @ w.W_K[1, 1].T @ P.T)
    close(C.direct_path(model).AB, E @ U)
    close(C.direct_path(model, pos=2, include_bias=True).AB, (E + P[2]) @ U + w.b_U)
    virt = E @ w.W_V[0, 1] @ w.W_O[0, 1] @ w.W_V[1, 2] @ w.W_O[1, 2] @ U
    vo = C.virtual_ov(model, (0, 1), (1, 2))
    assert vo.shape == (12, 10) and vo.mdim == 4
    close(vo.AB, virt)


def test_qk_terms_add_up_to_the_models_attention_scores():
    # One layer, no LayerNorm: layer-0 scores are exactly the position-aware full QK circuit.
    model = random_model(seed=3, n_layers=1)
    tokens = torch.tensor([[3, 7, 1, 7, 0]])
    _, cache = model.run_with_cache(tokens)
    scores = cache["blocks.0.attn.hook_attn_scores"][0]              # [head, q, k]
    for head in range(3):
        for q, k in [(0, 0), (4, 1), (3, 3), (2, 0)]:
            terms = C.qk_terms(model, 0, head, q, k, include_bias=True, scaled=True)
            full = C.full_qk(model, 0, head, q, k, include_bias=True).AB / math.sqrt(4)
            close(terms.total(), full)
            close(terms.total()[tokens[0, q], tokens[0, k]], scores[head, q, k])
    # Without biases the four terms are the four products of (token + position).
    w = C.weights(model)
    t = C.qk_terms(model, 0, 1, 2, 1)
    M = w.W_Q[0, 1] @ w.W_K[0, 1].T
    close(t.pos_pos, w.W_pos[2] @ M @ w.W_pos[1])
    close(t.tok_pos, w.W_E @ M @ w.W_pos[1])
    close(t.pos_tok, w.W_pos[2] @ M @ w.W_E.T)
    close(t.tok_tok.AB, w.W_E @ M @ w.W_E.T)


def test_positions_are_optional_everywhere_as_in_full_qk(model):
    # One convention: q_pos / k_pos default to None (no positional embedding), in every function.
    for q, k in [(None, None), (3, None), (None, 2), (3, 2)]:
        for bias in (False, True):
            terms = C.qk_terms(model, 1, 0, q_pos=q, k_pos=k, include_bias=bias)
            close(terms.total(), C.full_qk(model, 1, 0, q_pos=q, k_pos=k, include_bias=bias).to_dense())
    assert float(C.qk_terms(model, 0, 0).pos_pos) == 0.0
    close(C.key_rank_correlation(model, 1, 0), C.key_rank_correlation(model, 1, 0, None, None))
    with pytest.raises(QkovError, match="k_pos=3 comes after q_pos=1"):
        C.qk_terms(model, 0, 0, q_pos=1, k_pos=3)


@pytest.mark.parametrize("cfg", [dict(), dict(normalization="LN", d_mlp=16), dict(d_mlp=16, d_vocab_out=10)])
def test_logit_attribution_adds_up_to_the_logits(cfg):
    model = random_model(seed=1, **cfg)
    tokens = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(0))
    att = C.logit_attribution(model, tokens)
    close(att.logits, model(tokens))
    close(att.total(), att.logits, tol=1e-9)
    L, H = 2, 3
    assert att.heads.shape == (3, 5, L, H, model.cfg.vocab_out)
    assert att.mlps.shape == (3, 5, L if model.cfg.d_mlp else 0, model.cfg.vocab_out)


def test_a_last_layer_heads_term_is_what_ablating_it_removes():
    model = random_model(seed=2)                                      # attention-only: nothing reads it after
    tokens = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(1))
    att = C.logit_attribution(model, tokens)
    with torch.no_grad():
        model.blocks[1].attn.W_O[2].zero_()
    close(model(tokens), att.logits - att.heads[:, :, 1, 2], tol=1e-9)


def copying_model(sign=1.0):
    """d_head = d_model, W_V = W_O = ±I, W_U = W_Eᵀ: the full OV circuit is ±W_E W_Eᵀ."""
    model = random_model(seed=4, n_layers=1, n_heads=2, d_model=6, d_head=6, d_vocab=9)
    with torch.no_grad():
        attn = model.blocks[0].attn
        attn.W_V[0].copy_(torch.eye(6))
        attn.W_O[0].copy_(sign * torch.eye(6))
        model.unembed.W_U.copy_(model.embed.W_E.T)
    return model


def test_copying_scores_equal_dense_eigenvalues(model):
    scores = C.copying_scores(model)
    assert scores.shape == (2, 3)
    for l in range(2):
        for h in range(3):
            dense = C.full_ov(model, l, h).AB[:10, :10]               # the shared tokens
            lam = torch.linalg.eigvals(dense)
            close(scores[l, h], lam.sum().real / lam.abs().sum(), tol=1e-8)
    pos = C.copying_scores(model, pos=2)
    lam = torch.linalg.eigvals(C.full_ov(model, 1, 1, pos=2).AB[:10, :10])
    close(pos[1, 1], lam.sum().real / lam.abs().sum(), tol=1e-8)


def test_a_copying_head_scores_one_and_an_anticopying_head_minus_one():
    assert C.copying_scores(copying_model(1.0))[0, 0].item() == pytest.approx(1.0, abs=1e-9)
    assert C.copying_scores(copying_model(-1.0))[0, 0].item() == pytest.approx(-1.0, abs=1e-9)
    stats = C.ov_self_stats(copying_model(1.0), 0, 0)
    assert stats["top1"].item() > 0.5 and stats["top5"].item() == 1.0  # W_E W_Eᵀ favours the diagonal


def test_ov_self_stats_equal_dense_ranks(model):
    stats = C.ov_self_stats(model, ks=(1, 2, 5))
    assert set(stats) == {"top1", "top2", "top5"} and stats["top1"].shape == (2, 3)
    for l in range(2):
        for h in range(3):
            M = C.full_ov(model, l, h).AB[:10]                        # rows: shared source tokens
            rank = (M > M.diagonal()[:, None]).sum(-1)
            for k in (1, 2, 5):
                assert stats[f"top{k}"][l, h].item() == pytest.approx((rank < k).double().mean().item())
    one = C.ov_self_stats(model, 1, 2, ks=(1,))
    assert one["top1"].ndim == 0 and one["top1"] == stats["top1"][1, 2]


def spearman(x, y):
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry) / (rx.norm() * ry.norm())


def test_key_rank_correlation_equals_dense_spearman(model):
    M = C.full_qk(model, 1, 0, q_pos=3, k_pos=2).AB
    per = C.key_rank_correlation(model, 1, 0, 3, 2, per_query=True)
    ref = torch.stack([spearman(torch.arange(12.0), row) for row in M])
    close(per, ref)
    close(C.key_rank_correlation(model, 1, 0, 3, 2), ref.mean())
    toks = [2, 5, 6, 9]
    sub = C.key_rank_correlation(model, 1, 0, 3, 2, per_query=True, tokens=toks)
    close(sub, torch.stack([spearman(torch.arange(4.0), M[t, toks]) for t in toks]))


def test_key_rank_correlation_is_one_when_scores_grow_with_the_key():
    model = random_model(seed=5, n_layers=1, n_heads=1, d_model=4, d_head=4, d_vocab=7)
    with torch.no_grad():
        u = torch.tensor([1.0, 0.5, -0.5, 0.25], dtype=torch.float64)
        model.embed.W_E.copy_((torch.arange(7.0, dtype=torch.float64) + 1)[:, None] * u)
        model.pos_embed.W_pos.zero_()
        model.blocks[0].attn.W_Q[0].copy_(torch.eye(4))
        model.blocks[0].attn.W_K[0].copy_(torch.eye(4))
    assert C.key_rank_correlation(model, 0, 0, 2, 0).item() == pytest.approx(1.0)
    with torch.no_grad():
        model.blocks[0].attn.W_K[0].mul_(-1)
    assert C.key_rank_correlation(model, 0, 0, 2, 0).item() == pytest.approx(-1.0)


def test_composition_scores_equal_the_dense_formula(model):
    w = C.weights(model)
    fro = torch.linalg.matrix_norm
    for mode in "QKV":
        scores = C.composition_scores(model, mode)
        assert scores.shape == (2, 3, 2, 3)
        assert torch.all(scores[1] == 0) and torch.all(scores[0, :, 0] == 0)   # only earlier -> later
        for h1 in range(3):
            for h2 in range(3):
                A = w.W_V[0, h1] @ w.W_O[0, h1]
                B = {"Q": w.W_Q[1, h2] @ w.W_K[1, h2].T, "K": w.W_K[1, h2] @ w.W_Q[1, h2].T,
                     "V": w.W_V[1, h2] @ w.W_O[1, h2]}[mode]
                close(scores[0, h1, 1, h2], fro(A @ B) / (fro(A) * fro(B)))


def test_composition_baseline_subtracts_the_random_score(model):
    raw = C.composition_scores(model, "K")
    base = C.random_baseline(8, 4, seed=7)
    assert 0 < base < 1 and base == C.random_baseline(8, 4, seed=7) != C.random_baseline(8, 4, seed=8)
    adj = C.composition_scores(model, "K", baseline=True, seed=7)
    close(adj[0, :, 1], raw[0, :, 1] - base, tol=1e-6)
    assert torch.all(adj[1] == 0) and torch.all(adj[0, :, 0] == 0)
    # Unrelated random heads score about the baseline, so the adjusted scores centre near 0.
    big = random_model(seed=9, n_layers=2, n_heads=8, d_model=32, d_head=4)
    assert abs(C.composition_scores(big, "Q", baseline=True)[0, :, 1].mean().item()) < 0.05


def test_weights_of_a_layernorm_model_reproduce_its_logits_through_the_scale():
    model = random_model(seed=6, normalization="LN", n_layers=1, d_mlp=None)
    w = C.weights(model, center_unembed=False)
    assert w.folded and w.normalization == "LN"
    close(w.W_E.mean(-1), torch.zeros(12, dtype=torch.float64))      # centred writers
    close(w.W_Q.mean(-2), torch.zeros(1, 3, 4, dtype=torch.float64))  # centred readers
    centred = C.weights(model)
    close(centred.W_U.mean(-1), torch.zeros(8, dtype=torch.float64))
    assert C.weights(centred) is centred


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: C.full_ov(m, 2, 0),
         r"layer=2 is out of range: this model has n_layers=2, so layer must be in 0\.\.1"),
        (lambda m: C.qk(m, 0, 3), r"head=3 is out of range: this model has n_heads=3, so head must be in 0\.\.2"),
        (lambda m: C.full_ov(m, 0, -1), r"head=-1 is out of range"),
        (lambda m: C.full_ov(m, 0.5, 0), r"layer=0.5 must be an integer in 0\.\.1"),
        (lambda m: C.full_ov(m, 0, 0, pos=5),
         r"pos=5 is out of range: this model has n_ctx=5, so pos must be in 0\.\.4"),
        (lambda m: C.full_qk(m, 0, 0, q_pos=1, k_pos=2), r"k_pos=2 comes after q_pos=1"),
        (lambda m: C.full_qk(m, 0, 0, q_pos=9), r"q_pos=9 is out of range"),
        (lambda m: C.virtual_ov(m, (1, 0), (1, 1)), r"earlier layer"),
        (lambda m: C.composition_scores(m, "X"), r"mode 'X' is not one of"),
        (lambda m: C.ov_self_stats(m, 0), r"pass both layer and head"),
        (lambda m: C.key_rank_correlation(m, 0, 0, 1, 0, tokens=[3]), r"at least 2 ids"),
        (lambda m: C.logit_attribution(C.weights(m), [[1]]), r"runs the model"),
        (lambda m: C.weights(object()), r"got object"),
        (lambda m: C.weights(m).need_mlp("neuron_inputs"), r"attention-only"),
    ],
)
def test_bad_arguments_raise_one_clear_error(model, call, message):
    with pytest.raises(QkovError, match=message):
        call(model)
