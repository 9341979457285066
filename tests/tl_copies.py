"""Shared by the hook, intervention, patching, fast-path and C-kernel tests: a random
TransformerLens model with non-trivial biases and LayerNorm parameters, and its qkov copy
(``from_transformer_lens``); ``perturb_biases`` for random qkov models too."""

from __future__ import annotations

import torch

from qkov.interop import from_transformer_lens

# Architectures both libraries represent: attention-only with and without LayerNorm, MLPs with
# and without LayerNorm (gelu and relu), a non-square unembedding.
ARCHS = {
    "attn-only": dict(attn_only=True, normalization_type=None),
    "attn-only-LN": dict(attn_only=True, normalization_type="LN"),
    "mlp": dict(d_mlp=24, act_fn="gelu", normalization_type=None),
    "mlp-LN": dict(d_mlp=24, act_fn="relu", normalization_type="LN", d_vocab_out=11),
}


def perturb_biases(model, seed: int) -> None:
    """Add seeded noise to every trained parameter that is not a ``W_`` matrix (biases, LayerNorm
    weights): freshly initialised ones are zeros and ones, which would hide their bugs. Frozen
    ones (a qkov model's biases with ``use_bias=False``) stay as they are. Works for qkov and
    TransformerLens models alike."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.split(".")[-1].startswith("W_"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen).to(p.dtype))


def tl_pair(arch: str = "mlp-LN", seed: int = 0, dtype=torch.float64, **kw):
    """``(tl_model, qkov_model)`` with the same weights, both in eval mode."""
    import transformer_lens as tl

    base = dict(n_layers=2, n_heads=3, d_model=16, d_head=5, d_mlp=None, d_vocab=13, n_ctx=7, act_fn="relu",
                seed=seed, dtype=dtype, device="cpu")
    cfg = tl.HookedTransformerConfig(**{**base, **ARCHS[arch], **kw})
    model = tl.HookedTransformer(cfg)
    perturb_biases(model, seed)
    return model.eval(), from_transformer_lens(model)


def tl_flags(model, on: bool = True):
    """Every TransformerLens flag that makes an optional hook point fire."""
    model.set_use_attn_result(on)
    model.set_use_split_qkv_input(on)
    if not model.cfg.attn_only:
        model.set_use_hook_mlp_in(on)
    return model


def tokens_for(model, batch: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, model.cfg.n_ctx), generator=gen)


def to_transformer_lens(model):
    """A TransformerLens 3.9 ``HookedTransformer`` with a qkov model's config and weights."""
    import warnings

    import transformer_lens as tl

    c = model.cfg
    cfg = tl.HookedTransformerConfig(
        n_layers=c.n_layers, n_heads=c.n_heads, d_model=c.d_model, d_head=c.head_dim, d_mlp=c.d_mlp or 1,
        attn_only=c.d_mlp is None, d_vocab=c.d_vocab, d_vocab_out=c.vocab_out, n_ctx=c.n_ctx, act_fn=c.act_fn,
        normalization_type=c.normalization, dtype=model.W_E.dtype, device="cpu", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = tl.HookedTransformer(cfg)
    ref.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()}, strict=True)
    return ref.eval()
