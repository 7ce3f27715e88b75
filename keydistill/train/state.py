"""A training stage: what it trains (Stage), and where its training stands with what it has measured so far
(TrainState, also the record that its latest checkpoint keeps: to_dict / from_dict, so a resumed run
continues from it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Stage:
    name: str
    model: torch.nn.Module  # checkpointed whole
    params: list[torch.nn.Parameter]  # what the optimizer trains
    epochs: int
    lr: float
    dataset: torch.utils.data.Dataset
    collate: Callable
    # (trainer, batch) -> {"total": ..., other terms}; trainer(batch, ...) is BatchForward's forward
    loss: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]]
    validate: Callable[[], dict[str, float]]
    average: float = 0.0  # decay of the weight average validated and kept (keydistill.train.averaging); 0: none


@dataclass
class TrainState:
    global_batch: int  # examples per batch over all ranks (--batch-size x ranks): the epoch's batches are cut from it
    epoch: int = 0  # the epoch under way (epochs before it are finished)
    batch: int = 0  # its next micro-batch
    step: int = 0  # optimizer steps taken in the stage
    history: list[dict] = field(default_factory=list)  # one entry per finished epoch (end_epoch)
    curve: list[list[float]] = field(default_factory=list)  # [step, the step's mean loss] per step
    # every validation: {"step", "val", "chooses": whether it may choose the kept weights (not a curve point)}
    validations: list[dict] = field(default_factory=list)
    best_val: dict[str, float] | None = None  # the best validation so far, and the step it came at
    best_step: int | None = None
    sums: dict[str, float] = field(default_factory=dict)  # the epoch's loss terms summed over its examples
    count: int = 0  # the epoch's examples so far
    seconds: float = 0.0  # the epoch's training time so far (without validation)

    def to_dict(self) -> dict:
        """The checkpoint record (JSON types only)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict, global_batch: int) -> TrainState:
        """A state read back from to_dict's record. global_batch stands in where the record lacks it (written
        before it was kept); a record of another global batch keeps its own, for the caller to refuse."""
        return cls(**{"global_batch": global_batch, **record})

    def add_step(self, sums: dict[str, float], examples: int, next_batch: int) -> None:
        """Count one optimizer step: its loss sums by term over its examples, then where the epoch goes on."""
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += examples
        self.step += 1
        self.curve.append([self.step, sums["total"] / max(examples, 1)])
        self.batch = next_batch

    def end_epoch(self, stage: str, val: dict[str, float]) -> dict:
        """Record the finished epoch in the history (returned) and start the next one's counts."""
        self.history.append(
            {
                "stage": stage,
                "epoch": self.epoch + 1,
                "step": self.step,
                "loss": {k: v / max(1, self.count) for k, v in self.sums.items()},
                "val": val,
                "examples_per_s": self.count / max(self.seconds, 1e-9),
                "seconds": self.seconds,
            }
        )
        self.epoch, self.batch, self.sums, self.count, self.seconds = self.epoch + 1, 0, {}, 0, 0.0
        return self.history[-1]
