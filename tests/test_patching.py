"""Activation patching returns transformer_lens.patching's values on the same weights; path and
edge patching equal the hooks they stand for; attribution patching is exact where the metric is
linear; mistakes get one-line errors."""

import pytest
import torch

from qkov import edges as E
from qkov import patching as P
from qkov.corrupted import Corrupted, RowEdit, block_rows, tail_rows, unembed
from qkov.errors import QkovError

tl = pytest.importorskip("transformer_lens")
import transformer_lens.patching as TLP  # noqa: E402
from tl_copies import tl_pair, to_transformer_lens, tokens_for  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
TLP.tqdm = lambda rows, **kw: rows                                             # no progress bars in tests

GRIDS = ["get_act_patch_resid_pre", "get_act_patch_resid_mid", "get_act_patch_attn_out", "get_act_patch_mlp_out",
         "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_out_all_pos",
         "get_act_patch_attn_head_q_by_pos", "get_act_patch_attn_head_k_by_pos", "get_act_patch_attn_head_v_by_pos",
         "get_act_patch_attn_head_q_all_pos", "get_act_patch_attn_head_k_all_pos", "get_act_patch_attn_head_v_all_pos",
         "get_act_patch_attn_head_pattern_by_pos", "get_act_patch_attn_head_pattern_all_pos",
         "get_act_patch_attn_head_pattern_dest_src_pos", "get_act_patch_block_every",
         "get_act_patch_attn_head_all_pos_every", "get_act_patch_attn_head_by_pos_every"]


def pairs_of(model, shared_prefix: int, seed: int = 0, batch: int = 3):
    """Clean and corrupted tokens equal on their first ``shared_prefix`` positions."""
    clean, other = tokens_for(model, batch, seed), tokens_for(model, batch, seed + 1)
    corrupted = torch.cat([clean[:, :shared_prefix], other[:, shared_prefix:]], 1)
    answer = clean[:, -1] % model.cfg.vocab_out

    def metric(logits):
        return logits[:, -1].log_softmax(-1).gather(-1, answer[:, None]).mean()
    return clean, corrupted, metric


def assert_same_values(ours, theirs):
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours.to(theirs.dtype), theirs, rtol=1e-5, atol=1e-6)


CASES = [pytest.param("mlp-LN", 3, False, id="mlp-LN-shared-prefix")] + [
    pytest.param(arch, shared, True, id=f"{arch}-{'shared-prefix' if shared else 'all-corrupted'}",
                 marks=pytest.mark.slow)
    for arch, shared in [("mlp-LN", 0), ("mlp", 0), ("mlp", 3), ("attn-only-LN", 0), ("attn-only-LN", 3)]]


@pytest.mark.parametrize("arch, shared, every", CASES)
def test_every_patching_function_returns_transformer_lens_values(arch, shared, every):
    ref, model = tl_pair(arch, seed=1, dtype=torch.float32, n_ctx=6)
    clean, corrupted, metric = pairs_of(model, shared)
    _, ours, = model.run_with_cache(clean)
    _, theirs = ref.run_with_cache(clean)
    for name in GRIDS:
        if ref.cfg.attn_only and ("resid_mid" in name or "mlp_out" in name or "block_every" in name):
            continue        # TransformerLens has no MLP activations to patch (qkov's hook_mlp_out is zero)
        if not every and ("dest_src" in name or "every" in name):
            continue        # the quick run: each grid once (the slow runs take the composites too)
        expected = getattr(TLP, name)(ref, corrupted, theirs, metric)
        assert_same_values(getattr(P, name)(model, corrupted, ours, metric), expected)


@pytest.mark.slow
def test_patching_the_trained_induction_model_returns_transformer_lens_values(trained):
    model = trained("induction").model.eval()
    ref = to_transformer_lens(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (8, 16), generator=g), torch.randint(0, 256, (8, 16), generator=g)
    clean, corrupted = torch.cat([x, x], 1), torch.cat([x, y], 1)
    targets = clean[:, 17:]

    def metric(logits):
        return logits[:, 16:-1].log_softmax(-1).gather(-1, targets[..., None]).mean()
    _, ours = model.run_with_cache(clean)
    _, theirs = ref.run_with_cache(clean)
    for name in [g for g in GRIDS if not any(x in g for x in ("resid_mid", "mlp_out", "dest_src", "every"))]:
        assert_same_values(getattr(P, name)(model, corrupted, ours, metric),
                           getattr(TLP, name)(ref, corrupted, theirs, metric))


