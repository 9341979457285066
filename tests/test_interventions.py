"""Ablations and pattern overrides: TransformerLens's logits for the same hooks on the same
weights, exact identities where an intervention has one, and one-line errors."""

import pytest
import torch

import qkov
import qkov.circuits as C
from qkov import interventions as I
from qkov import path_ablations as PA
from qkov.errors import QkovError

tl = pytest.importorskip("transformer_lens")

from tl_copies import tl_pair, tokens_for  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["mlp-LN", "attn-only"])
def pair(request):
    return tl_pair(request.param, seed=4)


def test_zero_and_mean_ablation_give_transformer_lens_logits(pair):
    ref, model = pair
    tokens, reference = tokens_for(model, 3, seed=5), tokens_for(model, 16, seed=6)
    _, ref_cache = ref.run_with_cache(reference)
    mean_z = ref_cache["blocks.1.attn.hook_z"][:, :, 2].mean(0)                # [p, e]

    def tl_zero(z, hook):
        z[:, :, 0] = 0.0
        return z

    def tl_mean(z, hook):
        z[:, :, 2] = mean_z
        return z
    expected = ref.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", tl_zero),
                                                     ("blocks.1.attn.hook_z", tl_mean)])
    both = I.ablate_heads(model, [(0, 0)], "zero") + I.ablate_heads(model, [(1, 2)], "mean", reference)
    torch.testing.assert_close(I.run(model, both, tokens), expected, **TOL)


def test_ablating_hook_result_equals_ablating_hook_z_when_zero(pair):
    _, model = pair
    tokens = tokens_for(model, 3)
    z = I.run(model, I.ablate_heads(model, [(1, 1), (0, 2)], "zero"), tokens)
    result = I.run(model, I.ablate_heads(model, [(1, 1), (0, 2)], "zero", at="result"), tokens)
    # Either way the head writes nothing; b_O (shared by the layer's heads) is added after their sum.
    torch.testing.assert_close(z, result, **TOL)


def test_mlp_neurons_mean_ablated_give_transformer_lens_logits():
    ref, model = tl_pair("mlp", seed=7)
    tokens, reference = tokens_for(model, 3), tokens_for(model, 16, seed=8)
    _, ref_cache = ref.run_with_cache(reference)
    idx = [1, 5, 7]
    mean = ref_cache["blocks.1.mlp.hook_post"][:, :, idx].mean(0)

    def tl_hook(post, hook):
        post[:, :, idx] = mean
        return post
    expected = ref.run_with_hooks(tokens, fwd_hooks=[("blocks.1.mlp.hook_post", tl_hook)])
    got = I.run(model, I.ablate_neurons(model, {1: idx}, "mean", reference), tokens)
    torch.testing.assert_close(got, expected, **TOL)


def test_resample_ablation_draws_reference_examples_reproducibly():
    _, model = tl_pair("attn-only")
    tokens, reference = tokens_for(model, 4), tokens_for(model, 16, seed=9)
    a = I.run(model, I.ablate_heads(model, [(0, 1)], "resample", reference, seed=3), tokens)
    b = I.run(model, I.ablate_heads(model, [(0, 1)], "resample", reference, seed=3), tokens)
    c = I.run(model, I.ablate_heads(model, [(0, 1)], "resample", reference, seed=4), tokens)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_positions_and_direct_path_ablations_are_exact():
    _, model = tl_pair("attn-only", seed=1)
    tokens = tokens_for(model, 3)
    no_pos = I.run(model, I.ablate_positions(model), tokens)
    copy = qkov.Transformer(model.cfg).double()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        copy.pos_embed.W_pos.zero_()
    torch.testing.assert_close(no_pos, copy(tokens), **TOL)
    # Without the direct path the logits are every other term of the exact attribution.
    att = C.logit_attribution(model, tokens)
    direct = (att.embed + att.pos_embed)
    torch.testing.assert_close(I.run(model, I.ablate_direct_path(model), tokens), att.logits - direct, **TOL)


