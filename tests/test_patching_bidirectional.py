"""Activation patching of bidirectional and padded models: every grid equals one hooked forward
per index (what TransformerLens's patching does), where a patch at one position reaches every
other position through attention, earlier ones too."""

from __future__ import annotations

import pytest
import torch
from tl_copies import perturb_biases

import qkov
from qkov import patching

PAD = 1

# hook name and which index of the activation a (layer, pos[, head]) grid point patches
GRIDS = {
    "get_act_patch_resid_pre": ("blocks.{l}.hook_resid_pre", ("layer", "pos")),
    "get_act_patch_resid_mid": ("blocks.{l}.hook_resid_mid", ("layer", "pos")),
    "get_act_patch_attn_out": ("blocks.{l}.hook_attn_out", ("layer", "pos")),
    "get_act_patch_mlp_out": ("blocks.{l}.hook_mlp_out", ("layer", "pos")),
    "get_act_patch_attn_head_out_by_pos": ("blocks.{l}.attn.hook_z", ("layer", "pos", "head")),
    "get_act_patch_attn_head_q_by_pos": ("blocks.{l}.attn.hook_q", ("layer", "pos", "head")),
    "get_act_patch_attn_head_k_by_pos": ("blocks.{l}.attn.hook_k", ("layer", "pos", "head")),
    "get_act_patch_attn_head_v_by_pos": ("blocks.{l}.attn.hook_v", ("layer", "pos", "head")),
}


def _model(**cfg) -> qkov.Transformer:
    base = dict(n_layers=2, n_heads=2, d_model=12, d_mlp=16, d_vocab=6, d_vocab_out=2, n_ctx=6,
                normalization="LN", attention_dir="bidirectional")
    model = qkov.Transformer(qkov.ModelConfig(**{**base, **cfg}), seed=0).double()
    perturb_biases(model, 5)
    return model.eval()


def _reference(model, name, dims, corrupted, clean_cache, metric) -> torch.Tensor:
    """One hooked forward per grid index, as transformer_lens.patching runs them."""
    L, P, H = model.cfg.n_layers, corrupted.shape[1], model.cfg.n_heads
    sizes = {"layer": L, "pos": P, "head": H}
    out = torch.zeros(*(sizes[d] for d in dims), dtype=torch.float64)
    for index in torch.cartesian_prod(*(torch.arange(sizes[d]) for d in dims)):
        l, p, *h = index.tolist()
        hook = name.format(l=l)

        def patch(act, hook, p=p, h=h, hook_name=hook):
            act = act.clone()
            where = (slice(None), p, *h)
            act[where] = clean_cache[hook_name][where]
            return act

        out[tuple(index.tolist())] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(hook, patch)]))
    return out


@pytest.mark.parametrize("cfg", [dict(), dict(pad_token=PAD)], ids=["bidirectional", "bidirectional-padded"])
@pytest.mark.parametrize("fn", list(GRIDS))
def test_patching_a_bidirectional_model_equals_one_hooked_forward_per_index(cfg, fn):
    model = _model(**cfg)
    clean = torch.tensor([[0, 3, 4, 3, 2, PAD], [0, 4, 4, 2, PAD, PAD]])
    corrupted = torch.tensor([[0, 4, 4, 3, 2, PAD], [0, 3, 4, 2, PAD, PAD]])
    _, clean_cache = model.run_with_cache(clean)
    metric = lambda logits: (logits[:, 0, 1] - logits[:, 0, 0]).mean()   # noqa: E731  the class at [start]
    name, dims = GRIDS[fn]
    got = getattr(patching, fn)(model, corrupted, clean_cache, metric)
    want = _reference(model, name, dims, corrupted, clean_cache, metric)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # A patch after position 0 changes position 0's answer: attention reads later positions.
    assert got.reshape(got.shape[0], got.shape[1], -1)[:, 1:].abs().max() > 0