ROW_PATCHES = ["resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "mlp_out"]


def _patch_row(act: str, clean: torch.Tensor, row: int, head: int):
    """A hook putting the clean ``act`` in at one position (one head, for a head's activation)."""
    def hook(x, hook):
        x = x.clone()
        if act == "pattern":
            x[:, head, row] = clean[:, head, row]
        elif x.ndim == 4:
            x[:, row, head] = clean[:, row, head]
        else:
            x[:, row] = clean[:, row]
        return x
    return hook


@pytest.mark.parametrize("arch", ["mlp-LN", "attn-only"])
def test_a_patched_row_continued_equals_the_full_rerun(arch):
    # block_rows runs three variants, each patching a different row, side by side: at that row
    # alone, or at every row from the first on; tail_rows and unembed take them to the logits.
    # Each must equal the model's own forward with the same patch as a hook.
    _, model = tl_pair(arch, seed=7, n_ctx=6)
    clean, corrupted, _ = pairs_of(model, 0)
    _, cc = model.run_with_cache(clean)
    run, _ = Corrupted.run(model, corrupted)
    rows, head, start = torch.tensor([3, 1, 5]), 1, 1
    for act in [a for a in ROW_PATCHES if model.cfg.d_mlp is not None or a not in ("resid_mid", "mlp_out")]:
        c_act = cc[P.act_name(act, 0)]
        value = (c_act[:, :, rows] if act == "pattern" else c_act[:, rows]).movedim(1 + (act == "pattern"), 0)
        mask = torch.zeros(len(rows), *value.shape[2:], dtype=torch.bool)
        mask[:, head] = True
        if c_act.ndim == 3:
            mask[:] = True
        x_new = value if act == "resid_pre" else None
        edit = None if act == "resid_pre" else RowEdit(act, mask, value)
        with torch.no_grad():
            own_row = block_rows(model, run, 0, rows, None, x_new=x_new, edit=edit)           # [c, B, 1, d]
            from_start = block_rows(model, run, 0, rows, start, x_new=x_new, edit=edit)       # [c, B, P - start, d]
            logits = unembed(model, tail_rows(model, run, 1, start, from_start))
        for j, r in enumerate(rows.tolist()):
            hook = [(P.act_name(act, 0), _patch_row(act, c_act, r, head))]
            with torch.no_grad(), model.hooks(fwd_hooks=hook):
                expected_logits, cache = model.run_with_cache(corrupted, names_filter="blocks.0.hook_resid_post")
            after = cache["blocks.0.hook_resid_post"]                                         # [B, P, d]
            torch.testing.assert_close(from_start[j], after[:, start:], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(logits[j], expected_logits[:, start:], rtol=1e-5, atol=1e-5)
            if act not in ("resid_pre", "k", "v"):     # row-local: only the patched row's output changes
                torch.testing.assert_close(own_row[j, :, 0], after[:, r], rtol=1e-5, atol=1e-6)
                assert not torch.equal(after[:, r], run.resid[1][:, r])                     # the patch did something
                others = [p for p in range(after.shape[1]) if p != r]
                torch.testing.assert_close(after[:, others], run.resid[1][:, others], rtol=0, atol=0)


@pytest.mark.parametrize("sharp", [30.0, 3000.0])
@pytest.mark.parametrize("arch", ["mlp-LN", "attn-only"])
def test_a_patched_residual_stream_with_sharp_attention_equals_the_full_rerun(arch, sharp):
    # A patched residual stream's later rows in its layer are the corrupted attention updated in
    # one term: through the old and new weights on the patched row where that weight is at most
    # 1/2, through the row's attention to every other key where it is over 1/2 (1 - a would lose
    # digits there). Queries scaled up make the patterns sharp, so that both kinds of rows occur
    # (x3000: most rows one-hot to the float, the other keys' weights underflowing to zero); every
    # variant must equal the model's own forward with the patch as a hook.
    _, model = tl_pair(arch, seed=3, n_ctx=8)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.mul_(sharp)
    clean, corrupted, _ = pairs_of(model, 0)
    _, cc = model.run_with_cache(clean)
    run, _ = Corrupted.run(model, corrupted)
    rows, start, n_ctx = torch.tensor([2, 3, 6]), 2, clean.shape[1]
    weight = run.pattern[0][:, :, start:][..., rows]                          # [B, h, rows start.., variant]
    sees = torch.arange(start, n_ctx)[:, None] > rows                          # the rows after each variant's
    assert (weight[..., sees] > 0.5).any() and (weight[..., sees] <= 0.5).any()
    resid = cc["blocks.0.hook_resid_pre"]
    with torch.no_grad():
        out = block_rows(model, run, 0, rows, start, x_new=resid[:, rows].transpose(0, 1))   # [c, B, P - start, d]
    for j, r in enumerate(rows.tolist()):
        hook = [(P.act_name("resid_pre", 0), _patch_row("resid_pre", resid, r, 0))]
        with torch.no_grad(), model.hooks(fwd_hooks=hook):
            _, cache = model.run_with_cache(corrupted, names_filter="blocks.0.hook_resid_post")
        torch.testing.assert_close(out[j], cache["blocks.0.hook_resid_post"][:, start:], rtol=1e-5, atol=1e-6)


def _add_at(name: str, delta: torch.Tensor, head: int | None = None):
    def hook(x, hook):
        x = x.clone()
        if head is None:
            x += delta
        else:
            x[:, :, head] += delta
        return x
    return [(name, hook)]


def test_path_patching_equals_the_hooks_it_stands_for():
    _, model = tl_pair("mlp-LN", seed=2, n_ctx=6)
    clean, corrupted, metric = pairs_of(model, 2)
    _, cc = model.run_with_cache(clean)
    _, kc = model.run_with_cache(corrupted)
    head = lambda c, l, h: torch.einsum("bpe,ed->bpd", c[f"blocks.{l}.attn.hook_z"][:, :, h],  # noqa: E731
                                        model.blocks[l].attn.W_O[h].detach())
    grid = E.get_path_patch_head_to_logits(model, corrupted, cc, metric)
    for l, h in [(0, 1), (1, 2)]:
        delta = head(cc, l, h) - head(kc, l, h)
        manual = metric(model.run_with_hooks(corrupted, fwd_hooks=_add_at("blocks.1.hook_resid_post", delta)))
        torch.testing.assert_close(grid[l, h].double(), manual.double(), rtol=1e-5, atol=1e-6)
    into_k = E.get_path_patch_head_to_head(model, corrupted, cc, metric, receiver=(1, 0), inputs="k")
    delta = head(cc, 0, 2) - head(kc, 0, 2)
    manual = metric(model.run_with_hooks(corrupted, fwd_hooks=_add_at("blocks.1.hook_k_input", delta, head=0)))
    assert into_k.shape == (1, 3)
    torch.testing.assert_close(into_k[0, 2].double(), manual.double(), rtol=1e-5, atol=1e-6)


def test_edge_patching_scores_every_edge_exactly():
    _, model = tl_pair("mlp", seed=3, n_ctx=6)
    clean, corrupted, metric = pairs_of(model, 2)
    _, cc = model.run_with_cache(clean)
    _, kc = model.run_with_cache(corrupted)
    exact = E.edge_patching(model, corrupted, cc, metric)
    # 2 layers, 3 heads, MLPs: layer 0's 9 head inputs read 2 writers, its MLP 5, layer 1's head
    # inputs 6, its MLP 9, the logits 10.
    assert len(exact.edges) == 9 * 2 + 5 + 9 * 6 + 9 + 10
    base = metric(model(corrupted))
    scores = dict(zip(exact.edges, exact.scores.tolist()))
    delta = cc["blocks.0.hook_mlp_out"] - kc["blocks.0.hook_mlp_out"]
    manual = metric(model.run_with_hooks(corrupted, fwd_hooks=_add_at("blocks.1.hook_v_input", delta, head=1)))
    assert scores[("m0", "a1.1.v")] == pytest.approx(float(manual - base), rel=1e-5, abs=1e-6)
    assert scores[("pos", "logits")] == 0.0                                        # positions are shared
    delta = cc["hook_embed"] - kc["hook_embed"]
    manual = metric(model.run_with_hooks(corrupted, fwd_hooks=_add_at("blocks.0.hook_mlp_in", delta)))
    assert scores[("embed", "m0")] == pytest.approx(float(manual - base), rel=1e-5, abs=1e-6)


def test_attribution_patching_is_exact_where_the_metric_is_linear():
    _, model = tl_pair("attn-only", seed=4, n_ctx=6)
    clean, corrupted, _ = pairs_of(model, 1)
    _, cc = model.run_with_cache(clean)

    def metric(logits):                                   # linear in the logits, which are linear in
        return logits[:, -1, 3].mean()                    # the unembedding's input (no LayerNorm)
    exact = E.edge_patching(model, corrupted, cc, metric)
    into_logits = [i for i, (_, r) in enumerate(exact.edges) if r == "logits"]
    for approx in (E.eap(model, corrupted, cc, metric), E.eap_ig(model, corrupted, cc, metric, steps=3)):
        assert approx.edges == exact.edges
        torch.testing.assert_close(approx.scores[into_logits], exact.scores[into_logits], rtol=1e-4, atol=1e-6)
    rho = E.spearman(E.eap_ig(model, corrupted, cc, metric).scores, exact.scores)
    assert 0.5 < rho <= 1.0


def test_spearman_matches_the_textbook_with_ties():
    a = torch.tensor([1.0, 2.0, 2.0, 4.0, 5.0])
    b = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])
    # ranks a: 1, 2.5, 2.5, 4, 5; b: 2, 1, 4, 3, 5 -> Pearson of the ranks
    ra, rb = torch.tensor([1, 2.5, 2.5, 4, 5]), torch.tensor([2.0, 1, 4, 3, 5])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    assert E.spearman(a, b) == pytest.approx(float(ra @ rb / (ra.norm() * rb.norm())))
    assert E.spearman(a, -a) == pytest.approx(-1.0)


