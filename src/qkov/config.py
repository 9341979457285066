"""ModelConfig and TrainConfig: frozen dataclasses with a JSON round trip and checked fields."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from typing import Any

from .errors import QkovError

ACT_FNS = ("relu", "gelu")
NORMALIZATIONS = (None, "LN")
ATTENTION_DIRS = ("causal", "bidirectional")
DEVICES = ("cpu", "cuda", "cuda:N", "mps", "auto")  # how TrainConfig.device may be spelled


@dataclass(frozen=True)
class ModelConfig:
    """A transformer's shape, named as in TransformerLens's ``HookedTransformerConfig``.

    ``d_head=None`` means ``d_model // n_heads``; ``d_mlp=None`` means attention-only;
    ``d_vocab_out=None`` means ``d_vocab``. ``use_bias=False`` keeps the bias tensors (so state
    dicts match TransformerLens's) but holds them at zero and never trains them.

    ``attention_dir="bidirectional"`` (TransformerLens's name) lets every position attend to
    every other; ``"causal"`` (the default) only to itself and earlier ones. ``pad_token`` (a
    token id, or None) makes that token padding: a padded position is never attended to, and
    attends to nothing itself (its attention output is ``b_O`` alone), in every layer.
    """

    n_layers: int = 1
    n_heads: int = 1
    d_model: int = 32
    d_head: int | None = None
    d_mlp: int | None = None
    d_vocab: int = 64
    d_vocab_out: int | None = None
    n_ctx: int = 6
    act_fn: str = "relu"
    normalization: str | None = None
    use_bias: bool = True
    init_std: float | None = None  # None: TransformerLens's default, 0.8 / sqrt(d_model)
    attention_dir: str = "causal"
    pad_token: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "d_model", "d_vocab", "n_ctx"):
            _check_positive_int(name, getattr(self, name))
        for name in ("d_head", "d_mlp", "d_vocab_out"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.d_head is None and self.d_model % self.n_heads != 0:
            raise QkovError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"pass d_head explicitly or choose d_model a multiple of n_heads"
            )
        if self.act_fn not in ACT_FNS:
            raise QkovError(f"act_fn={self.act_fn!r} is not supported; expected one of {', '.join(ACT_FNS)}")
        if self.normalization not in NORMALIZATIONS:
            raise QkovError(f"normalization={self.normalization!r} is not supported; expected None or 'LN'")
        if self.attention_dir not in ATTENTION_DIRS:
            raise QkovError(f"attention_dir={self.attention_dir!r} is not supported; "
                            f"expected 'causal' or 'bidirectional'")
        if self.pad_token is not None and (isinstance(self.pad_token, bool) or not isinstance(self.pad_token, int)
                                           or not 0 <= self.pad_token < self.d_vocab):
            raise QkovError(f"pad_token={self.pad_token!r} must be a token id in 0..{self.d_vocab - 1} (or None)")
        if self.init_std is not None and not self.init_std > 0:
            raise QkovError(f"init_std={self.init_std} must be positive (or None for the default)")

    @property
    def head_dim(self) -> int:
        """``d_head`` with its default resolved."""
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def vocab_out(self) -> int:
        """``d_vocab_out`` with its default resolved."""
        return self.d_vocab_out if self.d_vocab_out is not None else self.d_vocab

    @property
    def causal(self) -> bool:
        """True when a position attends only to itself and earlier ones (``attention_dir="causal"``)."""
        return self.attention_dir == "causal"

    @property
    def causal_unpadded(self) -> bool:
        """True when each position's output depends on the tokens up to it alone (causal
        attention, no padding): what the fast paths and patching's continuations from a later
        position rely on."""
        return self.causal and self.pad_token is None

    @property
    def attn_only(self) -> bool:
        """True for a model without MLPs (``d_mlp=None``)."""
        return self.d_mlp is None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (what ``config.json`` stores; :meth:`from_dict` reads it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, d, "model config")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied and checked, e.g. ``cfg.replace(d_mlp=128)``."""
        return _replace(self, changes, "model config")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: AdamW, batch size (None = full batch of a finite training set), schedule.

    ``eval_every`` and ``checkpoint_every`` count optimizer steps (0 = never checkpoint; a run
    resumes from its newest checkpoint);
    ``target_accuracy`` stops training at the first eval that reaches it (None = never);
    ``threads`` sets torch's intra-op threads for the run (0 = chosen while it trains by
    :class:`qkov.threads.ThreadPolicy`: one for small models, for larger ones the faster of one
    thread and all cores, measured); ``device`` is where the model, its batches and its evaluation live:
    ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (cuda if torch sees a GPU, else mps, else
    cpu), checked against this machine by :func:`qkov.devices.resolve_device`. Results are
    bit-exact for the same seed, configs and device, on any thread count (devices differ in rounding).
    """

    steps: int = 2000
    batch_size: int | None = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after warmup)
    eval_every: int = 100
    checkpoint_every: int = 500
    target_accuracy: float | None = None
    threads: int = 0  # torch intra-op threads while training; 0 = auto (qkov.threads.ThreadPolicy)
    device: str = "cpu"  # cpu | cuda | cuda:N | mps | auto

    def __post_init__(self) -> None:
        _check_positive_int("steps", self.steps)
        if self.batch_size is not None:
            _check_positive_int("batch_size", self.batch_size)
        _check_positive_int("eval_every", self.eval_every)
        for name in ("warmup_steps", "checkpoint_every", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise QkovError(f"{name}={v!r} must be an integer >= 0")
        if not self.lr > 0:
            raise QkovError(f"lr={self.lr} must be positive")
        if not self.weight_decay >= 0:
            raise QkovError(f"weight_decay={self.weight_decay} must be >= 0")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise QkovError(f"betas={self.betas!r} must be two numbers in [0, 1), e.g. 0.9,0.98")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if self.lr_schedule not in ("constant", "cosine"):
            raise QkovError(f"lr_schedule={self.lr_schedule!r} is not supported; expected constant or cosine")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise QkovError(f"target_accuracy={self.target_accuracy} must be in (0, 1] (or None)")
        check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (``betas`` as a list; :meth:`from_dict` reads it)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return _from_dict(cls, d, "train config")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied and checked, e.g. ``cfg.replace(steps=200, target_accuracy=0.99)``."""
        return _replace(self, changes, "train config")


