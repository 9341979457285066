"""The algorithmic tasks, their reference configs (model + training) and how to score them.

Every task turns a ``torch.Generator`` (or its own split seed, for finite data sets) into
batches of ``tokens [batch, pos]`` with ``targets [batch, pos]`` (-100 where no loss is read)
and a ``scored [batch, pos]`` mask of the positions that accuracy is measured on.

| task | reference setup |
| ---- | --------------- |
| max | ints 0..63, lengths 2..6, predict the max at the last position; 1 layer, 1 head, attention-only, d_model 32 |
| add | a + b with a + b <= 127, predicted at the second position; 1 layer, 1 head, d_model 128, d_mlp 128 |
| fib | x1..x5 with x(i+1) = x(i) + x(i-1) <= 127, each next element from the two before; same model as add |
| modadd | [a, b, =] -> (a + b) mod 113, 30% train split, Nanda et al.'s grokking setup |
| induction | random tokens with a segment that recurs at a varying offset; 2 layers, attention-only |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig, TrainConfig
from .errors import QkovError

IGNORE = -100  # target value for positions whose loss is not read (as in F.cross_entropy)


@dataclass
class Batch:
    tokens: Tensor   # [batch, pos] int64
    targets: Tensor  # [batch, pos] int64, IGNORE where no loss is read
    scored: Tensor   # [batch, pos] bool, positions that accuracy is measured on

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> "Batch":
        return Batch(self.tokens[idx], self.targets[idx], self.scored[idx])


class Task:
    """Base class. Subclasses set ``name``, ``defaults`` and the sampling/dataset methods."""

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
        return {"name": self.name, **self.params}

    # -- subclass hooks -------------------------------------------------------
    def _validate(self) -> None:
        pass

    @property
    def seq_len(self) -> int:
        raise NotImplementedError

    @property
    def d_vocab(self) -> int:
        raise NotImplementedError

    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def scored_positions(self) -> list[int] | None:
        """Query positions whose logits the loss reads, when they are fixed (None: data-dependent)."""
        return None

    def model_config(self) -> ModelConfig:
        raise NotImplementedError

    def train_config(self) -> TrainConfig:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError(f"task '{self.name}' has a fixed data set; use dataset('train')")

    def dataset(self, split: str = "train") -> Batch:
        raise NotImplementedError(f"task '{self.name}' samples its data; use sample(n, generator)")

    def token_labels(self) -> list[str]:
        """A label per input token id, for plots."""
        return [str(i) for i in range(self.d_vocab)]

    def group_name(self) -> str | None:
        """How eval accuracy is broken down: 'length', 'position' or None."""
        return None

    def group_of_position(self, pos: int) -> int:
        return pos

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
        forward pass over ``batch`` in chunks of about ``chunk_tokens`` tokens (chunks that fit
        in cache ran 1.4x faster than one pass over the induction eval set)."""
        masks = [batch.scored] if masks is None else masks
        P = batch.tokens.shape[1]
        zeros = lambda: [torch.zeros(P) for _ in masks]  # noqa: E731
        correct, loss, count = zeros(), zeros(), zeros()
        chunk = max(1, chunk_tokens // P)
        for i in range(0, len(batch), chunk):
            logits = model(batch.tokens[i : i + chunk])                         # [b, p, v]
            tgt = batch.targets[i : i + chunk]
            lp = logits.float().log_softmax(-1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]  # [b, p]
            right = logits.argmax(-1) == tgt
            for j, mask in enumerate(masks):
                m = mask[i : i + chunk]
                correct[j] += (right & m).sum(0)
                loss[j] += torch.where(m, -lp, 0.0).sum(0)
                count[j] += m.sum(0)
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


def _fixed_targets(tokens: Tensor, positions: list[int], answers: Tensor) -> Batch:
    targets = torch.full_like(tokens, IGNORE)
    targets[:, positions] = answers
    return Batch(tokens, targets, targets != IGNORE)


class MaxTask(Task):
    """Predict the maximum of a list of ints at its last position.

    Attention is causal, so a length-L list is the length-L prefix of a longer one: one sequence
    of ``max_len`` tokens carries every length at once, the answer for length L sitting at
    position L-1. ``min_len == max_len`` gives the fixed-length variant (e.g. 4).
    """

    name = "max"
    defaults = {"vocab": 64, "min_len": 2, "max_len": 6}

    def _validate(self) -> None:
        if self.vocab < 2:
            raise QkovError(f"vocab={self.vocab} must be at least 2")
        if not 1 <= self.min_len <= self.max_len:
            raise QkovError(f"need 1 <= min_len <= max_len; got min_len={self.min_len}, max_len={self.max_len}")

    @property
    def seq_len(self) -> int:
        return self.max_len

    @property
    def d_vocab(self) -> int:
        return self.vocab

    @property
    def scored_positions(self) -> list[int]:
        return list(range(self.min_len - 1, self.max_len))

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        tokens = torch.randint(0, self.vocab, (n, self.max_len), generator=generator)
        running_max = tokens.cummax(dim=1).values                              # [b, p]
        pos = self.scored_positions
        return _fixed_targets(tokens, pos, running_max[:, pos])

    def _eval_samples(self) -> int:
        return 10_000  # per length: each sequence scores every length at once

    def group_name(self) -> str:
        return "length"

    def group_of_position(self, pos: int) -> int:
        return pos + 1

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layers=1, n_heads=1, d_model=32, d_mlp=None, d_vocab=self.vocab, n_ctx=self.max_len)

    def train_config(self) -> TrainConfig:
        # lr 1e-2 decayed to 0 by a cosine: >= 99.9% at every length by step ~150 (seeds 0-3),
        # then 100% on the eval set with a loss near 1e-4 at the end; a constant 3e-3 needs ~450
        # steps and its accuracy still dips mid-run.
        return TrainConfig(steps=1500, batch_size=512, lr=1e-2, lr_schedule="cosine", weight_decay=0.01, eval_every=100)


