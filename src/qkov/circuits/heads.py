"""Head detectors: previous-token, duplicate-token and induction scores for every head.

A detector is a 0/1 *detection pattern* ``[batch, query_pos, key_pos]`` saying where a head of
that kind should attend; a head's score is the attention it puts there, averaged over the query
positions that have somewhere to attend. The patterns are TransformerLens's
(``transformer_lens.head_detector``), built from the tokens:

- previous-token: query ``i`` -> key ``i - 1``;
- duplicate-token: query ``i`` -> every earlier key ``j < i`` holding the same token;
- induction: query ``i`` -> every key ``j <= i`` whose *previous* token equals token ``i``
  (the token that followed an earlier occurrence of the current one).

On the standard test, random tokens repeated twice ``[x, x]`` with ``x`` of ``half`` distinct
tokens, these read: previous-token = mean attention from ``i`` to ``i - 1`` (over ``i >= 1``);
duplicate-token = mean attention from ``i`` in the second half to ``i - half``; induction = mean
attention from ``i`` in the second half to ``i - half + 1``. A perfect head of each kind scores 1.

The one difference from TransformerLens's ``detect_head`` (``error_measure="mul"``): it divides
by every query row, including rows where the pattern is empty, so its scores are ours times
``(rows with a target) / (all rows)`` (e.g. at most 0.5 for induction on ``[x, x]``). Ours
stay comparable across sequence lengths and reach 1 for a perfect head.

These functions run the model (``run_with_cache``) but never train it; they accept a
``qkov.Transformer`` or a TransformerLens model (anything with ``cfg.n_layers``, ``cfg.n_heads``,
``cfg.n_ctx``, ``cfg.d_vocab`` and a ``run_with_cache`` that caches
``blocks.{l}.attn.hook_pattern``). Tokens go to the model's device and scores come back there.

>>> import torch
>>> pattern = torch.eye(4).roll(-1, dims=1).tril()   # each query attends to the token before it
>>> pattern[0, 0] = 1.0                               # (the first query can only attend to itself)
>>> float(detection_score(pattern, detection_pattern(torch.arange(4), "previous_token")))
1.0
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..devices import model_device
from ..errors import QkovError

HEAD_KINDS = ("previous_token", "duplicate_token", "induction")

# Patterns held at once while scoring (floats, all layers of one chunk of sequences): 64 Mi = 256 MB.
_PATTERN_BUDGET = 1 << 26


# ----------------------------------------------------------------- detection patterns (pure)
def detection_pattern(tokens: Tensor, kind: str) -> Tensor:
    """Where a head of ``kind`` attends on ``tokens [batch, pos]`` (or ``[pos]``): bool ``[batch, q, k]``.

    ``kind`` is ``"previous_token"``, ``"duplicate_token"`` or ``"induction"`` (module docstring).
    Every pattern is causal (``k <= q``), like TransformerLens's.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise QkovError(f"tokens must be shaped [batch, pos] or [pos]; got shape {tuple(tokens.shape)}")
    b, n = tokens.shape
    q = torch.arange(n, device=tokens.device)[:, None]                     # [q, 1]
    k = torch.arange(n, device=tokens.device)[None, :]                     # [1, k]
    if kind == "previous_token":
        return (k == q - 1).expand(b, n, n)
    if kind == "duplicate_token":
        same = tokens[:, :, None] == tokens[:, None, :]                     # [b, q, k]
        return same & (k < q)
    if kind == "induction":
        # key k qualifies when the token *before* it equals the query's token.
        before = torch.cat([tokens[:, :1], tokens[:, :-1]], dim=1)          # [b, k]: token k-1
        same = tokens[:, :, None] == before[:, None, :]                     # [b, q, k]
        return same & (k <= q) & (k >= 1)
    raise QkovError(f"unknown head kind {kind!r}; expected one of {', '.join(HEAD_KINDS)}")


def detection_score(pattern: Tensor, detection: Tensor) -> Tensor:
    """Mean attention on the detected keys, over the query rows that have at least one.

    ``pattern [..., batch, head, q, k]`` (or ``[head, q, k]``, ``[q, k]``) is an attention pattern;
    ``detection [batch, q, k]`` (or ``[q, k]``) is a pattern from :func:`detection_pattern`.
    Returns one score per head (a 0-d tensor for a single ``[q, k]`` pattern).
    """
    pattern = torch.as_tensor(pattern)
    detection = torch.as_tensor(detection)
    if detection.ndim == 2:
        detection = detection[None]
    single = pattern.ndim == 2
    if single:
        pattern = pattern[None, None]
    elif pattern.ndim == 3:
        pattern = pattern[None]
    if pattern.ndim < 4 or pattern.shape[-2:] != detection.shape[-2:] or pattern.shape[-4] != detection.shape[0]:
        raise QkovError(
            f"attention pattern {tuple(pattern.shape)} does not match detection pattern "
            f"{tuple(detection.shape)}; expected [batch, head, q, k] and [batch, q, k] with the same batch, q, k"
        )
    rows = _rows(detection)
    if rows == 0:
        raise QkovError("the detection pattern is empty (no query has a key to attend to), so the score is undefined")
    out = _attention_on(pattern, detection.to(pattern.device)) / rows
    return out[..., 0] if single else out


