"""Hook points with TransformerLens's semantics, attached for one call and never left behind.

A :class:`HookPoint` is a named place in the forward pass (``blocks.0.attn.hook_z``); a hook
is ``fn(activation, hook)`` that returns a replacement of the same shape, or ``None`` to leave
the activation as it is, exactly as in TransformerLens. Hooks are attached only for a call or a
``with`` block (``Transformer.run_with_hooks``, ``Transformer.hooks``): the model keeps no
hooks between calls, and a hook that raises leaves none attached.

:class:`ActiveHooks` is what one forward pass sees: for each hook name, the functions to run
and whether the activation is recorded into a cache. The forward asks it only at hook points,
and only when it exists, so a model with no hooks runs the same operations as one without
hook points at all.

>>> point = HookPoint("blocks.1.attn.hook_z")
>>> point.name, point.layer()
('blocks.1.attn.hook_z', 1)
>>> active = ActiveHooks.build({"blocks.1.attn.hook_z": point},
...                            fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: 2 * z)])
>>> active(point, torch.ones(2)).tolist()
[2.0, 2.0]
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from .errors import QkovError

HookFn = Callable[..., Tensor | None]
NameOrFilter = str | Callable[[str], bool]


class HookPoint:
    """A named place in the forward pass where hooks may read or replace the activation.

    ``name`` is the TransformerLens hook name; :meth:`layer` the block it sits in (``None`` for
    the embeddings and the unembedding).
    """

    __slots__ = ("name",)

    def __init__(self, name: str = ""):
        self.name = name

    def layer(self) -> int | None:
        """The block index in ``blocks.{l}.…`` (``None`` outside the blocks)."""
        parts = self.name.split(".")
        return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" else None

    def add_hook(self, *args, **kwargs):
        raise QkovError(f"qkov attaches hooks only for one call: use model.run_with_hooks(tokens, "
                        f"fwd_hooks=[({self.name!r}, fn)]) or `with model.hooks(fwd_hooks=...)`")

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


def names_matching(names_filter: NameOrFilter | Iterable[str] | None, names: Sequence[str]) -> list[str]:
    """The hook names that ``names_filter`` selects (TransformerLens's ``names_filter``: None for
    all, a name, a list of names or a predicate); an unknown name is a ``QkovError`` that names
    the nearest valid ones."""
    if names_filter is None:
        return list(names)
    if callable(names_filter):
        return [n for n in names if names_filter(n)]
    wanted = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    for name in wanted:
        check_name(name, names)
    keep = set(wanted)
    return [n for n in names if n in keep]


def check_name(name, names: Sequence[str]) -> None:
    """Raise a ``QkovError`` unless ``name`` is one of ``names``, suggesting the nearest."""
    if not isinstance(name, str):
        raise QkovError(f"a hook is (name or filter, fn); got {type(name).__name__} {name!r} where the name goes")
    if name in names:
        return
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"nearest: {', '.join(near)}" if near else f"this model's hook names start {', '.join(names[:4])}, ..."
    raise QkovError(f"unknown hook name {name!r}; {hint} (model.hook_dict lists them all)")


class ActiveHooks:
    """The hooks of one forward pass: ``edits[name]`` functions, then an optional recording."""

    def __init__(self, edits: dict[str, list[HookFn]], records: set[str], cache: dict[str, Tensor] | None):
        self.edits = edits
        self.records = records
        self.cache = cache if cache is not None else {}

    @classmethod
    def build(cls, hook_dict: Mapping[str, HookPoint], fwd_hooks: Iterable = (),
              record: NameOrFilter | Iterable[str] | None = (), cache: dict[str, Tensor] | None = None) -> ActiveHooks:
        """Resolve ``fwd_hooks`` (``(name_or_filter, fn)`` pairs) and the names to ``record``
        against ``hook_dict``, once per call."""
        names = list(hook_dict)
        edits: dict[str, list[HookFn]] = {}
        for pair in fwd_hooks:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and callable(pair[1])):
                raise QkovError(f"each of fwd_hooks is a pair (name or filter, fn(activation, hook)); got {pair!r}")
            target, fn = pair
            for name in names_matching(target, names):
                edits.setdefault(name, []).append(fn)
        records = set(names_matching(record, names)) if record != () else set()
        return cls(edits, records, cache)

    def merged(self, inner: ActiveHooks) -> ActiveHooks:
        """These hooks, then ``inner``'s (a call inside a ``with model.hooks(...)`` block)."""
        edits = {k: list(v) for k, v in self.edits.items()}
        for k, v in inner.edits.items():
            edits.setdefault(k, []).extend(v)
        return ActiveHooks(edits, self.records | inner.records, inner.cache if inner.records else self.cache)

    def wants(self, point: HookPoint) -> bool:
        """Whether anything reads or edits ``point`` (the forward computes optional activations,
        e.g. each head's ``hook_result``, only then)."""
        return point.name in self.edits or point.name in self.records

    def edited(self, point: HookPoint) -> bool:
        return point.name in self.edits

    def __call__(self, point: HookPoint, x: Tensor) -> Tensor:
        """Run ``point``'s hooks on ``x`` in order; record the result when asked."""
        for fn in self.edits.get(point.name, ()):
            out = fn(x, hook=point)
            if out is not None:
                _check_replacement(point, x, out)
                x = out
        if point.name in self.records:
            self.cache[point.name] = x
        return x


