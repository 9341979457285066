"""qkov.circuits on TransformerLens models: the same numbers as TransformerLens's own tools.

On the same random weights, qkov's copying scores, full OV/QK circuits and composition scores
equal TransformerLens's (``FactoredMatrix``, ``all_composition_scores``) to 1e-5 relative; for
LayerNorm models, qkov reading the raw model equals TransformerLens on its folded, centred copy.
"""

import math

import pytest
import torch

tl = pytest.importorskip("transformer_lens")

from tl_copies import perturb_biases  # noqa: E402

import qkov.circuits as C  # noqa: E402
from qkov.config import ModelConfig  # noqa: E402
from qkov.errors import QkovError  # noqa: E402
from qkov.interop import bridge_state, from_transformer_lens, tl_config, to_transformer_lens  # noqa: E402
from qkov.model import Transformer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

RTOL, ATOL = 1e-5, 1e-7


def hooked(dtype=torch.float64, seed=0, **kw):
    """A random HookedTransformer with non-trivial biases and LayerNorm parameters."""
    base = dict(n_layers=2, n_heads=3, d_model=16, d_head=5, d_mlp=24, d_vocab=13, n_ctx=6,
                act_fn="gelu", normalization_type=None, seed=seed, dtype=dtype)
    cfg = tl.HookedTransformerConfig(**{**base, **kw})
    model = tl.HookedTransformer(cfg)
    perturb_biases(model, seed)
    return model.eval()


def processed(model):
    """TransformerLens's own folded + centred copy (fold_ln, center_writing_weights, center_unembed)."""
    copy = tl.HookedTransformer(model.cfg.__class__(**{**model.cfg.to_dict()}))
    copy.load_state_dict(model.state_dict())
    if model.cfg.normalization_type in ("LN", "LNPre"):
        copy.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return copy.eval()


def rel_close(x, y):
    torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL * max(1.0, float(y.abs().max())))


CASES = [
    dict(),                                                           # no LayerNorm, MLP
    dict(normalization_type="LN", d_vocab_out=11),                    # LayerNorm, non-square vocab
    dict(normalization_type="LN", attn_only=True, dtype=torch.float32),
]


@pytest.fixture(scope="module", params=CASES, ids=["plain", "LN-nonsquare", "LN-attn-only-f32"])
def pair(request):
    model = hooked(**request.param)
    return model, processed(model)


def test_copying_scores_equal_transformer_lens(pair):
    model, ref = pair
    n = min(ref.cfg.d_vocab, ref.cfg.d_vocab_out)
    full = ref.W_E[:n] @ ref.OV @ ref.W_U[:, :n]                      # TL FactoredMatrix [L, H, n, n]
    lam = full.eigenvalues
    rel_close(C.copying_scores(model), lam.sum(-1).real / lam.abs().sum(-1))