class AddTask(FiniteTask):
    """``[a, b] -> a + b`` for all pairs with ``a + b <= max_sum``, answered at position 1."""

    name = "add"
    defaults = {"max_sum": 127, "train_frac": 1.0, "split_seed": 0}

    @property
    def seq_len(self) -> int:
        return 2

    @property
    def d_vocab(self) -> int:
        return self.max_sum + 1

    @property
    def scored_positions(self) -> list[int]:
        return [1]

    def _all(self) -> Batch:
        a, b = torch.meshgrid(torch.arange(self.max_sum + 1), torch.arange(self.max_sum + 1), indexing="ij")
        keep = (a + b) <= self.max_sum
        tokens = torch.stack([a[keep], b[keep]], dim=1)
        return _fixed_targets(tokens, [1], tokens.sum(1)[:, None])

    def model_config(self) -> ModelConfig:
        v = self.d_vocab
        return ModelConfig(n_layers=1, n_heads=1, d_model=128, d_mlp=128, d_vocab=v, n_ctx=2)

    def train_config(self) -> TrainConfig:
        # Full batch (all 8,256 pairs), lr 2e-2 with a 50-step warmup and a cosine decay: 100% of
        # pairs by step 600-700 on seeds 0-2, then the decay settles it (final loss 0.03-0.07). A
        # constant 3e-3 spikes (Adam) and ends at 99.8%; batches of 2,048 at 2e-2 end at 99.9%.
        return TrainConfig(
            steps=1000, batch_size=None, lr=2e-2, lr_schedule="cosine", warmup_steps=50,
            weight_decay=0.01, eval_every=100,
        )


class FibTask(FiniteTask):
    """Fibonacci-like sequences ``x1..x5`` (every term <= ``max_value``): predict each next term.

    Position i (1 <= i <= length-2) sees ``x1..x(i+1)`` and predicts ``x(i+2)``.
    """

    name = "fib"
    defaults = {"max_value": 127, "length": 5, "train_frac": 1.0, "split_seed": 0}

    def _validate(self) -> None:
        super()._validate()
        if self.length < 3:
            raise QkovError(f"length={self.length} must be at least 3 (two seeds and one term to predict)")

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def d_vocab(self) -> int:
        return self.max_value + 1

    @property
    def scored_positions(self) -> list[int]:
        return list(range(1, self.length - 1))

    def _all(self) -> Batch:
        seqs = []
        for x1 in range(self.max_value + 1):
            for x2 in range(self.max_value + 1):
                s = [x1, x2]
                while len(s) < self.length:
                    s.append(s[-1] + s[-2])
                if s[-1] <= self.max_value:
                    seqs.append(s)
        tokens = torch.tensor(seqs)
        pos = self.scored_positions
        return _fixed_targets(tokens, pos, tokens[:, [p + 1 for p in pos]])

    def group_name(self) -> str:
        return "position"

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layers=1, n_heads=1, d_model=128, d_mlp=128, d_vocab=self.d_vocab, n_ctx=self.length)

    def train_config(self) -> TrainConfig:
        # Batches of 512 of the 1,408 sequences, lr 1e-2 with a 50-step warmup and a cosine
        # decay: 100% at every position by step 600 on seeds 0-2 (final loss 2-3e-3), at half
        # the CPU time of full-batch steps.
        return TrainConfig(
            steps=1000, batch_size=512, lr=1e-2, lr_schedule="cosine", warmup_steps=50,
            weight_decay=0.01, eval_every=100,
        )


