"""A run's training state: the model, its optimizer, the batch generator and the step count.

Everything that has to survive a stop to resume bit-exactly lives in one :class:`TrainingState`,
made fresh from a run's config (:meth:`TrainingState.fresh`) or read back from its run
directory (:meth:`TrainingState.resumed`, through ``store``). The model is initialised on the
CPU from the seed and then moved to the run's device, so the same seed gives the same initial
weights everywhere; batches are drawn on the CPU from the generator and moved the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import store
from .config import TrainConfig
from .devices import resolve_device
from .model import Transformer
from .optim import AdamW
from .store import RunConfig
from .tasks import Batch


def make_optimizer(model: Transformer, cfg: TrainConfig) -> AdamW:
    """AdamW over the model's trainable parameters with the run's settings (see ``optim.py``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


@dataclass
class TrainingState:
    """One run's model, optimizer, batch generator, completed steps and eval history."""

    rc: RunConfig
    model: Transformer
    optimizer: AdamW
    generator: torch.Generator
    device: torch.device
    step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def fresh(cls, rc: RunConfig) -> TrainingState:
        """Step 0: weights initialised from the seed, the generator seeded by it too."""
        device = resolve_device(rc.train.device)
        model = Transformer(rc.model, seed=rc.seed).to(device).train()
        return cls(rc, model, make_optimizer(model, rc.train), torch.Generator().manual_seed(rc.seed), device)

    @classmethod
    def resumed(cls, path: Path, rc: RunConfig) -> TrainingState:
        """The newest saved state of the run in ``path`` (``train_state.safetensors``)."""
        device = resolve_device(rc.train.device)
        saved = store.load_train_state(path, rc.model)
        model = saved.model.to(device).train()
        optimizer = make_optimizer(model, rc.train)
        by_name = dict(model.named_parameters())
        for name, tensors in saved.optimizer_state.items():
            optimizer.state[by_name[name]].update({k: v.to(device) for k, v in tensors.items()})
        generator = torch.Generator()
        generator.set_state(saved.rng_state)
        metrics = [r for r in store.read_metrics(path) if r["step"] <= saved.step]
        return cls(rc, model, optimizer, generator, device, saved.step, metrics)

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Parameter name -> its optimizer tensors, as ``store.save_train_state`` takes them."""
        return {name: self.optimizer.state[p] for name, p in self.model.named_parameters()
                if self.optimizer.state.get(p)}

    def save(self, out: Path) -> None:
        """Write ``train_state.safetensors`` (weights, optimizer, generator, step) into ``out``."""
        store.save_train_state(out, self.step, self.model, self.optimizer_state(), self.generator.get_state())

    def next_batch(self, train_data: Batch | None) -> Batch:
        """The next training batch: sampled from the task, or drawn from ``train_data`` (the
        whole set when the batch size covers it), on the run's device."""
        task, bs = self.rc.task, self.rc.train.batch_size
        if train_data is None:
            batch = task.sample(bs, self.generator)
        elif bs is None or bs >= len(train_data):
            return train_data
        else:
            batch = train_data[torch.randint(0, len(train_data), (bs,), generator=self.generator)]
        return batch if self.device.type == "cpu" else batch.to(self.device)
