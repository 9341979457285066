"""Hooks with TransformerLens's semantics: the same hook names, the same activations, the same
logits after an edit, on the same weights; and hooks that never outlive their call."""

import pytest
import torch

from qkov import ModelConfig, Transformer
from qkov.errors import QkovError

tl = pytest.importorskip("transformer_lens")

from tl_copies import ARCHS, tl_flags, tl_pair, tokens_for  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request):
    return tl_pair(request.param)


def test_every_transformer_lens_hook_name_exists(pair):
    ref, model = pair
    assert set(model.hook_dict) == set(ref.hook_dict)
    assert all(point.name == name for name, point in model.hook_dict.items())


def test_every_hook_fires_without_flags(pair):
    _, model = pair
    seen = []
    model.run_with_hooks(tokens_for(model), fwd_hooks=[(lambda name: True, lambda x, hook: seen.append(hook.name))])
    assert set(seen) == set(model.hook_dict)


def test_cached_activations_equal_transformer_lens(pair):
    ref, model = pair
    tokens = tokens_for(model)
    tl_flags(ref)
    ref.set_use_attn_in(True)
    try:
        _, theirs = ref.run_with_cache(tokens)
    finally:
        tl_flags(ref, False)
        ref.set_use_attn_in(False)
    _, ours = model.run_with_cache(tokens)
    assert set(theirs.keys()) <= set(ours)
    for name in theirs.keys():
        # TransformerLens's split inputs put ln1 on each head's copy of the stream: [b, p, h, .]
        mine = ours[name].unsqueeze(2).expand_as(theirs[name]) if ".ln1." in name else ours[name]
        torch.testing.assert_close(mine, theirs[name], rtol=1e-10, atol=1e-10, msg=name)


def _edit(x, hook):
    """A deterministic edit of any activation: scale it and add a fixed wave."""
    wave = torch.sin(torch.arange(x.numel(), dtype=x.dtype)).view_as(x)
    return 0.75 * x + 0.05 * wave


def _tl_flag_for(ref, name: str, on: bool):
    if name.endswith("hook_result"):
        ref.set_use_attn_result(on)
    elif name.endswith(("hook_q_input", "hook_k_input", "hook_v_input")):
        ref.set_use_split_qkv_input(on)
    elif name.endswith("hook_attn_in"):
        ref.set_use_attn_in(on)
    elif name.endswith("hook_mlp_in") and not ref.cfg.attn_only:
        ref.set_use_hook_mlp_in(on)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_an_edit_at_any_hook_gives_transformer_lens_logits(arch):
    ref, model = tl_pair(arch, seed=2)
    tokens = tokens_for(model, seed=3)
    names = [n for n in model.hook_dict if not (ref.cfg.attn_only and "hook_mlp_" in n)]
    for name in names:
        _tl_flag_for(ref, name, True)
        try:
            expected = ref.run_with_hooks(tokens, fwd_hooks=[(name, _edit)])
        finally:
            _tl_flag_for(ref, name, False)
        got = model.run_with_hooks(tokens, fwd_hooks=[(name, _edit)])
        assert not torch.allclose(got, model(tokens)), name
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=name)


def test_attention_only_blocks_have_an_mlp_that_writes_zero():
    _, model = tl_pair("attn-only")
    tokens = tokens_for(model)
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_mlp_out", "blocks.0.hook_mlp_in"])
    assert (cache["blocks.0.hook_mlp_out"] == 0).all()
    shift = lambda x, hook: x + 1.0  # noqa: E731
    moved = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", shift)])
    torch.testing.assert_close(moved, model(tokens) + model.W_U.sum(0))


def test_hook_knows_its_name_and_layer():
    model = Transformer(ModelConfig(n_layers=2, d_mlp=8, d_vocab=10, n_ctx=4))
    where = {}
    model.run_with_hooks(torch.tensor([[1, 2]]), fwd_hooks=[
        ("blocks.1.mlp.hook_post", lambda x, hook: where.update(mlp=(hook.name, hook.layer()))),
        ("hook_embed", lambda x, hook: where.update(embed=(hook.name, hook.layer()))),
    ])
    assert where == {"mlp": ("blocks.1.mlp.hook_post", 1), "embed": ("hook_embed", None)}