class ModAddTask(FiniteTask):
    """``[a, b, =] -> (a + b) mod p``; ``=`` is the token ``p`` (Nanda et al., 2023)."""

    name = "modadd"
    defaults = {"p": 113, "train_frac": 0.3, "split_seed": 0}

    def _validate(self) -> None:
        super()._validate()
        if self.p < 2:
            raise QkovError(f"p={self.p} must be at least 2")

    @property
    def seq_len(self) -> int:
        return 3

    @property
    def d_vocab(self) -> int:
        return self.p + 1

    @property
    def d_vocab_out(self) -> int:
        return self.p

    @property
    def scored_positions(self) -> list[int]:
        return [2]

    def _all(self) -> Batch:
        a, b = torch.meshgrid(torch.arange(self.p), torch.arange(self.p), indexing="ij")
        a, b = a.reshape(-1), b.reshape(-1)
        tokens = torch.stack([a, b, torch.full_like(a, self.p)], dim=1)
        return _fixed_targets(tokens, [2], ((a + b) % self.p)[:, None])

    def token_labels(self) -> list[str]:
        return [str(i) for i in range(self.p)] + ["="]

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            n_layers=1, n_heads=4, d_model=128, d_head=32, d_mlp=512, act_fn="relu", normalization=None,
            d_vocab=self.p + 1, d_vocab_out=self.p, n_ctx=3, use_bias=False,
        )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=25_000, batch_size=None, lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98),
            warmup_steps=10, eval_every=100, checkpoint_every=1000,
        )


class InductionTask(Task):
    """Random tokens in which a segment recurs at an offset that varies between sequences.

    Layout of each sequence of ``n_ctx`` tokens: a random-length prefix of random tokens, a
    segment of ``min_seg..max_seg`` random tokens, the same segment again, then random tokens.
    The loss is next-token prediction at every position; accuracy and the headline loss are
    measured on the repeated part (from the repeat's first token, predicting its second, on).

    Why the reference defaults (measured with seed 0; see ``tests/test_heads.py``):
    ``max_seg = n_ctx // 2`` puts the standard ``[x, x]`` test inside the training distribution
    (with ``max_seg=12`` the model never saw a 16-token repeat and its ``[x, x]`` loss stayed at
    3.3 nats); ``vocab=256`` makes accidental repeats in the random text rare (with 64 tokens a
    query's token has often occurred by chance, which kept the repeated-part loss near 0.6
    nats); 2 heads a layer give one clean previous-token head in layer 0; lr 1e-2 with batches
    of 64 brings the induction phase change near step 1,000 (batch 32 or ``d_model=32`` delay it
    past 1,500; lr 2e-2 stalls before 2,000).
    """

    name = "induction"
    defaults = {"vocab": 256, "n_ctx": 32, "min_seg": 4, "max_seg": 16}

    def _validate(self) -> None:
        if not 2 <= self.min_seg <= self.max_seg:
            raise QkovError(f"need 2 <= min_seg <= max_seg; got {self.min_seg}, {self.max_seg}")
        if 2 * self.max_seg > self.n_ctx:
            raise QkovError(f"2 * max_seg = {2 * self.max_seg} does not fit in n_ctx={self.n_ctx}")
        if self.vocab < 2:
            raise QkovError(f"vocab={self.vocab} must be at least 2")

    @property
    def seq_len(self) -> int:
        return self.n_ctx

    @property
    def d_vocab(self) -> int:
        return self.vocab

    def sample(self, n: int, generator: torch.Generator) -> Batch:
        T = self.n_ctx
        tokens = torch.randint(0, self.vocab, (n, T), generator=generator)
        seg = torch.randint(self.min_seg, self.max_seg + 1, (n,), generator=generator)
        start = (torch.rand(n, generator=generator) * (T - 2 * seg + 1)).long()   # in [0, T - 2 seg]
        pos = torch.arange(T)[None]                                             # [1, T]
        second = (pos >= (start + seg)[:, None]) & (pos < (start + 2 * seg)[:, None])
        src = (pos - seg[:, None]).clamp(min=0)
        tokens = torch.where(second, tokens.gather(1, src), tokens)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = tokens[:, 1:]
        # Predictable: inside the second copy, predicting a token that is also in it.
        scored = second.clone()
        scored[:, :-1] &= second[:, 1:]
        scored[:, -1] = False
        return Batch(tokens, targets, scored)

    def repeated_tokens(self, n: int, generator: torch.Generator, half: int | None = None) -> Batch:
        """The standard induction test: random tokens repeated twice, ``[x, x]``."""
        half = self.n_ctx // 2 if half is None else half
        x = torch.randint(0, self.vocab, (n, half), generator=generator)
        tokens = torch.cat([x, x], dim=1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = tokens[:, 1:]
        scored = torch.zeros_like(tokens, dtype=torch.bool)
        scored[:, half:-1] = True
        return Batch(tokens, targets, scored)

    @torch.no_grad()
    def evaluate(self, model, batch: Batch | None = None) -> dict[str, Any]:
        """Accuracy and loss on the repeated part, the loss on the rest, and the ``[x, x]`` test."""
        batch = self.eval_batch() if batch is None else batch
        rest = (~batch.scored) & (batch.targets != IGNORE)
        out, rest = self._measure(model, batch, [batch.scored, rest])
        out["loss_rest"] = rest["loss"]
        rep = self.repeated_tokens(1024, torch.Generator().manual_seed(self.eval_seed + 1))
        r, first = self._measure(model, rep, [rep.scored, (~rep.scored) & (rep.targets != IGNORE)])
        out["repeated"] = {"accuracy": r["accuracy"], "loss": r["loss"], "loss_first_half": first["loss"]}
        return out

    def model_config(self) -> ModelConfig:
        return ModelConfig(n_layers=2, n_heads=2, d_model=64, d_mlp=None, d_vocab=self.vocab, n_ctx=self.n_ctx)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=2000, batch_size=64, lr=1e-2, weight_decay=0.01, warmup_steps=100, eval_every=500)


