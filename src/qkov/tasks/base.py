"""What every task shares: ``Batch``, the ``Task`` and ``FiniteTask`` bases, evaluation and loss.

A task turns a ``torch.Generator`` (or its own split seed, for finite data sets) into batches of
``tokens [batch, pos]`` with ``targets [batch, pos]`` (-100 where no loss is read) and a
``scored [batch, pos]`` mask of the positions that accuracy is measured on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ModelConfig, TrainConfig
from ..errors import QkovError
from .text import TaskText

IGNORE = -100  # target value for positions whose loss is not read (as in F.cross_entropy)


@dataclass
class Batch:
    tokens: Tensor   # [batch, pos] int64
    targets: Tensor  # [batch, pos] int64, IGNORE where no loss is read
    scored: Tensor   # [batch, pos] bool, positions that accuracy is measured on

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> Batch:
        return Batch(self.tokens[idx], self.targets[idx], self.scored[idx])

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(self.tokens.to(device), self.targets.to(device), self.scored.to(device))


@dataclass(frozen=True)
class AnswerRule:
    """The answer at the last position of every input of each length is ``reduce`` of its
    tokens (``"max"``: the largest), for all ``d_vocab ** length`` inputs: what lets a proof check
    a model over every input without running them (``qkov.certify``)."""

    reduce: str                 # "max"
    lengths: tuple[int, ...]    # the input lengths the task scores
    d_vocab: int                # inputs range over tokens 0..d_vocab-1


class Task(TaskText):
    """Base class. Subclasses set ``name``, ``defaults`` and the sampling/dataset methods; how
    an example is written as text (``parse``, ``format``, answers) comes from :class:`TaskText`."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]
    finite: ClassVar[bool] = False  # True: a fixed data set with a train/test split
    eval_seed: ClassVar[int] = 1234567  # eval sampling seed, never the training seed
    # The loss's log-softmax runs in this dtype. Sampled tasks see fresh batches and their loss
    # stays far above float32's rounding; see FiniteTask for the full-batch ones.
    loss_dtype: ClassVar[torch.dtype] = torch.float32

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise QkovError(
                f"unknown parameter(s) {', '.join(unknown)} for task '{self.name}'; "
                f"known: {', '.join(sorted(self.defaults))}"
            )
        merged = dict(self.defaults)
        for k, v in params.items():
            d = self.defaults[k]
            if isinstance(d, bool) or isinstance(d, int) and not isinstance(v, int):
                if not isinstance(v, type(d)):
                    raise QkovError(f"task parameter {k}={v!r} must be {type(d).__name__}")
            merged[k] = v
        self.params = merged
        self._validate()
        self._data: dict[str, Batch] = {}

    def __getattr__(self, key: str) -> Any:
        params = self.__dict__.get("params", {})
        if key in params:
            return params[key]
        raise AttributeError(key)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"get_task({self.name!r}, {args})"

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **params}``: what ``config.json`` stores (``task_from_dict`` reads it),
        with ``"source"`` (``module:Class`` or ``/abs/file.py:Class``) for a task that is not built in."""
        from .loading import source_of

        source = source_of(type(self))
        return {"name": self.name, **({"source": source} if source else {}), **self.params}

    # -- subclass hooks -------------------------------------------------------
    def _validate(self) -> None:
        pass

    @property
    def seq_len(self) -> int:
        """The longest sequence the task makes (a model needs ``n_ctx >= seq_len``)."""
        raise NotImplementedError

    @property
    def d_vocab(self) -> int:
        """How many input token ids the task uses (``0..d_vocab-1``)."""
        raise NotImplementedError

    @property
    def d_vocab_out(self) -> int:
        """How many output classes the answers need (default: ``d_vocab``)."""
        return self.d_vocab

    @property
    def scored_positions(self) -> list[int] | None:
        """Query positions whose logits the loss reads, when they are fixed (None: data-dependent)."""
        return None

    def model_config(self) -> ModelConfig:
        """The reference model for this task (the published setup the defaults reproduce)."""
        raise NotImplementedError

    def train_config(self) -> TrainConfig:
        """The reference training settings for this task."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` fresh examples drawn with ``generator``, for tasks without a fixed data set.

        >>> from qkov.tasks import get_task
        >>> batch = get_task("max").sample(4, torch.Generator().manual_seed(0))
        >>> batch.tokens.shape, batch.targets.shape, batch.scored.dtype     # [batch, pos] each
        (torch.Size([4, 6]), torch.Size([4, 6]), torch.bool)
        """
        raise QkovError(f"task '{self.name}' has a fixed data set; use dataset('train')")

    def dataset(self, split: str = "train") -> Batch:
        """The fixed examples of a finite task: ``"train"``, ``"test"`` or ``"all"`` (the split comes
        from the task's own ``split_seed``, never the training seed).

        >>> from qkov.tasks import get_task
        >>> task = get_task("modadd", p=5, train_frac=0.6)
        >>> len(task.dataset("all")), len(task.dataset("train")), len(task.dataset("test"))
        (25, 15, 10)
        """
        raise QkovError(f"task '{self.name}' samples its data; use sample(n, generator)")

    def token_labels(self) -> list[str]:
        """A label per input token id, for plots."""
        return [str(i) for i in range(self.d_vocab)]

    def output_labels(self) -> list[str]:
        """A label per output logit id, for plots and ``qkov show``: the token labels by default
        (answers are tokens); a classifier names its classes."""
        return self.token_labels()

    def group_name(self) -> str | None:
        """How eval accuracy is broken down: 'length', 'position' or None."""
        return None

    def group_of_position(self, pos: int) -> int:
        """The group (a length or a position) that accuracy at query position ``pos`` counts toward."""
        return pos

    @property
    def residue_modulus(self) -> int | None:
        """``p`` when the task's data set is every pair ``(a, b)`` of residues mod ``p``, listed
        a-major as ``[a, b, ...]`` with answers mod ``p``: what ``qkov.fourier``'s analysis over
        Z_p (key frequencies, restricted and excluded loss) reads. None, the default, otherwise."""
        return None

    def answer_rule(self) -> AnswerRule | None:
        """The rule that gives every input's answer, when proofs over all inputs can use it
        (``qkov.certify``); None, the default, when there is no such rule."""
        return None

    def facts(self, model) -> dict[str, Any]:
        """Numbers this task measures on ``model`` for its own findings (JSON-able; ``qkov.analyze``
        adds them to ``summary["attention"]``). A task runs the model itself here
        (``model.run_with_cache(tokens)``); none by default."""
        return {}

    def findings(self, summary: dict[str, Any]) -> list[dict[str, Any]]:
        """What this task says about its circuit in words, from the numbers ``qkov.analyze`` has
        measured (``summary``: the Summary as a dict, findings aside): each ``{id, text, value}``,
        listed after the accuracy. None by default; ``max`` states its attention to the maximum."""
        return []

    def checks(self, interventions, summary: dict[str, Any]) -> list[dict[str, Any]]:
        """Causal checks of this task's circuit story (see ``qkov.tasks.checks``): each
        ``{id, text, intervention, metric, before, after, holds}``. ``interventions`` is a
        ``qkov.interventions.Interventions`` for the model, ``summary`` the Summary's numbers so
        far. None by default."""
        return []

    # -- shared machinery ----------------------------------------------------
    def check_model(self, cfg: ModelConfig) -> None:
        """Raise QkovError when a model cannot represent this task."""
        if cfg.n_ctx < self.seq_len:
            raise QkovError(
                f"n_ctx={cfg.n_ctx} is shorter than the task's longest sequence ({self.seq_len}); "
                f"pass --set n_ctx={self.seq_len}"
            )
        if cfg.d_vocab < self.d_vocab:
            raise QkovError(
                f"d_vocab={cfg.d_vocab} is too small for task '{self.name}', which uses token ids "
                f"0..{self.d_vocab - 1}; pass --set d_vocab={self.d_vocab}"
            )
        if cfg.vocab_out < self.d_vocab_out:
            raise QkovError(
                f"d_vocab_out={cfg.vocab_out} is too small for task '{self.name}', whose answers "
                f"go up to {self.d_vocab_out - 1}; pass --set d_vocab_out={self.d_vocab_out}"
            )

    def eval_batch(self) -> Batch:
        """The fixed evaluation set: the test split, or samples from the task's own eval seed."""
        if self.finite:
            return self.dataset("test")
        if "eval" not in self._data:
            self._data["eval"] = self.sample(self._eval_samples(), torch.Generator().manual_seed(self.eval_seed))
        return self._data["eval"]

    def _eval_samples(self) -> int:
        return 4096

    @torch.no_grad()
    def evaluate(self, model, batch: Batch | None = None) -> dict[str, Any]:
        """Accuracy and mean loss over scored positions, with a breakdown by length or position.

        Finite tasks are measured on their test split (and, when it differs, on the train split).
        """
        batch = self.eval_batch() if batch is None else batch
        (out,) = self._measure(model, batch)
        if self.finite and self.params.get("train_frac", 1.0) < 1.0:
            (train,) = self._measure(model, self.dataset("train"))
            out["train_accuracy"] = train["accuracy"]
            out["train_loss"] = train["loss"]
        return out

    def _measure(self, model, batch: Batch, masks: list[Tensor] | None = None,
                 chunk_tokens: int = 16384) -> list[dict[str, Any]]:
        """Accuracy and loss at the positions of each mask (default: ``batch.scored``), from one
        pass over ``batch`` in chunks of about ``chunk_tokens`` tokens (chunks that fit in cache
        ran 1.4x faster than one pass over the induction eval set).

        ``model`` is a model (its forward is run) or a :class:`Scorer` (the trainer passes its
        ``qkov.fastpath`` plan): what is read is the scorer's NLL and prediction at its
        ``positions``, and every mask must lie within them. Batches go to the scorer's device
        chunk by chunk; the counts are summed on the CPU.
        """
        scorer = as_scorer(model)
        masks = [batch.scored] if masks is None else masks
        P = batch.tokens.shape[1]
        cols = slice(None) if scorer.positions is None else as_index(scorer.positions)
        if scorer.positions is not None and any(int(m.sum()) != int(m[:, cols].sum()) for m in masks):
            raise QkovError(f"the scorer reads positions {scorer.positions} only, but a mask reads others")
        zeros = lambda: [torch.zeros(P) for _ in masks]  # noqa: E731
        correct, loss, count = zeros(), zeros(), zeros()
        chunk = max(1, chunk_tokens // P)
        device = scorer.device
        for i in range(0, len(batch), chunk):
            tokens, tgt = batch.tokens[i : i + chunk], batch.targets[i : i + chunk, cols]
            nll, pred = scorer.nll_and_prediction(tokens.to(device), tgt.to(device))   # [b, p] each
            right = pred.cpu() == tgt
            nll = nll.cpu()
            for j, mask in enumerate(masks):
                m = mask[i : i + chunk, cols]
                correct[j][cols] += (right & m).sum(0)
                loss[j][cols] += torch.where(m, nll, 0.0).sum(0)
                count[j][cols] += m.sum(0)
        return [self._summarise(c, l, n) for c, l, n in zip(correct, loss, count)]

    def _summarise(self, correct: Tensor, loss: Tensor, count: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {
            "accuracy": float(correct.sum() / count.sum()),
            "loss": float(loss.sum() / count.sum()),
            "n": int(count.sum()),
        }
        group = self.group_name()
        if group is not None:
            by: dict[str, dict[str, float]] = {}
            for pos in range(len(count)):
                if count[pos] > 0:
                    by[str(self.group_of_position(pos))] = {
                        "accuracy": float(correct[pos] / count[pos]),
                        "loss": float(loss[pos] / count[pos]),
                        "n": int(count[pos]),
                    }
            out[f"by_{group}"] = by
        return out

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over positions with a target, computed in ``loss_dtype``."""
        flat = logits.reshape(-1, logits.shape[-1]).to(self.loss_dtype)
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE)


class Scorer:
    """What evaluation reads from a model: the NLL of each target and the prediction (the first
    argmax) at ``positions`` (None: every position), ``[b, p]`` each.

    This one runs the model's forward. The trainer's fast paths (``qkov.fastpath.plan``) are
    scorers too, so ``Task.evaluate`` reads the same numbers through whichever it is given.

    >>> from qkov.model import Transformer
    >>> from qkov.tasks import get_task
    >>> task = get_task("max")
    >>> scorer = Scorer(Transformer(task.model_config()), task.scored_positions)
    >>> batch = task.sample(3, torch.Generator().manual_seed(0))
    >>> [t.shape for t in scorer.nll_and_prediction(batch.tokens, batch.targets[:, 1:])]
    [torch.Size([3, 5]), torch.Size([3, 5])]
    """

    def __init__(self, model, positions: list[int] | None = None):
        self.model = model
        self.positions = None if positions is None else [int(p) for p in positions]

    @property
    def device(self) -> torch.device:
        """Where the model's weights live (tokens are sent there)."""
        p = next(iter(self.model.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def logits(self, tokens: Tensor) -> Tensor:
        """Logits ``[b, p, v]`` at ``positions`` (every position when None)."""
        logits = self.model(tokens)
        return logits if self.positions is None else logits[:, as_index(self.positions)]

    @torch.no_grad()
    def nll_and_prediction(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``-log softmax(logits)[target]`` and the first argmax at ``positions``; ``targets``
        is ``[b, len(positions)]`` (``IGNORE`` reads class 0)."""
        return nll_and_prediction(self.logits(tokens).float(), targets)


def as_scorer(model) -> Scorer:
    """``model`` itself when it is a :class:`Scorer`, else a scorer that runs its forward."""
    return model if isinstance(model, Scorer) else Scorer(model)


def _split(n: int, train_frac: float, seed: int) -> tuple[Tensor, Tensor]:
    """Deterministic train/test index split of ``n`` examples, from its own seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_frac * n))
    return perm[:n_train], perm[n_train:]


class FiniteTask(Task):
    """A task whose examples are a fixed enumerable set, split into train/test by ``split_seed``."""

    finite = True
    # Float64, as in Nanda et al.'s grokking code: trained on a fixed set, the loss gets tiny and
    # float32 rounding in the log-softmax then shows up as loss spikes (measured on ``modadd``
    # p=113: a float32 run spiked and was still at 4% test accuracy at the step where the float64
    # run had generalised; at p=23 float32 gave logit FVE 0.74-0.84 against 0.92-0.95).
    loss_dtype = torch.float64

    def _all(self) -> Batch:
        raise NotImplementedError

    def n_examples(self) -> int | None:
        """How many examples the whole set holds, from the parameters alone (the set is not
        built): what ``qkov.memory`` sizes the data set and a full-batch step by before either is
        allocated. None, the default, where a task cannot say without building it."""
        return None

    def dataset(self, split: str = "train") -> Batch:
        if split not in ("train", "test", "all"):
            raise QkovError(f"unknown split {split!r}; expected train, test or all")
        if "all" not in self._data:
            self._data["all"] = self._all()
        data = self._data["all"]
        frac = self.params.get("train_frac", 1.0)
        if split == "all" or frac >= 1.0:
            return data
        if split not in self._data:
            tr, te = _split(len(data), frac, self.params["split_seed"])
            self._data["train"], self._data["test"] = data[tr], data[te]
        return self._data[split]

    def _validate(self) -> None:
        frac = self.params.get("train_frac", 1.0)
        if not 0 < frac <= 1:
            raise QkovError(f"train_frac={frac} must be in (0, 1]")


_LOG2E = 1.4426950408889634


def nll_and_prediction(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``-log_softmax(logits)[target]`` and ``logits.argmax(-1)`` (the first maximum, as torch
    breaks ties) over the last dim, from vectorised passes: on CPU, ``argmax`` over a short last
    dim runs element by element (14x slower than ``amax`` on ``max``'s eval set), and ``exp2``
    runs twice as fast as ``exp``. Ignored targets (``IGNORE``) read class 0.

    The NLL is never below zero: it is summed as ``(max - picked) + log Σ exp(x - max)``, the
    exact non-negative gap first (``(log Σ + max) - picked`` had lost ``max``'s last bits: a
    converged model scored -4e-6), and the sum, which rounding can leave a hair under 1 for a
    confident row, is clamped at 0.

    >>> logits = torch.tensor([[60.0, 0.0, -3.0], [1.0, 2.0, 2.0]])
    >>> nll, pred = nll_and_prediction(logits, torch.tensor([0, 1]))
    >>> bool((nll >= 0).all()), float(nll[0]) < 1e-5, pred.tolist()     # confident and right; a tie: the first
    (True, True, [0, 1])
    """
    V = logits.shape[-1]
    work = torch.empty_like(logits)
    top = logits.amax(-1, keepdim=True)                                         # [..., 1]
    # First maximum: the largest of (V - index) over the entries equal to the max.
    ranks = torch.arange(V, 0, -1, dtype=logits.dtype, device=logits.device)
    first = torch.eq(logits, top, out=work).mul_(ranks).amax(-1)
    pred = (V - first).long()
    total = torch.add(top * -_LOG2E, logits, alpha=_LOG2E, out=work).exp2_().sum(-1)   # Σ exp(x - max)
    picked = logits.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (top[..., 0] - picked).add_(total.log_()).clamp_(min=0), pred


def breakdowns(metrics: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """Every ``by_<group>`` breakdown of an evaluation (``by_length``, ``by_position``,
    ``by_kind``, ...) as ``(group, {key: {accuracy, loss, n}})``, length and position first, then
    by name: what the CLI prints, a target accuracy reads, and the findings and report show.

    >>> m = {"accuracy": 0.9, "by_kind": {"odd": {"accuracy": 1.0}}, "by_length": {"2": {"accuracy": 0.8}}}
    >>> [group for group, _ in breakdowns(m)]
    ['length', 'kind']
    """
    keys = [k for k, v in metrics.items() if k.startswith("by_") and isinstance(v, dict)
            and all(isinstance(g, dict) and "accuracy" in g for g in v.values())]
    keys.sort(key=lambda k: (k not in ("by_length", "by_position"), k))
    return [(k[3:], metrics[k]) for k in keys]


def as_index(positions: list[int]) -> slice | list[int]:
    """``positions`` as a slice where they are consecutive (a view, not a gather)."""
    if list(positions) == list(range(positions[0], positions[-1] + 1)):
        return slice(positions[0], positions[-1] + 1)
    return list(positions)


def _fixed_targets(tokens: Tensor, positions: list[int], answers: Tensor) -> Batch:
    targets = torch.full_like(tokens, IGNORE)
    targets[:, as_index(positions)] = answers
    return Batch(tokens, targets, targets != IGNORE)