def _check_replacement(point: HookPoint, x: Tensor, out) -> None:
    if not isinstance(out, torch.Tensor):
        raise QkovError(f"the hook on {point.name} returned {type(out).__name__}; a hook returns a tensor shaped "
                        f"{tuple(x.shape)} or None")
    if out.shape != x.shape:
        raise QkovError(f"the hook on {point.name} returned shape {tuple(out.shape)}; the activation there is "
                        f"{tuple(x.shape)}: return a tensor of the same shape (or None to keep it)")


class Hooked:
    """TransformerLens's hook API for a model whose modules hold :class:`HookPoint` attributes.

    The model reads ``self._active`` (``None`` when no hook is attached) once per forward and
    passes it down; everything here only sets it for the length of a call or ``with`` block.
    """

    _active: ActiveHooks | None = None

    def setup_hooks(self) -> None:
        """Name every hook point after where it sits (``blocks.0.attn.hook_z``), once, in __init__."""
        points: dict[str, HookPoint] = {}
        for prefix, module in self.named_modules():
            for attr, value in vars(module).items():
                if isinstance(value, HookPoint):
                    value.name = f"{prefix}.{attr}" if prefix else attr
                    points[value.name] = value
        self._hook_dict = points
        self._hook_stack: list[ActiveHooks] = []

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook point by its TransformerLens name."""
        return dict(self._hook_dict)

    def hook_points(self) -> list[HookPoint]:
        return list(self._hook_dict.values())

    @contextmanager
    def hooks(self, fwd_hooks: Iterable = (), bwd_hooks: Iterable = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Iterator:
        """``with model.hooks(fwd_hooks=[(name_or_filter, fn)]):`` every forward inside runs them.

        When the block ends, normally or by an exception, no hook is left attached.
        """
        if bwd_hooks:
            raise QkovError("qkov has no backward hooks; keep the activation in a forward hook and take "
                            "torch.autograd.grad(metric, activation)")
        if not reset_hooks_end:
            raise QkovError("reset_hooks_end=False would leave hooks attached; qkov hooks last one call or block")
        with self._attached(ActiveHooks.build(self._hook_dict, fwd_hooks)):
            yield self

    def run_with_hooks(self, tokens, fwd_hooks: Iterable = (), bwd_hooks: Iterable = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False, **forward_kwargs):
        """The forward's output with ``fwd_hooks`` (``(name_or_filter, fn(activation, hook))``)
        attached for this call only; ``fn`` returns a replacement of the same shape or None."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(tokens, **forward_kwargs)

    def run_with_cache(self, tokens, names_filter=None, *, names=None, **forward_kwargs):
        """Logits and a dict of activations keyed by TransformerLens hook names.

        ``names_filter`` keeps only some activations: a hook name, a list of names, or a
        predicate on names (None: every hook point). ``names=`` is the old spelling.
        """
        if names is not None:
            if names_filter is not None:
                raise QkovError("pass names_filter= only (names= is its old spelling)")
            warnings.warn("run_with_cache(names=...) is now names_filter=..., TransformerLens's keyword",
                          DeprecationWarning, stacklevel=2)
            names_filter = names
        rec = ActiveHooks.build(self._hook_dict, record=names_filter, cache={})
        with self._attached(rec):
            logits = self(tokens, **forward_kwargs)
        return logits, rec.cache

    @contextmanager
    def _attached(self, active: ActiveHooks) -> Iterator[None]:
        self._hook_stack.append(active)
        self._active = _fold(self._hook_stack)
        try:
            yield
        finally:
            self._hook_stack.remove(active)
            self._active = _fold(self._hook_stack) if self._hook_stack else None


def _fold(stack: list[ActiveHooks]) -> ActiveHooks:
    out = stack[0]
    for inner in stack[1:]:
        out = out.merged(inner)
    return out
