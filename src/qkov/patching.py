"""Activation patching with TransformerLens's names, signatures and values, batched.

Each ``get_act_patch_*`` function takes ``(model, corrupted_tokens, clean_cache,
patching_metric)`` as ``transformer_lens.patching``'s does and returns a tensor of the same
shape and values: for every index of its grid (layer, position, head, ...), the metric of the
corrupted run with that one activation patched in from the clean run. Where TransformerLens runs
one forward per index, these run the patched variants of a layer side by side, in chunks of
bounded memory, and only what the patch can change (:mod:`qkov.corrupted`): a patch at one
position leaves the earlier positions as the corrupted run has them; a head's output, query or
pattern, ``attn_out``, ``resid_mid`` or ``mlp_out`` at one position change only that position's
output in their layer, so the layer is computed there alone and the next sees one changed row. A
variant whose clean and corrupted activations are equal is the corrupted run itself and is not
run again. ``patching_metric(logits [batch, pos, d_vocab_out])`` must return a scalar; it runs
under ``torch.inference_mode()``, as the whole grid does (no autograd is recorded). Path
patching, exact edge patching and attribution patching are in :mod:`qkov.edges`.

>>> import qkov
>>> model = qkov.Transformer(qkov.ModelConfig(n_layers=2, n_heads=2, d_model=16, d_vocab=10, n_ctx=5))
>>> clean, corrupted = torch.tensor([[1, 2, 3, 1, 2]]), torch.tensor([[1, 2, 4, 1, 2]])
>>> _, clean_cache = model.run_with_cache(clean)
>>> metric = lambda logits: logits[:, -1, 3].mean()
>>> get_act_patch_resid_pre(model, corrupted, clean_cache, metric).shape
torch.Size([2, 5])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .corrupted import Corrupted, Metric, RowEdit, block_rows, check_metric_value, tail_rows, unembed
from .devices import model_device
from .errors import QkovError

# Elements of the largest activation (usually the logits) in one batched forward. Small on
# purpose: on a CPU, forwards that stay in cache ran 2.5x faster per row than 16x larger ones.
CHUNK_ELEMENTS = 1 << 19

# activation -> (hook name in block l, the dims of [batch, ...] that a grid index picks)
_ACTS = {
    "resid_pre": ("hook_resid_pre", ("pos",)), "resid_mid": ("hook_resid_mid", ("pos",)),
    "attn_out": ("hook_attn_out", ("pos",)), "mlp_out": ("hook_mlp_out", ("pos",)),
    "z": ("attn.hook_z", ("pos", "head")), "q": ("attn.hook_q", ("pos", "head")),
    "k": ("attn.hook_k", ("pos", "head")), "v": ("attn.hook_v", ("pos", "head")),
    "pattern": ("attn.hook_pattern", ("head", "dest_pos", "src_pos")),
}


def act_name(activation: str, layer: int) -> str:
    """TransformerLens's ``utils.get_act_name(activation, layer)`` for the names used here."""
    return f"blocks.{layer}.{_ACTS[activation][0]}"


def check_tokens(model, tokens: Tensor, clean_cache: Mapping[str, Tensor], name: str) -> Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2:
        raise QkovError(f"corrupted_tokens must be [batch, pos]; got shape {tuple(tokens.shape)}")
    if name not in clean_cache:
        raise QkovError(f"clean_cache has no {name}; make it with model.run_with_cache(clean_tokens)")
    clean = clean_cache[name]
    batch_pos = (clean.shape[0], clean.shape[2] if "hook_pattern" in name else clean.shape[1])
    if batch_pos != tuple(tokens.shape):
        raise QkovError(f"the clean run's {name} is for tokens of shape {batch_pos} but corrupted_tokens are "
                        f"{tuple(tokens.shape)}; clean and corrupted prompts must have the same shape")
    return tokens.to(model_device(model))


