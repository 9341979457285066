"""Activation patching with TransformerLens's names, signatures and values, batched.

Each ``get_act_patch_*`` function takes ``(model, corrupted_tokens, clean_cache,
patching_metric)`` as ``transformer_lens.patching``'s does and returns a tensor of the same
shape and values: for every index of its grid (layer, position, head, ...), the metric of the
corrupted run with that one activation patched in from the clean run. Where TransformerLens runs
one forward per index, these run the patched variants of a layer side by side in one batch,
from that layer on (the corrupted run up to it is shared), in chunks of bounded memory; a
variant whose clean and corrupted activations are equal is the corrupted run itself and is not
run again. ``patching_metric(logits [batch, pos, d_vocab_out])`` must return a scalar. Path
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
from dataclasses import dataclass

import torch
from torch import Tensor

from .devices import model_device
from .errors import QkovError

Metric = Callable[[Tensor], Tensor]
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


def check_metric_value(value) -> float:
    """A metric's value as a float; a ``QkovError`` unless it is a scalar."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise QkovError(f"patching_metric returned a tensor of shape {tuple(value.shape)}; it must return a "
                            f"scalar, e.g. a mean over the batch")
        return float(value.detach())
    if isinstance(value, (int, float)):
        return float(value)
    raise QkovError(f"patching_metric returned {type(value).__name__}; it must return a scalar tensor or number")


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


@dataclass
class Corrupted:
    """The corrupted run, shared by every patched variant: its logits ``[B, P, V]`` and, for
    each layer, the residual stream before it and its keys and values."""

    logits: Tensor
    resid: list[Tensor]
    k: list[Tensor]
    v: list[Tensor]

    @classmethod
    def run(cls, model, tokens: Tensor, names: Sequence[str] = ()) -> tuple[Corrupted, dict[str, Tensor]]:
        L = range(model.cfg.n_layers)
        want = [f"blocks.{l}.{n}" for l in L for n in ("hook_resid_pre", "attn.hook_k", "attn.hook_v")]
        logits, cache = model.run_with_cache(tokens, names_filter=sorted(set(want) | set(names)))
        get = lambda n: [cache[f"blocks.{l}.{n}"] for l in L]  # noqa: E731
        return cls(logits, get("hook_resid_pre"), get("attn.hook_k"), get("attn.hook_v")), cache

    def metrics(self, model, layer: int, p0: int, c: int, fwd_hooks, metric: Metric) -> list[float]:
        """``metric`` of each of ``c`` copies of the run continued from ``layer`` with
        ``fwd_hooks`` (on ``[c * B, ...]``, copy ``j`` in rows ``j*B..``), which may change
        positions ``p0..`` only: earlier positions keep the corrupted run's keys, values and
        logits (the model is causal) and are not run again."""
        B, P = self.logits.shape[:2]
        prefix = None
        if p0:
            prefix = [None] * layer + [(k[:, :p0], v[:, :p0]) for k, v in zip(self.k[layer:], self.v[layer:])]
        inputs = self.resid[layer][:, p0:].repeat(c, 1, 1)                         # [c*B, P - p0, d]
        tail = model.run_with_hooks(inputs, fwd_hooks=fwd_hooks, start_at_layer=layer, prefix_kv=prefix)
        # One [B, P, V] buffer holds each copy's logits in turn: only its own rows are written,
        # and its metric is read (as a float) before the next copy's.
        logits = self.logits.clone()
        out = []
        for rows in tail.view(c, B, P - p0, -1):                                 # [B, P - p0, V]
            logits[:, p0:] = rows
            out.append(check_metric_value(metric(logits)))
        return out


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
    with torch.no_grad():
        run, corrupt = Corrupted.run(model, tokens, names)
        base = check_metric_value(patching_metric(run.logits))
        for layer, name in enumerate(names):
            clean = clean_cache[name].to(tokens.device)
            live = [ix for ix in grid if not _same(clean, corrupt[name], dims, ix)]
            values = dict.fromkeys(grid, base)
            values.update(_run_variants(model, run, layer, name, clean, dims, query, live, patching_metric))
            for ix, v in values.items():
                out[(layer, *ix)] = v
    return out


def _same(clean: Tensor, corrupt: Tensor, dims: Sequence[int], ix: tuple[int, ...]) -> bool:
    """Whether patching index ``ix`` changes nothing (its clean and corrupted slices are equal)."""
    sl = [slice(None)] * clean.ndim
    for d, i in zip(dims, ix):
        sl[d] = i
    return torch.equal(clean[tuple(sl)], corrupt[tuple(sl)])


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


def _chunks(indices: list[tuple[int, ...]], query: int | None, P: int, rows: int) -> list[list[tuple[int, ...]]]:
    """Variants in forwards of at most ``rows`` sequence positions each (variants × the rows each
    runs): those patching the same query position together, and neighbouring positions merged
    while that recomputes at most a quarter more rows than running each from its own position,
    or at most ``rows // 4`` more (a forward's fixed cost is worth about that many)."""
    start = (lambda ix: ix[query]) if query is not None else (lambda ix: 0)
    out: list[list[tuple[int, ...]]] = []
    for ix in sorted(indices, key=start):
        if out:
            group = out[-1] + [ix]
            cost, ideal = len(group) * (P - start(group[0])), sum(P - start(g) for g in group)
            if cost <= rows and (cost <= 1.25 * ideal or cost - ideal <= rows // 4):
                out[-1] = group
                continue
        out.append([ix])
    return out


def _run_variants(model, run: Corrupted, layer: int, name: str, clean: Tensor, dims: Sequence[int],
                  query: int | None, indices: list[tuple[int, ...]], metric: Metric) -> dict[tuple[int, ...], float]:
    """Run the patched variants ``indices`` of ``name`` side by side, from ``layer`` on and, when
    the grid picks a query position (``indices[j][query]``), from the chunk's first one on."""
    B, P = run.logits.shape[:2]
    row_dim = dims[query] if query is not None else None
    values: dict[tuple[int, ...], float] = {}
    for part in _chunks(indices, query, P, max(1, CHUNK_ELEMENTS // (B * row_width(model)))):
        p0 = part[0][query] if query is not None else 0
        sub = clean if not p0 else clean.narrow(row_dim, p0, clean.shape[row_dim] - p0)
        shifted = [ix if not p0 else ix[:query] + (ix[query] - p0,) + ix[query + 1:] for ix in part]
        patch = patcher(_mask(sub.shape, dims, shifted, sub.device), sub)
        values.update(zip(part, run.metrics(model, layer, p0, len(part), [(name, patch)], metric)))
    return values


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