def check_device(name: Any) -> str:
    """``name`` when it spells a device qkov can run on (one of :data:`DEVICES`), else a QkovError.

    Only the spelling is checked here; whether this machine has that device is
    :func:`qkov.devices.resolve_device`'s question.

    >>> check_device("cuda:1")
    'cuda:1'
    """
    if isinstance(name, str) and (name in ("cpu", "cuda", "mps", "auto") or re.fullmatch(r"cuda:(0|[1-9]\d*)", name)):
        return name
    raise QkovError(
        f"device={name!r} is not a device qkov knows; expected one of {', '.join(DEVICES)} (N = 0, 1, ...)"
    )


def _check_positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise QkovError(f"{name}={v!r} must be a positive integer")


def _known(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _from_dict(cls, d: dict[str, Any], what: str):
    unknown = sorted(set(d) - set(_known(cls)))
    if unknown:
        raise QkovError(f"unknown {what} key(s) {', '.join(unknown)}; known keys: {', '.join(_known(cls))}")
    try:
        return cls(**d)
    except TypeError as e:  # wrong value types that slipped past the checks
        raise QkovError(f"bad {what}: {e}") from None


def _replace(obj, changes: dict[str, Any], what: str):
    d = obj.to_dict()
    d.update(changes)
    return type(obj).from_dict(d)


def parse_value(raw: str, current: Any, key: str) -> Any:
    """Parse a ``--set key=value`` string into the type of the field's current value."""
    text = raw.strip()
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise QkovError(f"{key}={raw!r} is not a boolean; expected true or false")
    if isinstance(current, tuple):
        parts = [p for p in text.strip("()[]").split(",") if p.strip()]
        try:
            return tuple(type(current[0])(p) if current else float(p) for p in parts)
        except ValueError:
            raise QkovError(f"{key}={raw!r} is not a comma-separated list of numbers, e.g. 0.9,0.98") from None
    for typ in (int, float):
        if isinstance(current, typ) or current is None:
            try:
                return typ(text)
            except ValueError:
                if isinstance(current, typ):
                    expected = "an integer" if typ is int else "a number"
                    raise QkovError(f"{key}={raw!r} is not {expected}") from None
    return text
