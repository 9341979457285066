"""The model against a plain reference implementation, its cache, and TransformerLens parity."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkov import ModelConfig, QkovError, Transformer


def reference_forward(sd: dict, cfg: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """A transformer written out longhand, one head and one position at a time where it helps."""
    T = tokens.shape[1]

    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * w + b

    x = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][:T]
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        h_in = ln(x, sd[p + "ln1.w"], sd[p + "ln1.b"]) if cfg.normalization == "LN" else x
        out = torch.zeros_like(x) + sd[p + "attn.b_O"]
        for h in range(cfg.n_heads):
            q = h_in @ sd[p + "attn.W_Q"][h] + sd[p + "attn.b_Q"][h]
            k = h_in @ sd[p + "attn.W_K"][h] + sd[p + "attn.b_K"][h]
            v = h_in @ sd[p + "attn.W_V"][h] + sd[p + "attn.b_V"][h]
            scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
            causal = torch.ones(T, T).tril().bool()
            scores = scores.masked_fill(~causal, float("-inf"))
            out = out + (scores.softmax(-1) @ v) @ sd[p + "attn.W_O"][h]
        x = x + out
        if cfg.d_mlp is not None:
            m_in = ln(x, sd[p + "ln2.w"], sd[p + "ln2.b"]) if cfg.normalization == "LN" else x
            pre = m_in @ sd[p + "mlp.W_in"] + sd[p + "mlp.b_in"]
            act = torch.relu(pre) if cfg.act_fn == "relu" else torch.nn.functional.gelu(pre)
            x = x + act @ sd[p + "mlp.W_out"] + sd[p + "mlp.b_out"]
    if cfg.normalization == "LN":
        x = ln(x, sd["ln_final.w"], sd["ln_final.b"])
    return x @ sd["unembed.W_U"] + sd["unembed.b_U"]


configs = st.builds(
    ModelConfig,
    n_layers=st.integers(1, 3),
    n_heads=st.integers(1, 3),
    d_model=st.sampled_from([12, 24]),
    d_mlp=st.sampled_from([None, 16]),
    d_vocab=st.integers(3, 20),
    d_vocab_out=st.sampled_from([None, 7]),
    n_ctx=st.integers(2, 7),
    act_fn=st.sampled_from(["relu", "gelu"]),
    normalization=st.sampled_from([None, "LN"]),
    use_bias=st.booleans(),
)


@settings(max_examples=25, deadline=None)
@given(cfg=configs, seed=st.integers(0, 2**16))
def test_forward_matches_reference(cfg, seed):
    model = Transformer(cfg, seed=seed).double()  # float64: differences are bugs, not rounding
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random biases and LN weights, so every term is exercised
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    tokens = torch.randint(0, cfg.d_vocab, (3, cfg.n_ctx), generator=g)
    sd = model.state_dict()
    torch.testing.assert_close(model(tokens), reference_forward(sd, cfg, tokens), atol=1e-10, rtol=1e-10)
    # Only computing some query positions in the last layer gives the same logits there.
    pos = [cfg.n_ctx - 1, 0]
    torch.testing.assert_close(model(tokens, positions=pos), model(tokens)[:, pos], atol=1e-10, rtol=1e-10)
    # Unembedding only some rows (a loss's varying positions) gives the same logits there.
    rows = torch.rand(tokens.shape, generator=g) < 0.5
    torch.testing.assert_close(model(tokens, rows=rows), model(tokens)[rows], atol=1e-10, rtol=1e-10)


def test_cache_names_and_shapes():
    cfg = ModelConfig(n_layers=2, n_heads=3, d_model=24, d_mlp=40, d_vocab=11, n_ctx=5, normalization="LN")
    model = Transformer(cfg)
    tokens = torch.randint(0, 11, (4, 5))
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (4, 5, 11)
    assert cache["hook_embed"].shape == (4, 5, 24)
    assert cache["hook_pos_embed"].shape == (4, 5, 24)
    for l in range(2):
        p = f"blocks.{l}."
        assert cache[p + "attn.hook_pattern"].shape == (4, 3, 5, 5)  # [batch, head, query_pos, key_pos]
        assert cache[p + "attn.hook_z"].shape == (4, 5, 3, 8)
        for name in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
            assert cache[p + name].shape == (4, 5, 24)
        assert cache[p + "mlp.hook_pre"].shape == (4, 5, 40)
        assert cache[p + "mlp.hook_post"].shape == (4, 5, 40)
        pattern = cache[p + "attn.hook_pattern"]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(4, 3, 5))
        assert (pattern.triu(1) == 0).all()  # causal
    # resid_post of the last layer is what the unembedding reads
    final = model.ln_final(cache["blocks.1.hook_resid_post"])
    torch.testing.assert_close(final @ model.W_U + model.b_U, logits)


def test_cache_filter_keeps_only_what_was_asked():
    model = Transformer(ModelConfig(n_layers=2, d_model=16, d_vocab=10, n_ctx=4))
    tokens = torch.randint(0, 10, (2, 4))
    _, cache = model.run_with_cache(tokens, names=["blocks.1.attn.hook_pattern"])
    assert list(cache) == ["blocks.1.attn.hook_pattern"]
    _, cache = model.run_with_cache(tokens, names=lambda n: n.endswith("hook_pattern"))
    assert sorted(cache) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    _, cache = model.run_with_cache(tokens, names="hook_embed")
    assert list(cache) == ["hook_embed"]


def test_state_dict_names_and_shapes_follow_transformer_lens():
    cfg = ModelConfig(n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=64, d_vocab=13, d_vocab_out=9,
                      n_ctx=7, normalization="LN")
    shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    expected = {
        "embed.W_E": (13, 32), "pos_embed.W_pos": (7, 32), "unembed.W_U": (32, 9), "unembed.b_U": (9,),
        "ln_final.w": (32,), "ln_final.b": (32,),
    }
    for l in range(2):
        p = f"blocks.{l}."
        expected.update({
            p + "ln1.w": (32,), p + "ln1.b": (32,), p + "ln2.w": (32,), p + "ln2.b": (32,),
            p + "attn.W_Q": (4, 32, 8), p + "attn.W_K": (4, 32, 8), p + "attn.W_V": (4, 32, 8),
            p + "attn.W_O": (4, 8, 32), p + "attn.b_Q": (4, 8), p + "attn.b_K": (4, 8), p + "attn.b_V": (4, 8),
            p + "attn.b_O": (32,), p + "attn.mask": (0, 0), p + "attn.IGNORE": (),
            p + "mlp.W_in": (32, 64), p + "mlp.b_in": (64,), p + "mlp.W_out": (64, 32), p + "mlp.b_out": (32,),
        })
    assert shapes == expected


def test_stacked_properties_have_transformer_lens_shapes():
    cfg = ModelConfig(n_layers=3, n_heads=2, d_model=16, d_mlp=20, d_vocab=10, n_ctx=4)
    m = Transformer(cfg)
    assert m.W_Q.shape == (3, 2, 16, 8) and m.W_O.shape == (3, 2, 8, 16)
    assert m.W_in.shape == (3, 16, 20) and m.W_out.shape == (3, 20, 16)
    assert m.b_Q.shape == (3, 2, 8) and m.b_O.shape == (3, 16) and m.b_in.shape == (3, 20)
    assert m.W_E.shape == (10, 16) and m.W_pos.shape == (4, 16) and m.W_U.shape == (16, 10)
    torch.testing.assert_close(m.W_K[1], m.blocks[1].attn.W_K.detach())
    with pytest.raises(QkovError, match="attention-only"):
        _ = Transformer(ModelConfig(d_mlp=None)).W_in


@pytest.mark.parametrize("ln", [None, "LN"])
@pytest.mark.parametrize("d_mlp", [None, 48])
def test_transformer_lens_state_dict_loads_and_gives_same_logits(ln, d_mlp):
    tl = pytest.importorskip("transformer_lens")
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=32, d_mlp=d_mlp, d_vocab=17, n_ctx=6, normalization=ln)
    tl_cfg = tl.HookedTransformerConfig(
        n_layers=2, n_heads=2, d_model=32, d_head=16, d_mlp=d_mlp or 1, attn_only=d_mlp is None, d_vocab=17,
        n_ctx=6, act_fn="relu", normalization_type=ln, seed=3, device="cpu",
    )
    tl_model = tl.HookedTransformer(tl_cfg)
    ours = Transformer(cfg)
    ours.load_state_dict(tl_model.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(tl_model.state_dict())
    tokens = torch.randint(0, 17, (5, 6))
    torch.testing.assert_close(ours(tokens), tl_model(tokens), atol=1e-5, rtol=1e-5)
    _, ours_cache = ours.run_with_cache(tokens)
    _, tl_cache = tl_model.run_with_cache(tokens)
    for name in ("blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.1.hook_resid_post"):
        torch.testing.assert_close(ours_cache[name], tl_cache[name], atol=1e-5, rtol=1e-5)


def test_unused_biases_stay_zero_and_untrained():
    model = Transformer(ModelConfig(d_mlp=8, use_bias=False))
    biases = [p for n, p in model.named_parameters() if n.split(".")[-1].startswith("b_")]
    assert biases and all(not p.requires_grad and (p == 0).all() for p in biases)


def test_rows_must_be_a_mask_shaped_like_tokens():
    model = Transformer(ModelConfig(n_layers=1, d_model=8, n_heads=2, d_vocab=5, n_ctx=4))
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(QkovError, match=r"rows must be a boolean mask shaped like tokens \(2, 4\), "
                                        r"without positions; got \(2, 3\)"):
        model(tokens, rows=torch.ones(2, 3, dtype=torch.bool))


def test_bad_tokens_say_what_was_wrong():
    model = Transformer(ModelConfig(d_vocab=10, n_ctx=4))
    with pytest.raises(QkovError, match=r"0\.\.9"):
        model(torch.tensor([[1, 10]]))
    with pytest.raises(QkovError, match="n_ctx=4"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(QkovError, match="integer ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(QkovError, match=r"not text; got '35 14 47'.*parse\(text\)"):
        model("35 14 47")                                             # torch's own: new(): invalid data type 'str'
    with pytest.raises(QkovError, match="integer ids shaped"):
        model([[1, "2"]])


def test_stacked_properties_are_copies_and_the_parameters_are_the_way_to_edit():
    model = Transformer(ModelConfig(n_layers=2, n_heads=2, d_model=8, d_vocab=5, n_ctx=4))
    model.W_O[0, 0] = 0                                               # a copy: the model is unchanged
    assert model.blocks[0].attn.W_O[0].abs().sum() > 0
    assert "copy" in type(model).W_O.__doc__ and "blocks[layer].attn.W_O" in type(model).W_O.__doc__
    with torch.no_grad():
        model.blocks[0].attn.W_O[0] = 0                               # the parameter itself
    assert (model.W_O[0, 0] == 0).all()


def test_same_seed_same_weights():
    cfg = ModelConfig(n_layers=2, d_mlp=8)
    a, b = Transformer(cfg, seed=5).state_dict(), Transformer(cfg, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = Transformer(cfg, seed=6).state_dict()
    assert not torch.equal(a["embed.W_E"], c["embed.W_E"])
