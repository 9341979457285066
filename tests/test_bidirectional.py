"""Bidirectional attention and padding: the forward against a plain reference written here and
against TransformerLens 3.9 on the same weights, circuits of a bidirectional head against the
dense algebra, and what the fast paths and the report do with such models."""

from __future__ import annotations

import warnings

import pytest
import torch
from tl_copies import perturb_biases

import qkov.circuits as C
from qkov import fastpath
from qkov.config import ModelConfig
from qkov.errors import QkovError
from qkov.model import Transformer

PAD = 1


def random_model(seed=0, **cfg) -> Transformer:
    """A float64 model with random weights, biases and LayerNorm parameters."""
    base = dict(n_layers=2, n_heads=2, d_model=12, d_head=5, d_mlp=16, d_vocab=7, d_vocab_out=2, n_ctx=8,
                normalization="LN", attention_dir="bidirectional")
    model = Transformer(ModelConfig(**{**base, **cfg}), seed=seed).double()
    perturb_biases(model, seed + 1)
    return model.eval()


def padded_tokens(n=6, seed=2, d_vocab=7, n_ctx=8) -> torch.Tensor:
    """Rows of real tokens (never PAD) followed by PAD, of every length 1..n_ctx."""
    gen = torch.Generator().manual_seed(seed)
    real = torch.tensor([t for t in range(d_vocab) if t != PAD])
    tokens = real[torch.randint(0, len(real), (n, n_ctx), generator=gen)]
    for i in range(n):
        tokens[i, 1 + i * (n_ctx - 1) // max(1, n - 1):] = PAD
    return tokens


# ------------------------------------------------------------------ the reference, written out
def _ln(x, w, b):
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w + b


def reference(model: Transformer, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The forward written from the definitions: every query reads every key the mask allows
    (``k <= q`` when causal), never a padded key; a padded query's pattern row is zero."""
    cfg, sd = model.cfg, {k: v for k, v in model.state_dict().items()}
    b, n = tokens.shape
    keep = torch.ones(b, n, dtype=torch.bool) if keep is None else keep
    x = sd["embed.W_E"][tokens] + sd["pos_embed.W_pos"][:n]
    allowed = keep[:, None, :].expand(b, n, n).clone()                     # [b, q, k]
    if cfg.attention_dir == "causal":
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    for l in range(cfg.n_layers):
        p = f"blocks.{l}."
        h_in = _ln(x, sd[p + "ln1.w"], sd[p + "ln1.b"]) if cfg.normalization else x
        out = sd[p + "attn.b_O"].expand_as(x).clone()
        for h in range(cfg.n_heads):
            q = h_in @ sd[p + "attn.W_Q"][h] + sd[p + "attn.b_Q"][h]
            k = h_in @ sd[p + "attn.W_K"][h] + sd[p + "attn.b_K"][h]
            v = h_in @ sd[p + "attn.W_V"][h] + sd[p + "attn.b_V"][h]
            scores = q @ k.transpose(1, 2) / cfg.head_dim ** 0.5
            pattern = torch.zeros_like(scores)
            for i in range(b):
                for qi in range(n):
                    if keep[i, qi]:
                        pattern[i, qi] = torch.where(allowed[i, qi], scores[i, qi], -torch.inf).softmax(-1)
            out = out + pattern @ v @ sd[p + "attn.W_O"][h]
        x = x + out
        if cfg.d_mlp is not None:
            m_in = _ln(x, sd[p + "ln2.w"], sd[p + "ln2.b"]) if cfg.normalization else x
            post = torch.relu(m_in @ sd[p + "mlp.W_in"] + sd[p + "mlp.b_in"])
            x = x + post @ sd[p + "mlp.W_out"] + sd[p + "mlp.b_out"]
    if cfg.normalization:
        x = _ln(x, sd["ln_final.w"], sd["ln_final.b"])
    return x @ sd["unembed.W_U"] + sd["unembed.b_U"]


@pytest.mark.parametrize("cfg", [
    dict(),                                                   # bidirectional, LayerNorm, MLPs
    dict(normalization=None, d_mlp=None, n_layers=1),         # bidirectional, attention only
    dict(attention_dir="causal"),                             # causal, for the padding alone
], ids=["bidirectional-LN-mlp", "bidirectional-attn-only", "causal"])
def test_forward_equals_the_written_out_reference(cfg):
    model = random_model(**cfg)
    tokens = padded_tokens()
    torch.testing.assert_close(model(tokens), reference(model, tokens), rtol=1e-10, atol=1e-10)
    padded = random_model(pad_token=PAD, **cfg)
    torch.testing.assert_close(padded(tokens), reference(padded, tokens, tokens != PAD), rtol=1e-10, atol=1e-10)


def test_a_bidirectional_query_reads_later_keys_and_a_causal_one_does_not():
    tokens = padded_tokens()[:1].clone()
    tokens[0] = torch.tensor([3, 4, 5, 6, 0, 2, 3, 4])
    later = tokens.clone()
    later[0, -1] = 5
    bi, causal = random_model(), random_model(attention_dir="causal")
    assert not torch.allclose(bi(tokens)[0, 0], bi(later)[0, 0])                # position 0 sees the last token
    torch.testing.assert_close(causal(tokens)[0, :-1], causal(later)[0, :-1], rtol=0, atol=0)
    _, cache = bi.run_with_cache(tokens)
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert bool((pattern[0, :, 0, 1:] > 0).all())                               # row 0 spreads past itself


def test_padding_is_never_attended_and_attends_to_nothing():
    model = random_model(pad_token=PAD)
    tokens = padded_tokens()
    keep = tokens != PAD
    _, cache = model.run_with_cache(tokens)
    for l in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"]                        # [b, h, q, k]
        assert bool((pattern[~keep[:, None, None, :].expand_as(pattern)] == 0).all())   # padded keys
        assert bool((pattern.permute(0, 2, 1, 3)[~keep] == 0).all())            # padded queries' rows
        torch.testing.assert_close(pattern.sum(-1), keep[:, None, :].expand(-1, 2, -1).double())
    # More padding, or other tokens at the padded positions read through attention_mask, leave
    # every real position's logits as they were.
    base = model(tokens)[keep]
    other = torch.where(keep, tokens, torch.randint(2, 7, tokens.shape, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(model(other, attention_mask=keep.long())[keep], base, rtol=1e-12, atol=1e-12)
    fits = ~keep[:, 5:].any(1)                                                  # rows whose padding starts by 5
    assert 0 < int(fits.sum()) < len(tokens)
    short, full = model(tokens[fits, :5]), model(tokens[fits])[:, :5]
    torch.testing.assert_close(short[keep[fits, :5]], full[keep[fits, :5]], rtol=1e-12, atol=1e-12)


def test_padded_training_step_has_finite_gradients_even_when_a_row_starts_with_padding():
    model = random_model(pad_token=PAD, attention_dir="causal").float().train()
    tokens = padded_tokens()
    tokens[0] = PAD                                                             # all padding, position 0 too
    tokens[1, :3] = PAD                                                         # left padding
    loss = model(tokens)[:, :, 0].sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_attention_masks_and_pad_tokens_get_one_line():
    model = random_model(pad_token=PAD)
    with pytest.raises(QkovError, match=r"attention_mask must be \[batch, key pos\] = \(6, 8\)"):
        model(padded_tokens(), attention_mask=torch.ones(6, 7))
    with pytest.raises(QkovError, match="pass attention_mask"):
        model(torch.zeros(2, 4, 12, dtype=torch.float64), start_at_layer=1)
    with pytest.raises(QkovError, match="pad_token=9 must be a token id in 0..6"):
        ModelConfig(d_vocab=7, pad_token=9)
    with pytest.raises(QkovError, match="attention_dir='sideways' is not supported"):
        ModelConfig(attention_dir="sideways")
    resid = model(padded_tokens(), stop_at_layer=1)
    torch.testing.assert_close(model(resid, start_at_layer=1, attention_mask=padded_tokens() != PAD),
                               model(padded_tokens()), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ TransformerLens 3.9
def _tl(model: Transformer):
    tl = pytest.importorskip("transformer_lens")
    from qkov.interop import to_transformer_lens

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = to_transformer_lens(model)
    assert isinstance(out, tl.HookedTransformer) and out.cfg.attention_dir == model.cfg.attention_dir
    return out


def test_bidirectional_forward_equals_transformer_lens_on_the_same_weights():
    model = random_model()
    tokens = padded_tokens()
    tl_model = _tl(model)
    with torch.no_grad():
        torch.testing.assert_close(tl_model(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_padded_forward_equals_transformer_lens_masking_padded_keys_at_real_positions():
    """TransformerLens 3.9 ignores attention_mask in bidirectional models; ARENA's bracket
    classifier masks padded keys with a hook on the scores. Real positions must agree."""
    model = random_model(pad_token=PAD)
    tokens = padded_tokens()
    keep = tokens != PAD
    tl_model = _tl(model)

    def mask_padded_keys(scores, hook):
        return scores.masked_fill(~keep[:, None, None, :], -torch.inf)

    hooks = [(f"blocks.{l}.attn.hook_attn_scores", mask_padded_keys) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        ours, theirs = model(tokens), tl_model.run_with_hooks(tokens, fwd_hooks=hooks)
    torch.testing.assert_close(theirs[keep], ours[keep], rtol=1e-5, atol=1e-5)


def test_a_transformer_lens_bidirectional_model_comes_over_bidirectional():
    tl = pytest.importorskip("transformer_lens")
    from qkov.interop import from_transformer_lens

    cfg = tl.HookedTransformerConfig(n_layers=2, n_heads=2, d_model=12, d_head=6, d_mlp=16, d_vocab=7, n_ctx=8,
                                     act_fn="relu", normalization_type="LN", attention_dir="bidirectional",
                                     d_vocab_out=2, seed=3, dtype=torch.float64, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl_model = tl.HookedTransformer(cfg).eval()
    model = from_transformer_lens(tl_model)
    assert model.cfg.attention_dir == "bidirectional" and C.weights(tl_model).causal is False
    tokens = padded_tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), tl_model(tokens), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ circuits
def test_circuits_of_a_bidirectional_head_equal_the_dense_algebra_for_later_keys():
    model = random_model(normalization=None, d_mlp=None, n_layers=1, d_vocab_out=None)
    W_E, W_pos, W_Q, W_K = model.W_E, model.W_pos, model.W_Q[0, 1], model.W_K[0, 1]
    full = C.full_qk(model, 0, 1, q_pos=1, k_pos=5)                             # a key after its query
    dense = (W_E + W_pos[1]) @ W_Q @ W_K.T @ (W_E + W_pos[5]).T
    torch.testing.assert_close(full.to_dense(), dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(C.positional_qk(model, 0, 1).to_dense(), W_pos @ W_Q @ W_K.T @ W_pos.T)
    terms = C.qk_terms(model, 0, 1, q_pos=1, k_pos=5)
    torch.testing.assert_close(terms.total(), dense, rtol=1e-10, atol=1e-10)
    # The score the model computes (biases zeroed: the direct path's scores are these entries).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                p.zero_()
    tokens = torch.tensor([[3, 4, 5, 6, 0, 2, 3, 4]])
    _, cache = model.run_with_cache(tokens)
    score = cache["blocks.0.attn.hook_attn_scores"][0, 1, 1, 5] * model.cfg.head_dim ** 0.5
    torch.testing.assert_close(score, C.full_qk(model, 0, 1, q_pos=1, k_pos=5).to_dense()[4, 2])
    with pytest.raises(QkovError, match="causal attention never reads it"):
        C.full_qk(random_model(attention_dir="causal", normalization=None, d_mlp=None), 0, 0, q_pos=1, k_pos=5)


# ------------------------------------------------------------------ fast paths and the report
def test_fast_paths_leave_bidirectional_and_padded_models_to_the_plain_forward():
    for cfg in (dict(attention_dir="bidirectional"), dict(attention_dir="causal", pad_token=PAD)):
        model = Transformer(ModelConfig(d_model=16, d_vocab=7, n_ctx=8, **cfg)).float()
        plan = fastpath.plan(model, [0, 7])
        assert plan.kind == "plain"
        tokens = padded_tokens()
        torch.testing.assert_close(plan.logits(tokens), model(tokens)[:, [0, 7]], rtol=1e-5, atol=1e-6)
    causal = Transformer(ModelConfig(d_model=16, d_vocab=7, n_ctx=8))
    assert fastpath.plan(causal, [0, 7]).kind != "plain"


def test_the_report_keeps_every_positional_cell_of_a_bidirectional_head():
    from qkov.report import data

    a = torch.arange(16.0).reshape(4, 4).numpy()
    assert not data._positional(a, causal=False).__array__().__contains__(float("nan"))
    kept = data._positional(a, causal=True)
    assert bool((kept != kept)[0, 1]) and kept[1, 0] == 4.0
    pairs = data._qk_pairs(42, 60, causal=False, first=0)
    assert [(0, k) for k in range(42)] == [p for p in pairs if p[0] == 0] and (0, 41) in pairs
    assert all(k <= q for q, k in data._qk_pairs(6, 100))