def test_pattern_override_one_hot_copies_that_keys_value():
    _, model = tl_pair("attn-only", seed=2)
    tokens = tokens_for(model, 2)
    P = tokens.shape[1]
    one_hot = torch.zeros(P, P, dtype=torch.float64)
    one_hot[:, 0] = 1.0                                                          # every query on key 0
    iv = I.override_pattern(model, 1, 2, one_hot, queries=[3, 5])
    with model.hooks(iv.fwd_hooks(tokens)):
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_z", "blocks.1.attn.hook_v"])
    z, v = cache["blocks.1.attn.hook_z"], cache["blocks.1.attn.hook_v"]
    torch.testing.assert_close(z[:, [3, 5], 2], v[:, [0, 0], 2], **TOL)
    _, plain = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_z")
    torch.testing.assert_close(z[:, 4], plain["blocks.1.attn.hook_z"][:, 4])   # other queries untouched


def test_positions_removed_from_keys_only():
    _, model = tl_pair("attn-only", seed=3, n_layers=1)
    tokens = tokens_for(model, 2)
    iv = I.remove_positions(model, 0, heads=[1], inputs="k")
    with model.hooks(iv.fwd_hooks(tokens)):
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_k", "blocks.0.attn.hook_q"])
    _, plain = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_k", "blocks.0.attn.hook_q"])
    W_K, b_K = model.blocks[0].attn.W_K[1], model.blocks[0].attn.b_K[1]
    torch.testing.assert_close(cache["blocks.0.attn.hook_k"][:, :, 1], model.W_E[tokens] @ W_K + b_K, **TOL)
    torch.testing.assert_close(cache["blocks.0.attn.hook_k"][:, :, 0], plain["blocks.0.attn.hook_k"][:, :, 0])
    torch.testing.assert_close(cache["blocks.0.attn.hook_q"], plain["blocks.0.attn.hook_q"])


def test_path_ablation_takes_the_sender_out_of_the_receivers_keys_only():
    _, model = tl_pair("mlp-LN", seed=5)
    tokens = tokens_for(model, 2)
    iv = PA.ablate_path(model, (0, 1), [(1, 0)], inputs="k", how="zero")
    names = ["blocks.1.hook_k_input", "blocks.1.hook_q_input", "blocks.0.attn.hook_result", "blocks.1.hook_resid_pre"]
    with model.hooks(iv.fwd_hooks(tokens)):
        _, cache = model.run_with_cache(tokens, names_filter=names)
    resid, sent = cache["blocks.1.hook_resid_pre"], cache["blocks.0.attn.hook_result"][:, :, 1]
    torch.testing.assert_close(cache["blocks.1.hook_k_input"][:, :, 0], resid - sent, **TOL)
    torch.testing.assert_close(cache["blocks.1.hook_k_input"][:, :, 1], resid, **TOL)
    torch.testing.assert_close(cache["blocks.1.hook_q_input"][:, :, 0], resid, **TOL)
    with pytest.raises(QkovError, match="after the sender"):
        PA.ablate_path(model, (1, 0), [(0, 1)], how="zero")


def test_copying_ov_replaces_a_heads_logits_by_its_diagonal():
    _, model = tl_pair("attn-only", seed=6, n_layers=1, n_heads=1, d_head=16, d_vocab_out=13)
    tokens = tokens_for(model, 3)
    att = C.logit_attribution(model, tokens)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    pattern = cache["blocks.0.attn.hook_pattern"][:, 0]                          # [b, q, k]
    diag = C.full_ov(model, 0, 0).AB.diagonal()
    copy = torch.zeros_like(att.logits)
    copy.scatter_add_(2, tokens[:, None, :].expand_as(pattern), pattern * diag[tokens][:, None, :])
    expected = att.logits - att.heads[:, :, 0, 0] + copy
    torch.testing.assert_close(I.run(model, PA.copying_ov(model, 0, 0), tokens), expected, **TOL)


