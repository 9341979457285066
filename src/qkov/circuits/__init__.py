"""Circuits: pure functions of a model's weights (qkov or TransformerLens), no training, no I/O.

Every function computes on the device of the model's weights and returns its tensors there (a
model on a GPU is analysed on the GPU); numbers that need no model, such as the composition
scores' random baseline, are drawn on the CPU from their seed, so they are the same everywhere.

>>> import qkov
>>> model = qkov.Transformer(qkov.ModelConfig(n_layers=1, n_heads=1, d_model=32, d_vocab=64, n_ctx=6))
>>> qkov.circuits.full_ov(model, 0, 0).shape
torch.Size([64, 64])
>>> qkov.circuits.copying_scores(model).shape
torch.Size([1, 1])
"""

from .attribution import LogitAttribution, logit_attribution
from .composition import composition_scores, random_baseline
from .factored import FactoredMatrix
from .full import (
    QKTerms,
    copying_scores,
    direct_path,
    full_ov,
    full_qk,
    key_rank_correlation,
    ov,
    ov_self_stats,
    positional_qk,
    qk,
    qk_terms,
    virtual_ov,
)
from .heads import (
    detection_pattern,
    detection_score,
    duplicate_token_scores,
    head_scores,
    induction_scores,
    previous_token_scores,
    repeated_random_tokens,
)
from .mlp import neuron_inputs, neuron_logits, skip_inputs
from .weights import Weights, to_qkov_state, weights

__all__ = [
    "FactoredMatrix",
    "LogitAttribution",
    "QKTerms",
    "Weights",
    "composition_scores",
    "copying_scores",
    "detection_pattern",
    "detection_score",
    "direct_path",
    "duplicate_token_scores",
    "full_ov",
    "full_qk",
    "head_scores",
    "induction_scores",
    "key_rank_correlation",
    "logit_attribution",
    "neuron_inputs",
    "neuron_logits",
    "ov",
    "ov_self_stats",
    "positional_qk",
    "previous_token_scores",
    "qk",
    "qk_terms",
    "random_baseline",
    "repeated_random_tokens",
    "skip_inputs",
    "to_qkov_state",
    "virtual_ov",
    "weights",
]