def test_mistakes_get_one_line_errors():
    _, model = tl_pair("attn-only", seed=5, n_ctx=6)
    clean, corrupted, metric = pairs_of(model, 0)
    _, cc = model.run_with_cache(clean)
    with pytest.raises(QkovError, match=r"same shape"):
        P.get_act_patch_resid_pre(model, corrupted[:, :4], cc, metric)
    with pytest.raises(QkovError, match=r"returned a tensor of shape \(3,\); it must return a scalar"):
        P.get_act_patch_resid_pre(model, corrupted, cc, lambda logits: logits[:, -1, 0])
    with pytest.raises(QkovError, match="attention-only"):
        P.get_act_patch_resid_mid(model, corrupted, cc, metric)
    with pytest.raises(QkovError, match="clean_cache has no blocks.0.hook_resid_pre"):
        P.get_act_patch_resid_pre(model, corrupted, {}, metric)
    with pytest.raises(QkovError, match="after layer 0"):
        E.get_path_patch_head_to_head(model, corrupted, cc, metric, receiver=(0, 1))
    with pytest.raises(QkovError, match="differentiates the metric"):
        E.eap(model, corrupted, cc, lambda logits: float(logits.mean()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_interventions_and_patching_on_the_gpu_equal_the_cpu():
    import copy

    from qkov import interventions as I
    from qkov import path_ablations as PA

    _, model = tl_pair("mlp-LN", seed=6, n_ctx=6)
    gpu = copy.deepcopy(model).cuda()
    clean, corrupted, metric = pairs_of(model, 2)
    reference = tokens_for(model, 8, seed=9)
    for build in (lambda m: I.ablate_heads(m, [(1, 2)], "mean", reference),
                  lambda m: I.ablate_heads(m, [(0, 1)], "resample", reference, seed=2),
                  lambda m: I.remove_positions(m, 0, inputs="k") + I.ablate_neurons(m, {1: [0, 3]}, "zero"),
                  lambda m: PA.ablate_path(m, (0, 1), [(1, 0)], "k", "mean", reference)):
        torch.testing.assert_close(I.run(gpu, build(gpu), clean).cpu(), I.run(model, build(model), clean))
    _, cpu_cache = model.run_with_cache(clean)
    _, gpu_cache = gpu.run_with_cache(clean.cuda())
    gpu_metric = lambda logits: metric(logits.cpu())  # noqa: E731
    for name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos"):
        torch.testing.assert_close(getattr(P, name)(gpu, corrupted, gpu_cache, gpu_metric).cpu(),
                                   getattr(P, name)(model, corrupted, cpu_cache, metric), rtol=1e-5, atol=1e-6)
    for fn in (E.edge_patching, E.eap):
        torch.testing.assert_close(fn(gpu, corrupted, gpu_cache, gpu_metric).scores,
                                   fn(model, corrupted, cpu_cache, metric).scores, rtol=1e-4, atol=1e-6)