TASKS: dict[str, type[Task]] = {t.name: t for t in (MaxTask, AddTask, FibTask, ModAddTask, InductionTask)}


def get_task(name: str | Task, **overrides: Any) -> Task:
    """A task by name with its reference defaults; keyword arguments override its parameters.

    >>> get_task("max").max_len
    6
    >>> get_task("modadd", p=23).model_config().d_vocab
    24
    """
    if isinstance(name, Task):
        return type(name)(**{**name.params, **overrides})
    if name not in TASKS:
        raise QkovError(f"unknown task '{name}'. Known tasks: {', '.join(sorted(TASKS))}.")
    return TASKS[name](**overrides)


def task_from_dict(d: dict[str, Any]) -> Task:
    d = dict(d)
    return get_task(d.pop("name"), **d)


def configure(
    task: str | Task, sets: dict[str, Any] | None = None, steps: int | None = None
) -> tuple[Task, ModelConfig, TrainConfig]:
    """Task, model config and train config for ``task`` with ``key=value`` overrides applied.

    A key names a task parameter, a ModelConfig field or a TrainConfig field (looked up in that
    order; prefix it with ``task.``, ``model.`` or ``train.`` to be explicit). String values are
    parsed to the field's type, as ``qkov train --set`` passes them. Task parameters are applied
    first, so e.g. ``p=23`` resizes the model's vocabulary before model fields are set.

    >>> task, model_cfg, train_cfg = configure("modadd", {"p": "23", "lr": "3e-3"})
    >>> model_cfg.d_vocab, train_cfg.lr
    (24, 0.003)
    """
    from .config import parse_value

    base = get_task(task)
    task_sets: dict[str, Any] = {}
    model_sets: dict[str, Any] = {}
    train_sets: dict[str, Any] = {}
    model_fields = ModelConfig().to_dict()
    train_fields = TrainConfig().to_dict()
    train_fields["betas"] = tuple(train_fields["betas"])
    for raw_key, value in (sets or {}).items():
        scope, _, key = raw_key.rpartition(".")
        if scope not in ("", "task", "model", "train"):
            raise QkovError(f"unknown key prefix '{scope}.' in '{raw_key}'; use task., model. or train.")
        if scope in ("", "task") and key in base.defaults:
            target, current = task_sets, base.params[key]
        elif scope in ("", "model") and key in model_fields:
            target, current = model_sets, model_fields[key]
        elif scope in ("", "train") and key in train_fields:
            target, current = train_sets, train_fields[key]
        else:
            known = sorted(base.defaults) + sorted(model_fields) + sorted(train_fields)
            raise QkovError(f"unknown key '{raw_key}' for task '{base.name}'; known keys: {', '.join(known)}")
        target[key] = parse_value(value, current, raw_key) if isinstance(value, str) else value
    task_obj = get_task(base, **task_sets)
    model_cfg = task_obj.model_config().replace(**model_sets)
    train_cfg = task_obj.train_config().replace(**train_sets)
    if steps is not None:
        train_cfg = train_cfg.replace(steps=steps)
    task_obj.check_model(model_cfg)
    return task_obj, model_cfg, train_cfg
