"""Bring models in from TransformerLens: ``from_transformer_lens`` copies one into a qkov.Transformer."""

from __future__ import annotations

from .circuits.weights import to_qkov_state
from .config import ModelConfig
from .model import Transformer


def from_transformer_lens(model) -> Transformer:
    """A ``qkov.Transformer`` with the weights of a TransformerLens model, giving the same logits.

    Accepts a ``HookedTransformer`` (3.x) or a ``TransformerBridge``. Raises a ``QkovError``
    naming what qkov cannot represent (rotary positions, gated MLPs, other activations, ...).
    The new model has the TransformerLens model's dtype and lives on the CPU.
    """
    config, state = to_qkov_state(model)
    dtype = state["embed.W_E"].dtype
    out = Transformer(ModelConfig.from_dict(config)).to(dtype)
    missing, unexpected = out.load_state_dict({k: v.cpu() for k, v in state.items()}, strict=False)
    buffers = {name for name, _ in out.named_buffers()}
    assert not unexpected and set(missing) <= buffers, (missing, unexpected)
    return out.eval()