def test_neuron_inputs_on_every_frequency_change_nothing():
    task = qkov.get_task("add", max_sum=15)
    model = qkov.Transformer(task.model_config(), seed=1).double()
    tokens = task.dataset("all").tokens
    every = PA.neuron_inputs_on_frequencies(model, range(1, 9), n_tokens=16)
    torch.testing.assert_close(I.run(model, every, tokens), model(tokens), **TOL)
    none_removed = PA.neuron_inputs_on_frequencies(model, [], n_tokens=16, remove=True)
    torch.testing.assert_close(I.run(model, none_removed, tokens), model(tokens), **TOL)
    some = PA.neuron_inputs_on_frequencies(model, [1, 2], n_tokens=16)
    assert not torch.allclose(I.run(model, some, tokens), model(tokens))
    with pytest.raises(QkovError, match="out of range"):
        PA.neuron_inputs_on_frequencies(model, [9], n_tokens=16)


def test_evaluate_gives_the_tasks_metrics_by_length():
    task = qkov.get_task("max")
    model = qkov.Transformer(task.model_config())
    iv = I.Interventions(model, task)
    before, after = iv.evaluate(), iv.evaluate(iv.ablate_heads([(0, 0)], "mean"))
    assert before == task.evaluate(model)
    assert set(after["by_length"]) == {"2", "3", "4", "5", "6"} and after != before


def test_mistakes_get_one_line_errors():
    task = qkov.get_task("max")
    model = qkov.Transformer(task.model_config())
    with pytest.raises(QkovError, match="expected one of zero, mean, resample"):
        I.ablate_heads(model, [(0, 0)], "average")
    with pytest.raises(QkovError, match="head 0.3 does not exist"):
        I.ablate_heads(model, [(0, 3)], "zero")
    with pytest.raises(QkovError, match="needs reference tokens"):
        I.ablate_heads(model, [(0, 0)], "mean")
    with pytest.raises(QkovError, match="attention-only"):
        I.ablate_neurons(model, {0: [1]}, "zero")
    with pytest.raises(QkovError, match="at least as long"):
        I.run(model, I.ablate_heads(model, [(0, 0)], "mean", torch.zeros(4, 3, dtype=torch.long)),
              torch.zeros(2, 5, dtype=torch.long))


def test_analyze_lists_each_tasks_checks_and_the_cli_prints_them():
    from qkov.cli import format_summary

    task = qkov.get_task("max")
    d = qkov.analyze(qkov.Transformer(task.model_config()), task).to_dict()
    assert [c["id"] for c in d["checks"]] == ["qk_selects_max", "head_needed", "positions_in_qk", "ov_copies"]
    for c in d["checks"]:
        assert set(c) == {"id", "text", "intervention", "metric", "before", "after", "holds"}
        assert c["before"] == pytest.approx(d["eval"]["accuracy"], abs=1e-6)
    text = format_summary(d)
    assert "does the story hold?" in text and "qk_selects_max" in text
    assert qkov.analyze(qkov.Transformer(task.model_config()), task, checks=False).checks == []


@pytest.mark.slow
@pytest.mark.parametrize("name", ["max", "add", "fib", "induction", "modadd"])
def test_reference_models_checks_go_the_way_the_story_says(trained, name):
    from conftest import SMALL_MODADD

    run = trained(name, **(SMALL_MODADD if name == "modadd" else {}))
    checks = {c["id"]: c for c in qkov.analyze(run.model, run.task).checks}
    after = {k: c["after"] for k, c in checks.items()}
    if name == "max":
        assert after["qk_selects_max"] >= 0.99 and after["head_needed"] <= 0.2
        assert after["positions_in_qk"] >= 0.99 and after["ov_copies"] >= 0.99
    elif name in ("add", "fib"):
        # The named frequencies carry most of what the neurons read, but not all of it: projected onto
        # them accuracy stays far above chance (and far above what is left without them) yet drops.
        assert after["key_frequencies_needed"] <= 0.2
        assert after["key_frequencies_suffice"] >= 3 * after["key_frequencies_needed"]
        assert after["key_frequencies_suffice"] < checks["key_frequencies_suffice"]["before"]
    elif name == "induction":
        assert all(checks[k]["holds"] for k in ("previous_token_needed", "k_composition_path", "induction_head_needed"))
        assert after["previous_token_needed"] > 3 * checks["previous_token_needed"]["before"]
    else:
        assert checks["restricted_loss"]["holds"] and checks["excluded_loss"]["holds"]