def _mask(act_shape: torch.Size, dims: Sequence[int], indices: Sequence[tuple[int, ...]], device) -> Tensor:
    """``[variants, 1, ...]``: True where variant j patches (its index along ``dims``)."""
    shape = [1] * len(act_shape)
    for d in dims:
        shape[d] = act_shape[d]
    mask = torch.zeros(len(indices), *shape[1:], dtype=torch.bool, device=device)
    if indices:
        j = torch.arange(len(indices), device=device)
        idx = [torch.zeros_like(j)] * (len(act_shape) - 1)
        for axis, d in enumerate(dims):
            idx[d - 1] = torch.tensor([ix[axis] for ix in indices], device=device)
        mask[(j, *idx)] = True
    return mask[:, None]


def patch_grid(model, corrupted_tokens: Tensor, clean_cache: Mapping[str, Tensor], patching_metric: Metric,
               activation: str, axes: Sequence[str]) -> Tensor:
    """The metric for every index of ``axes`` (``"layer"`` first, then TransformerLens's axis
    names among ``pos``, ``head``, ``head_index``, ``dest_pos``, ``src_pos``) with that slice of
    ``activation`` patched from ``clean_cache`` into the corrupted run: a tensor shaped by the axes."""
    cfg = model.cfg
    hook, act_axes = _ACTS[activation]
    if activation == "resid_mid" and cfg.d_mlp is None:
        raise QkovError("resid_mid exists only between attention and an MLP; this model is attention-only")
    axes = [("head" if a == "head_index" else a) for a in axes]
    if axes[0] != "layer" or not set(axes[1:]) <= set(act_axes):
        raise QkovError(f"axes {axes} do not index {activation}; expected 'layer' then some of {act_axes}")
    tokens = check_tokens(model, corrupted_tokens, clean_cache, act_name(activation, 0))
    B, P = tokens.shape
    sizes = {"pos": P, "dest_pos": P, "src_pos": P, "head": cfg.n_heads}
    grid = list(itertools.product(*(range(sizes[a]) for a in axes[1:])))
    dims = [1 + act_axes.index(a) for a in axes[1:]]
    query = next((i for i, a in enumerate(axes[1:]) if a in ("pos", "dest_pos")), None)   # the patched row
    out = torch.zeros(cfg.n_layers, *(sizes[a] for a in axes[1:]), device=tokens.device)
    names = [act_name(activation, layer) for layer in range(cfg.n_layers)]
    with torch.inference_mode():
        run, corrupt = Corrupted.run(model, tokens, names)
        base = check_metric_value(patching_metric(run.logits))
        for layer, name in enumerate(names):
            clean = clean_cache[name].to(tokens.device)
            changes = _changes(clean, corrupt[name], dims)
            live = [ix for ix in grid if changes[ix]]
            values = dict.fromkeys(grid, base)
            if query is None or not Corrupted.rows_continue(model):   # every position, the model's forward
                values.update(_run_variants(model, run, layer, name, clean, dims, live, patching_metric))
            else:
                values.update(_run_rows(model, run, layer, activation, clean, dims, query, live, patching_metric))
            out[layer] = torch.tensor([values[ix] for ix in grid], dtype=out.dtype).view(out.shape[1:])
    return out


def _changes(clean: Tensor, corrupt: Tensor, dims: Sequence[int]) -> Tensor:
    """For every grid index (over ``dims``, in their order), whether patching it changes anything
    (its clean and corrupted slices differ somewhere)."""
    rest = tuple(d for d in range(clean.ndim) if d not in dims)
    # The largest difference, not ne().any(): a float reduction runs several times faster than a
    # boolean one on the CPU. (NaN, where either is NaN, counts as a difference.)
    gap = (clean - corrupt).abs_()
    differs = (gap.amax(dim=rest) if rest else gap).ne(0)                         # dims in increasing order
    return differs.permute(*(sorted(dims).index(d) for d in dims)).cpu()