def test_full_circuits_equal_transformer_lens(pair):
    model, ref = pair
    full_ov = ref.W_E @ ref.OV @ ref.W_U                              # [L, H, d_vocab, d_vocab_out]
    full_qk = ref.W_E @ ref.QK @ ref.W_E.T
    P = ref.W_pos
    qk_pos = (ref.W_E + P[4]) @ ref.QK @ (ref.W_E + P[2]).T
    for l, h in [(0, 0), (1, 2)]:
        rel_close(C.full_ov(model, l, h).AB, full_ov[l, h].AB)
        rel_close(C.full_qk(model, l, h).AB, full_qk[l, h].AB)
        rel_close(C.full_qk(model, l, h, q_pos=4, k_pos=2).AB, qk_pos[l, h].AB)
        rel_close(C.positional_qk(model, l, h).AB, (P @ ref.QK @ P.T)[l, h].AB)
        rel_close(C.ov(model, l, h).norm(), ref.OV[l, h].norm())


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_equal_all_composition_scores(pair, mode):
    model, ref = pair
    rel_close(C.composition_scores(model, mode), ref.all_composition_scores(mode))


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(normalization_type="LN", d_vocab_out=11), dict(normalization_type="LNPre", act_fn="relu"),
     dict(normalization_type="LN", attn_only=True)],
    ids=["plain", "LN", "LNPre", "LN-attn-only"],
)
def test_from_transformer_lens_gives_identical_logits(kw):
    model = hooked(seed=3, **kw)
    qmodel = from_transformer_lens(model)
    tokens = torch.randint(0, 13, (4, 6), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(qmodel(tokens), model(tokens), rtol=1e-12, atol=1e-12)
    assert qmodel.cfg.normalization == ("LN" if kw.get("normalization_type") else None)
    # Same circuits whichever library holds the weights.
    torch.testing.assert_close(C.copying_scores(qmodel), C.copying_scores(model))
    att = C.logit_attribution(model, tokens)
    torch.testing.assert_close(att.total(), att.logits, rtol=1e-10, atol=1e-10)


def test_float32_model_copies_and_folds_at_float32_precision():
    model = hooked(dtype=torch.float32, seed=4, normalization_type="LN")
    qmodel = from_transformer_lens(model)
    tokens = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(1))
    assert qmodel.W_E.dtype == torch.float32
    torch.testing.assert_close(qmodel(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    att = C.logit_attribution(model, tokens)
    torch.testing.assert_close(att.total(), att.logits, rtol=1e-4, atol=1e-4)


def test_transformer_bridge_reads_like_hooked_transformer():
    bridge_mod = pytest.importorskip("transformer_lens.model_bridge")
    bridge = bridge_mod.TransformerBridge.boot_native(
        dict(n_layers=2, n_heads=2, d_model=16, d_head=8, d_mlp=32, d_vocab=20, n_ctx=7,
             act_fn="gelu", normalization_type="LN", seed=0)
    )
    with torch.no_grad():
        bridge.ln_final.w.mul_(1.5)                                   # make the fold do something
        bridge.blocks[1].ln1.b.add_(0.2)
    w = C.weights(bridge)
    assert (w.n_layers, w.n_heads, w.d_head, w.d_mlp, w.n_ctx) == (2, 2, 8, 32, 7) and w.W_pos is not None
    qmodel = from_transformer_lens(bridge)
    tokens = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(qmodel(tokens), bridge(tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(C.copying_scores(bridge), C.copying_scores(qmodel), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(C.composition_scores(bridge, "K"), C.composition_scores(qmodel, "K"),
                               rtol=1e-5, atol=1e-6)
    att = C.logit_attribution(bridge, tokens)
    torch.testing.assert_close(att.total(), att.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(positional_embedding_type="rotary", rotary_dim=5), "positional_embedding_type='rotary'"),
        (dict(gated_mlp=True, act_fn="silu"), "gated_mlp=True"),
        (dict(act_fn="gelu_new"), "act_fn='gelu_new'"),
        (dict(normalization_type="LN", eps=1e-6), "eps=1e-06"),
    ],
)
def test_from_transformer_lens_refuses_what_qkov_cannot_represent(kw, message):
    model = hooked(**{**dict(n_layers=1), **kw})
    with pytest.raises(QkovError, match=message.replace("(", r"\(")):
        from_transformer_lens(model)


def test_rotary_model_has_circuits_but_no_positional_ones():
    model = hooked(n_layers=1, positional_embedding_type="rotary", rotary_dim=5)
    assert C.weights(model).W_pos is None
    assert C.full_ov(model, 0, 1).shape == (13, 13)
    with pytest.raises(QkovError, match="learned positional embeddings"):
        C.full_qk(model, 0, 0, q_pos=1, k_pos=0)


def test_rms_models_are_refused_by_name():
    model = hooked(n_layers=1, normalization_type="RMS")
    with pytest.raises(QkovError, match="normalization_type='RMS'"):
        C.weights(model)


def test_attention_scale_is_read():
    assert C.weights(hooked(n_layers=1)).attn_scale == pytest.approx(math.sqrt(5))


# ------------------------------------------------------------------ qkov -> TransformerLens -> qkov
def qkov_model(seed=0, **cfg):
    """A float32 qkov model with random weights, biases and LayerNorm parameters."""
    base = dict(n_layers=2, n_heads=3, d_model=12, d_head=4, d_vocab=11, n_ctx=6)
    model = Transformer(ModelConfig(**{**base, **cfg}), seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.split(".")[-1].startswith("W_"):                 # biases and LN w, b
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


QKOV_CASES = {
    "attn-only": dict(),
    "mlp-gelu": dict(d_mlp=20, act_fn="gelu"),
    "LN-mlp-relu-nonsquare": dict(d_mlp=16, normalization="LN", d_vocab_out=7),
    "LN-attn-only-1-layer": dict(n_layers=1, normalization="LN"),
    "bidirectional-LN-mlp": dict(d_mlp=16, normalization="LN", attention_dir="bidirectional", d_vocab_out=2),
}


@pytest.mark.parametrize("kind", ["hooked", "bridge"])
@pytest.mark.parametrize("case", list(QKOV_CASES), ids=list(QKOV_CASES))
def test_to_transformer_lens_and_back_gives_the_same_logits(kind, case):
    if kind == "bridge":
        pytest.importorskip("transformer_lens.model_bridge")
    model = qkov_model(seed=1, **QKOV_CASES[case])
    tl_model = to_transformer_lens(model, kind=kind)
    assert type(tl_model).__name__ == ("HookedTransformer" if kind == "hooked" else "TransformerBridge")
    tokens = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(tl_model(tokens), model(tokens), rtol=1e-5, atol=1e-5)
        back = from_transformer_lens(tl_model)
        torch.testing.assert_close(back(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    assert back.cfg.normalization == model.cfg.normalization and back.cfg.d_mlp == model.cfg.d_mlp
    assert back.cfg.attention_dir == model.cfg.attention_dir
    # The same circuits whichever library holds the weights.
    torch.testing.assert_close(C.copying_scores(tl_model), C.copying_scores(model), rtol=1e-4, atol=1e-5)


def test_a_trained_style_model_exports_by_default_as_a_hooked_transformer():
    model = qkov_model(n_layers=1, n_heads=1, d_model=16, d_vocab=9, n_ctx=4)
    tl_model = to_transformer_lens(model)                                # TransformerLens 3.9 here
    assert isinstance(tl_model, tl.HookedTransformer)
    assert tl_model.cfg.normalization_type is None and tl_model.cfg.attn_only
    for name, p in model.state_dict().items():
        torch.testing.assert_close(tl_model.state_dict()[name], p, rtol=0, atol=0)


def test_tl_config_maps_every_field():
    cfg = ModelConfig(n_layers=3, n_heads=2, d_model=8, d_head=5, d_mlp=24, d_vocab=30, d_vocab_out=20,
                      n_ctx=9, act_fn="gelu", normalization="LN")
    d = tl_config(cfg)
    assert d == dict(n_layers=3, n_heads=2, d_model=8, d_head=5, d_mlp=24, d_vocab=30, d_vocab_out=20, n_ctx=9,
                     act_fn="gelu", attn_only=False, attention_dir="causal", normalization_type="LN", eps=1e-5,
                     seed=0)
    # Both TransformerLens configs take it and read the same shape back.
    ht = tl.HookedTransformerConfig(**d)
    assert (ht.d_head, ht.d_mlp, ht.d_vocab_out, ht.normalization_type, ht.eps) == (5, 24, 20, "LN", 1e-5)
    bridge_cfg = pytest.importorskip("transformer_lens.config").TransformerBridgeConfig
    bc = bridge_cfg.from_dict(d)
    assert (bc.d_head, bc.d_mlp, bc.d_vocab_out, bc.normalization_type, bc.attn_only) == (5, 24, 20, "LN", False)
    # Attention-only without LayerNorm says so: 4.x's config defaults to "LN".
    d = tl_config(ModelConfig(d_model=16, d_vocab=10, n_ctx=4))
    assert d["attn_only"] is True and d["normalization_type"] is None and d["d_mlp"] is None


def test_bridge_state_has_the_linear_layouts():
    model = qkov_model(d_mlp=20)
    s = bridge_state(model.state_dict())
    W_Q, W_O = model.blocks[1].attn.W_Q.detach(), model.blocks[1].attn.W_O.detach()   # [h, d, e], [h, e, d]
    x = torch.randn(4, 12)
    # nn.Linear computes x @ weight.T + bias: the same per-head projections, heads side by side.
    torch.testing.assert_close(x @ s["blocks.1.attn.q.weight"].T, (x @ W_Q).permute(1, 0, 2).reshape(4, -1))
    z = torch.randn(4, 3 * 4)
    torch.testing.assert_close(z @ s["blocks.1.attn.o.weight"].T, z @ W_O.reshape(12, 12))
    torch.testing.assert_close(s["unembed.weight"], model.unembed.W_U.detach().T)
    assert not any(k.endswith((".mask", ".IGNORE")) for k in s)
    with pytest.raises(QkovError, match="does not know where 'blocks.0.attn.W_X'"):
        bridge_state({"blocks.0.attn.W_X": torch.zeros(1, 1)})


def test_to_transformer_lens_refuses_what_is_not_a_qkov_model():
    with pytest.raises(QkovError, match="takes a qkov.Transformer; got HookedTransformer"):
        to_transformer_lens(hooked(n_layers=1))
    with pytest.raises(QkovError, match="kind='tl5' must be"):
        to_transformer_lens(qkov_model(), kind="tl5")