def _attention_on(pattern: Tensor, detection: Tensor) -> Tensor:
    """Attention on detected keys summed over batch and queries: ``[..., head]``."""
    det = detection.to(pattern.dtype)                                      # [b, q, k]
    return torch.einsum("...bhqk,bqk->...h", pattern, det)                # [..., h]


def _rows(detection: Tensor) -> int:
    """How many query rows of ``detection [b, q, k]`` have a key to attend to."""
    return int(detection.any(-1).sum())


# ------------------------------------------------------------------------ test sequences
def repeated_random_tokens(
    d_vocab: int, half: int, n: int = 64, seed: int | torch.Generator = 0
) -> Tensor:
    """The standard induction test: ``n`` sequences ``[x, x]`` of random tokens, ``[n, 2 * half]``.

    Each ``x`` holds ``half`` *distinct* tokens when ``d_vocab >= half`` (then every token in the
    second copy has exactly one earlier occurrence, and the detectors read exactly as stated in
    the module docstring); otherwise tokens are drawn with replacement.

    >>> repeated_random_tokens(10, 3, n=2, seed=0).shape
    torch.Size([2, 6])
    """
    for name, v in (("d_vocab", d_vocab), ("half", half), ("n", n)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise QkovError(f"{name}={v!r} must be a positive integer")
    if half < 2:
        raise QkovError(f"half={half} is too short for the induction test; need at least 2 tokens per copy")
    gen = _generator(seed)
    if d_vocab >= half:
        # Distinct tokens per row: the first `half` of a random permutation (argsort of noise).
        x = torch.rand(n, d_vocab, generator=gen).argsort(dim=1)[:, :half]   # [n, half]
    else:
        x = torch.randint(0, d_vocab, (n, half), generator=gen)             # [n, half]
    return torch.cat([x, x], dim=1)


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise QkovError(f"seed={seed!r} must be an integer or a torch.Generator")
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- model scores
def head_scores(
    model: Any,
    tokens: Tensor | None = None,
    *,
    kinds: tuple[str, ...] | list[str] = HEAD_KINDS,
    seed: int | torch.Generator = 0,
    n: int = 64,
    half: int | None = None,
    vocab: int | None = None,
) -> dict[str, Tensor]:
    """Scores ``{kind: [n_layers, n_heads]}`` for each detector in ``kinds``, from one pass.

    With ``tokens [batch, pos]`` (or ``[pos]``) the patterns are built from those tokens. Without,
    the model runs on :func:`repeated_random_tokens`: ``n`` sequences ``[x, x]`` with
    ``half = n_ctx // 2`` tokens a copy (or ``half``) drawn from ``0..vocab-1`` (default: the
    model's ``d_vocab``), from ``seed``.
    """
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in HEAD_KINDS:
            raise QkovError(f"unknown head kind {kind!r}; expected one of {', '.join(HEAD_KINDS)}")
    cfg = _cfg(model)
    if tokens is None:
        tokens = _random_tokens(cfg, seed, n, half, vocab)
    else:
        if half is not None or vocab is not None:
            raise QkovError("half and vocab shape the random test sequences; pass them without tokens, or drop them")
        tokens = _check_tokens(tokens, cfg)
    n_layers, n_heads, n_pos = cfg.n_layers, cfg.n_heads, tokens.shape[1]
    device = model_device(model)                                            # scores accumulate there
    num = {k: torch.zeros(n_layers, n_heads, dtype=torch.float64, device=device) for k in kinds}
    rows = dict.fromkeys(kinds, 0)
    chunk = max(1, _PATTERN_BUDGET // (n_layers * n_heads * n_pos * n_pos))
    for start in range(0, tokens.shape[0], chunk):
        toks = tokens[start : start + chunk]
        pattern = _patterns(model, toks, n_layers)                          # [L, b, h, q, k] on device
        for kind in kinds:
            # Built and counted where the tokens are (the random test's are on the CPU), then
            # moved next to the patterns: one bool tensor per chunk.
            det = detection_pattern(toks, kind)                             # [b, q, k]
            rows[kind] += _rows(det)
            num[kind] += _attention_on(pattern, det.to(device)).double()   # [L, h]
    out = {}
    for kind in kinds:
        if rows[kind] == 0:
            what = "token repeats an earlier one" if kind == "duplicate_token" else "token follows a repeat"
            raise QkovError(
                f"no {what} in the given tokens, so {kind} scores are undefined; "
                f"pass tokens with repeats, or no tokens for the random [x, x] test"
            )
        out[kind] = (num[kind] / rows[kind]).float()
    return out


def previous_token_scores(model: Any, tokens: Tensor | None = None, **kwargs: Any) -> Tensor:
    """``[n_layers, n_heads]``: mean attention from each query ``i >= 1`` to ``i - 1``.

    Takes ``tokens`` or the random ``[x, x]`` options (``seed``, ``n``, ``half``, ``vocab``) as
    :func:`head_scores` does.
    """
    return head_scores(model, tokens, kinds=("previous_token",), **kwargs)["previous_token"]


def duplicate_token_scores(model: Any, tokens: Tensor | None = None, **kwargs: Any) -> Tensor:
    """``[n_layers, n_heads]``: attention from a repeated token to its earlier occurrences.

    Averaged over queries whose token occurred before; on ``[x, x]``, the mean attention from
    ``i`` in the second copy to ``i - half``. Options as in :func:`head_scores`.
    """
    return head_scores(model, tokens, kinds=("duplicate_token",), **kwargs)["duplicate_token"]


def induction_scores(model: Any, tokens: Tensor | None = None, **kwargs: Any) -> Tensor:
    """``[n_layers, n_heads]``: attention to the token that followed an earlier occurrence of the current one.

    Averaged over queries whose token occurred before; on ``[x, x]``, the mean attention from
    ``i`` in the second copy to ``i - half + 1``. Options as in :func:`head_scores`.
    """
    return head_scores(model, tokens, kinds=("induction",), **kwargs)["induction"]


# ------------------------------------------------------------------------------- plumbing
def _cfg(model: Any) -> Any:
    cfg = getattr(model, "cfg", None)
    missing = [k for k in ("n_layers", "n_heads", "n_ctx", "d_vocab") if not hasattr(cfg, k)]
    if cfg is None or missing or not hasattr(model, "run_with_cache"):
        raise QkovError(
            f"head detectors need a qkov.Transformer or a TransformerLens model (with .cfg and "
            f"run_with_cache); got {type(model).__name__}"
        )
    return cfg


def _random_tokens(cfg: Any, seed, n: int, half: int | None, vocab: int | None) -> Tensor:
    half = cfg.n_ctx // 2 if half is None else half
    vocab = cfg.d_vocab if vocab is None else vocab
    if isinstance(half, int) and 2 * half > cfg.n_ctx:
        raise QkovError(
            f"half={half} makes [x, x] {2 * half} tokens long, longer than n_ctx={cfg.n_ctx}; "
            f"pass half <= {cfg.n_ctx // 2}"
        )
    if isinstance(vocab, int) and vocab > cfg.d_vocab:
        raise QkovError(f"vocab={vocab} exceeds the model's d_vocab={cfg.d_vocab}; pass vocab <= {cfg.d_vocab}")
    return repeated_random_tokens(vocab, half, n, seed)


def _check_tokens(tokens: Tensor, cfg: Any) -> Tensor:
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise QkovError(
            f"tokens must be integer ids shaped [batch, pos]; got dtype {tokens.dtype} shape {tuple(tokens.shape)}"
        )
    if tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise QkovError(f"tokens shaped {tuple(tokens.shape)} are too short; need at least one sequence of 2+ tokens")
    if tokens.shape[1] > cfg.n_ctx:
        raise QkovError(
            f"a sequence of {tokens.shape[1]} tokens is longer than n_ctx={cfg.n_ctx}; "
            f"shorten it to {cfg.n_ctx} or fewer"
        )
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.d_vocab:
        raise QkovError(f"token ids must lie in 0..{cfg.d_vocab - 1} (d_vocab={cfg.d_vocab}); "
                        f"got ids from {lo} to {hi}")
    return tokens.long()


def _patterns(model: Any, tokens: Tensor, n_layers: int) -> Tensor:
    """Attention patterns of every layer, ``[n_layers, batch, head, q, k]``, without gradients.

    On the model's device (:func:`qkov.devices.model_device`): the tokens go there, and a
    TransformerLens model spread over several GPUs has its later layers' patterns gathered there.
    """
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    device = model_device(model)
    with torch.no_grad():   # qkov and TransformerLens both filter by names_filter
        _, cache = model.run_with_cache(tokens.to(device), names_filter=names)
    return torch.stack([cache[name].to(device=device, dtype=torch.float32) for name in names])