def test_hooks_block_applies_to_every_forward_inside_and_nests():
    model = Transformer(ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=10, n_ctx=4))
    tokens = torch.tensor([[1, 2, 3]])
    clean = model(tokens)
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", zero)]) as m:
        assert m is model
        ablated = model(tokens)
        # A cache taken inside the block records the edited activations.
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_attn_out")
        assert (cache["blocks.0.hook_attn_out"] == 0).all()
        both = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_attn_out", zero)])
    assert not torch.allclose(ablated, clean)
    torch.testing.assert_close(both[0], (model.W_E[[1, 2, 3]] + model.W_pos[:3]) @ model.W_U + model.b_U)
    torch.testing.assert_close(model(tokens), clean)          # nothing left attached


def test_a_hook_that_raises_leaves_no_hook_attached():
    model = Transformer(ModelConfig(n_layers=2, d_vocab=10, n_ctx=4))
    tokens = torch.tensor([[1, 2, 3]])
    clean = model(tokens)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: 0 * x),
                                                ("blocks.1.attn.hook_z", boom)])
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", boom)]):
            model(tokens)
    torch.testing.assert_close(model(tokens), clean)
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], model(tokens, stop_at_layer=1))


def test_wrong_shape_names_the_hook_and_both_shapes():
    model = Transformer(ModelConfig(n_layers=1, n_heads=2, d_model=16, d_vocab=10, n_ctx=4))
    with pytest.raises(QkovError, match=r"blocks\.0\.attn\.hook_z returned shape \(1, 3, 8\); the activation "
                                        r"there is \(1, 3, 2, 8\)"):
        model.run_with_hooks(torch.tensor([[1, 2, 3]]),
                             fwd_hooks=[("blocks.0.attn.hook_z", lambda z, hook: z[:, :, 0])])
    with pytest.raises(QkovError, match="hook_embed returned float; a hook returns a tensor"):
        model.run_with_hooks(torch.tensor([[1, 2, 3]]), fwd_hooks=[("hook_embed", lambda x, hook: 1.0)])


def test_unknown_hook_name_suggests_the_nearest():
    model = Transformer(ModelConfig(n_layers=2, d_vocab=10, n_ctx=4))
    with pytest.raises(QkovError, match=r"unknown hook name 'blocks\.0\.attn\.hook_patern'; nearest: "
                                        r"blocks\.0\.attn\.hook_pattern"):
        model.run_with_hooks(torch.tensor([[1]]), fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, hook: None)])
    with pytest.raises(QkovError, match="nearest: blocks.1.hook_resid_post"):
        model.run_with_cache(torch.tensor([[1]]), names_filter=["blocks.1.hook_resid_pst"])
    with pytest.raises(QkovError, match="a pair"):
        model.run_with_hooks(torch.tensor([[1]]), fwd_hooks=[("hook_embed",)])


def test_names_filter_is_transformer_lens_keyword_and_names_still_works():
    model = Transformer(ModelConfig(n_layers=2, d_vocab=10, n_ctx=4))
    tokens = torch.tensor([[1, 2]])
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert sorted(cache) == ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"]
    with pytest.warns(DeprecationWarning, match="names_filter"):
        _, old = model.run_with_cache(tokens, names="hook_embed")
    assert list(old) == ["hook_embed"]


def test_permanent_and_backward_hooks_are_refused_with_the_way_forward():
    model = Transformer(ModelConfig(n_layers=1, d_vocab=10, n_ctx=4))
    with pytest.raises(QkovError, match="run_with_hooks"):
        model.hook_dict["hook_embed"].add_hook(lambda x, hook: x)
    with pytest.raises(QkovError, match="autograd"):
        model.run_with_hooks(torch.tensor([[1]]), bwd_hooks=[("hook_embed", lambda g, hook: g)])


@pytest.mark.parametrize("arch", ["attn-only", "mlp-LN"])
def test_start_and_stop_at_layer_are_transformer_lens(arch):
    ref, model = tl_pair(arch)
    tokens = tokens_for(model)
    resid = model(tokens, stop_at_layer=1)
    torch.testing.assert_close(resid, ref(tokens, stop_at_layer=1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model(resid, start_at_layer=1), model(tokens), rtol=1e-10, atol=1e-10)
    with pytest.raises(QkovError, match="residual stream"):
        model(tokens, start_at_layer=1)
