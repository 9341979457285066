"""Neuron-input and neuron-logit maps equal the dense products they stand for."""

from __future__ import annotations

import pytest
import torch

import qkov
from qkov.circuits.mlp import neuron_inputs, neuron_logits, skip_inputs


@pytest.fixture
def model():
    cfg = qkov.ModelConfig(n_layers=2, n_heads=3, d_model=24, d_head=6, d_mlp=40, d_vocab=13, d_vocab_out=9, n_ctx=4)
    return qkov.Transformer(cfg, seed=3)


def test_neuron_inputs_equal_dense_einsum(model):
    for layer in range(2):
        for pos in (None, 0, 3):
            x = model.W_E + (0 if pos is None else model.W_pos[pos])          # [v, d]
            per_head = torch.einsum(
                "vd,hde,hef,fm->hvm", x, model.W_V[layer], model.W_O[layer], model.W_in[layer]
            )                                                                  # [h, v, m]
            torch.testing.assert_close(neuron_inputs(model, layer, pos), per_head.sum(0), rtol=1e-5, atol=1e-5)
            for h in range(3):
                torch.testing.assert_close(neuron_inputs(model, layer, pos, head=h), per_head[h], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(skip_inputs(model, layer, pos), x @ model.W_in[layer], rtol=1e-5, atol=1e-5)


def test_neuron_inputs_are_what_a_fully_attending_head_feeds_the_mlp():
    """With one head forced to attend to position 0, the MLP input is the maps' sum (+ biases)."""
    cfg = qkov.ModelConfig(n_layers=1, n_heads=1, d_model=16, d_mlp=32, d_vocab=10, n_ctx=2, use_bias=False)
    model = qkov.Transformer(cfg, seed=0)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.zero_()
        model.pos_embed.W_pos[1].zero_()
        model.embed.W_E[0].zero_()                 # token 0 at position 1 adds nothing
    tokens = torch.tensor([[t, 0] for t in range(10)])
    _, cache = model.run_with_cache(tokens)
    # Zero queries: uniform attention over positions 0 and 1; position 1 holds a zero vector.
    pre = cache["blocks.0.mlp.hook_pre"][:, 1]                                   # [v, m]
    expected = 0.5 * neuron_inputs(model, 0, pos=0)
    torch.testing.assert_close(pre, expected, rtol=1e-5, atol=1e-5)


def test_neuron_logits_equal_W_out_W_U(model):
    for layer in range(2):
        torch.testing.assert_close(neuron_logits(model, layer), model.W_out[layer] @ model.W_U, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_one_line_errors(model):
    with pytest.raises(qkov.QkovError, match="layer=2 is out of range"):
        neuron_inputs(model, layer=2)
    with pytest.raises(qkov.QkovError, match="pos=4 is out of range.*n_ctx=4"):
        neuron_inputs(model, pos=4)
    with pytest.raises(qkov.QkovError, match="head=3 is out of range"):
        neuron_inputs(model, head=3)
    attn_only = qkov.Transformer(qkov.ModelConfig(d_vocab=8, n_ctx=4))
    for fn in (neuron_inputs, skip_inputs, neuron_logits):
        with pytest.raises(qkov.QkovError, match="attention-only"):
            fn(attn_only)


def test_neuron_activations_cover_every_input_at_the_scored_positions():
    from qkov import fourier
    from qkov.mlp_acts import neuron_activations

    task = qkov.get_task("fib", max_value=20)
    model = qkov.Transformer(task.model_config(), seed=1)
    tokens, acts = neuron_activations(model, task)
    assert torch.equal(tokens, task.dataset("all").tokens)
    _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(acts, cache["blocks.0.mlp.hook_post"][:, [1, 2, 3]])

    task = qkov.get_task("modadd", p=7)
    model = qkov.Transformer(task.model_config(), seed=1)
    grid = fourier.neuron_grid(model, task)                                     # [a, b, neuron]
    _, cache = model.run_with_cache(torch.tensor([[3, 5, 7]]))
    torch.testing.assert_close(grid[3, 5].float(), cache["blocks.0.mlp.hook_post"][0, 2])

    with pytest.raises(qkov.QkovError, match="finite task"):
        neuron_activations(model, qkov.get_task("max"))