def patcher(mask: Tensor, clean: Tensor) -> Callable:
    """A hook on a batch of ``c`` variants side by side (``[c * batch, ...]``) that puts
    ``clean [batch, ...]`` where ``mask [c, 1, ...]`` is True."""
    c = mask.shape[0]

    def patch(x: Tensor, hook) -> Tensor:
        x = x.view(c, *clean.shape)
        return torch.where(mask, clean.to(x.dtype)[None], x).view(c * clean.shape[0], *clean.shape[1:])
    return patch


def row_width(model) -> int:
    """The largest activation of one position (logits, per-head inputs, MLP): what a forward's
    memory grows by per row."""
    cfg = model.cfg
    return max(cfg.vocab_out, cfg.d_model * max(2, cfg.n_heads), cfg.d_mlp or 0)


def _chunks(indices: list[tuple[int, ...]], query: int | None, P: int, rows: int,
            tail: bool = True) -> list[list[tuple[int, ...]]]:
    """Variants in forwards of at most ``rows`` sequence positions each (variants × the rows each
    runs: from its query position on with ``tail``, else one): those patching the same query
    position together, and neighbouring positions merged while that recomputes at most a quarter
    more rows than running each from its own position, or at most ``rows // 4`` more (a forward's
    fixed cost is worth about that many)."""
    start = (lambda ix: ix[query]) if query is not None else (lambda ix: 0)
    span = (lambda p: P - p) if tail else (lambda p: 1)
    out: list[list[tuple[int, ...]]] = []
    for ix in sorted(indices, key=start):
        if out:
            group = out[-1] + [ix]
            cost, ideal = len(group) * span(start(group[0])), sum(span(start(g)) for g in group)
            if cost <= rows and (cost <= 1.25 * ideal or cost - ideal <= rows // 4):
                out[-1] = group
                continue
        out.append([ix])
    return out


def _run_variants(model, run: Corrupted, layer: int, name: str, clean: Tensor, dims: Sequence[int],
                  indices: list[tuple[int, ...]], metric: Metric) -> dict[tuple[int, ...], float]:
    """Run the patched variants ``indices`` of ``name`` (each at every position) side by side,
    from ``layer`` on, through the model's forward."""
    B = run.logits.shape[0]
    values: dict[tuple[int, ...], float] = {}
    for part in _chunks(indices, None, run.logits.shape[1], max(1, CHUNK_ELEMENTS // (B * row_width(model)))):
        patch = patcher(_mask(clean.shape, dims, part, clean.device), clean)
        values.update(zip(part, run.metrics(model, layer, 0, len(part), [(name, patch)], metric)))
    return values


# Activations whose patch changes only its own row's output in its layer (a query, a pattern row,
# a head's output, ...); a patched residual stream, key or value also changes later rows' attention.
ROW_LOCAL = ("q", "pattern", "z", "attn_out", "resid_mid", "mlp_out")


def _run_rows(model, run: Corrupted, layer: int, activation: str, clean: Tensor, dims: Sequence[int], query: int,
              indices: list[tuple[int, ...]], metric: Metric) -> dict[tuple[int, ...], float]:
    """Run the variants ``indices`` that each patch ``activation`` at one position
    (``indices[j][query]``) of ``layer``, side by side (:func:`qkov.corrupted.block_rows`): a
    row-local patch at that row alone, and then (or a residual stream, key or value at once) every
    row from the chunk's first patched position on; from the layer after that, the model's forward."""
    (B, P), last = run.logits.shape[:2], model.cfg.n_layers - 1
    local = activation in ROW_LOCAL
    budget = max(1, CHUNK_ELEMENTS // (B * max(row_width(model), model.cfg.n_heads * P)))
    values: dict[tuple[int, ...], float] = {}
    if activation == "resid_pre":
        # The residual stream's rows through its own layer hold no [pos, pos] scores and no logits:
        # [d_model] wide, so the layer runs in few large chunks (every variant's rows from the
        # chunk's first start), and the layers after in chunks of the usual size.
        cfg = model.cfg
        narrow = max(1, CHUNK_ELEMENTS // (B * max(cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.d_mlp or 0))
                     // (P - min((ix[query] for ix in indices), default=0)))
        for group in _chunks(indices, query, P, narrow, tail=False):
            rows = torch.tensor([ix[query] for ix in group], device=clean.device)
            g0 = group[0][query]
            first = block_rows(model, run, layer, rows, g0, x_new=clean[:, rows].transpose(0, 1))
            done = 0
            for part in (_chunks(group, query, P, budget) if layer < last else [group]):
                p0 = part[0][query]
                new = first[done:done + len(part), :, p0 - g0:]
                values.update(_finish(model, run, layer + 1, part, [ix[query] for ix in part], new, metric))
                done += len(part)
        return values
    for part in _chunks(indices, query, P, budget, tail=not (local and layer == last)):
        rows = torch.tensor([ix[query] for ix in part], device=clean.device)   # [c]
        c, p0 = len(part), int(rows.min())
        new = block_rows(model, run, layer, rows, None if local else p0,
                         edit=_row_edit(activation, clean, dims, query, part, rows))
        after = layer + 1
        if local and layer == last:             # one changed row, and nothing after it but the unembedding
            values.update(zip(part, run.scores(lambda j: unembed(model, new[j]), c, rows, metric)))  # noqa: B023
            continue
        if local:                               # one changed row: its key and value reach the later rows
            new = block_rows(model, run, layer + 1, rows, p0, x_new=new[:, :, 0])
            after = layer + 2
        values.update(_finish(model, run, after, part, rows.tolist(), new, metric))
    return values


def _finish(model, run: Corrupted, after: int, part: list[tuple[int, ...]], starts: list[int], new: Tensor,
            metric: Metric) -> dict[tuple[int, ...], float]:
    """The metric of each variant in ``part`` from its residual stream before layer ``after`` at rows
    ``starts[0]..`` (``new [c, B, n, d]``; ``starts`` ascending, variant ``j``'s rows before
    ``starts[j]`` the corrupted ones): every row from ``starts[0]`` on runs the layers left."""
    p0 = starts[0]
    for later in range(after, model.cfg.n_layers):
        new = tail_rows(model, run, later, p0, new)
    # Each variant's logits are made as its metric is read: a chunk's logits at once would
    # be the largest tensor here, and written, copied and read out of cache.
    return dict(zip(part, run.scores(lambda j: unembed(model, new[j, :, starts[j] - p0:]), len(part), p0, metric,
                                     starts)))


def _row_edit(activation: str, clean: Tensor, dims: Sequence[int], query: int, part: list[tuple[int, ...]],
              rows: Tensor) -> RowEdit:
    """Each variant's patch as a :class:`~qkov.corrupted.RowEdit`: the clean activation at its
    row (``[c, B, *row]``), where its other grid indices (a head, a source position) point."""
    at = dims[query]                                                            # the position's dim in clean
    value = clean.index_select(at, rows).movedim(at, 0)                         # [c, B, *row]
    mask = torch.zeros(len(part), *value.shape[2:], dtype=torch.bool, device=clean.device)
    for j, ix in enumerate(part):
        where: list = [j] + [slice(None)] * (mask.ndim - 1)
        for axis, d in enumerate(dims):
            if axis != query:
                where[d - (1 if d > at else 0)] = ix[axis]   # clean's dim d, in [c, *row] (no B, no position)
        mask[tuple(where)] = True
    return RowEdit(activation, mask, value)


# ------------------------------------------------------------- TransformerLens's functions
def _grid(activation: str, axes: tuple[str, ...], what: str, shape: str):
    def fn(model, corrupted_tokens, clean_cache, patching_metric) -> Tensor:
        return patch_grid(model, corrupted_tokens, clean_cache, patching_metric, activation, axes)
    fn.__doc__ = (f"Activation patching of {what}: the metric with each one patched from the clean run, "
                  f"``{shape}`` (``transformer_lens.patching``'s function of the same name).")
    return fn


get_act_patch_resid_pre = _grid("resid_pre", ("layer", "pos"), "the residual stream before each block, by position",
                                "[n_layers, pos]")
get_act_patch_resid_mid = _grid("resid_mid", ("layer", "pos"), "the residual stream between attention and MLP",
                                "[n_layers, pos]")
get_act_patch_attn_out = _grid("attn_out", ("layer", "pos"), "each attention layer's output, by position",
                               "[n_layers, pos]")
get_act_patch_mlp_out = _grid("mlp_out", ("layer", "pos"), "each MLP's output, by position", "[n_layers, pos]")
get_act_patch_attn_head_out_by_pos = _grid("z", ("layer", "pos", "head"), "each head's output (hook_z), by position",
                                           "[n_layers, pos, n_heads]")
get_act_patch_attn_head_q_by_pos = _grid("q", ("layer", "pos", "head"), "each head's queries, by position",
                                         "[n_layers, pos, n_heads]")
get_act_patch_attn_head_k_by_pos = _grid("k", ("layer", "pos", "head"), "each head's keys, by position",
                                         "[n_layers, pos, n_heads]")
get_act_patch_attn_head_v_by_pos = _grid("v", ("layer", "pos", "head"), "each head's values, by position",
                                         "[n_layers, pos, n_heads]")
get_act_patch_attn_head_pattern_by_pos = _grid("pattern", ("layer", "head_index", "dest_pos"),
                                               "each head's attention, by destination position",
                                               "[n_layers, n_heads, dest_pos]")
get_act_patch_attn_head_pattern_dest_src_pos = _grid("pattern", ("layer", "head_index", "dest_pos", "src_pos"),
                                                     "each entry of each head's attention",
                                                     "[n_layers, n_heads, dest_pos, src_pos]")
get_act_patch_attn_head_out_all_pos = _grid("z", ("layer", "head"), "each head's output at every position",
                                            "[n_layers, n_heads]")
get_act_patch_attn_head_q_all_pos = _grid("q", ("layer", "head"), "each head's queries at every position",
                                          "[n_layers, n_heads]")
get_act_patch_attn_head_k_all_pos = _grid("k", ("layer", "head"), "each head's keys at every position",
                                          "[n_layers, n_heads]")
get_act_patch_attn_head_v_all_pos = _grid("v", ("layer", "head"), "each head's values at every position",
                                          "[n_layers, n_heads]")
get_act_patch_attn_head_pattern_all_pos = _grid("pattern", ("layer", "head_index"),
                                                "each head's whole attention pattern", "[n_layers, n_heads]")


def get_act_patch_attn_head_all_pos_every(model, corrupted_tokens, clean_cache, metric) -> Tensor:
    """Output, query, key, value and pattern of every head, all positions: ``[5, n_layers, n_heads]``."""
    fns = (get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos, get_act_patch_attn_head_k_all_pos,
           get_act_patch_attn_head_v_all_pos, get_act_patch_attn_head_pattern_all_pos)
    return torch.stack([f(model, corrupted_tokens, clean_cache, metric) for f in fns])


def get_act_patch_attn_head_by_pos_every(model, corrupted_tokens, clean_cache, metric) -> Tensor:
    """The same by position: ``[5, n_layers, pos, n_heads]`` (the pattern's grid transposed to match)."""
    fns = (get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos, get_act_patch_attn_head_k_by_pos,
           get_act_patch_attn_head_v_by_pos)
    out = [f(model, corrupted_tokens, clean_cache, metric) for f in fns]
    out.append(get_act_patch_attn_head_pattern_by_pos(model, corrupted_tokens, clean_cache, metric).transpose(1, 2))
    return torch.stack(out)


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric) -> Tensor:
    """``resid_pre``, ``attn_out`` and ``mlp_out`` by position: ``[3, n_layers, pos]``."""
    fns = (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)
    return torch.stack([f(model, corrupted_tokens, clean_cache, metric) for f in fns])


for _name, _fn in list(globals().items()):    # TransformerLens's names in reprs and tracebacks
    if _name.startswith("get_act_patch_") and _fn.__name__ == "fn":
        _fn.__name__ = _fn.__qualname__ = _name
