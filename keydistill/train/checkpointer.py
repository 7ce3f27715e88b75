"""A stage's two checkpoints, written in an order that survives a kill between any two writes.

Every file is written atomically (keydistill.checkpoint), so a kill lands between two writes. The latest
checkpoint holds all a resumed run needs (weights, optimizer, RNG, weight average, TrainState); the best one
holds the weights validation liked best with their own score and step, which are the truth about "best" on
resume (the latest checkpoint's copy may be older). A stage is marked finished in progress.json only after
its best checkpoint exists; its latest checkpoint is deleted after that, so a finished run keeps the best ones.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from keydistill.checkpoint import load_checkpoint, read_record, save_checkpoint
from keydistill.train import distributed
from keydistill.train.averaging import WeightAverage
from keydistill.train.config import RunError, TrainConfig
from keydistill.train.state import Stage, TrainState

if TYPE_CHECKING:
    from keydistill.train.context import Run


def best_path(run: Run, stage: str) -> Path:
    return run.ckpt_dir / f"{stage}.best.safetensors"


def checkpoint_due(cfg: TrainConfig, step: int, seconds_since_last: float) -> bool:
    """A resumable checkpoint inside an epoch: every --checkpoint-every steps, or once --checkpoint-seconds
    have passed since the last. By time by default: a fixed step count writes far too often where steps are
    fast (a GPU: each write is the model, its average and the optimizer state) and seldom where they are slow."""
    by_steps = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
    return by_steps or 0 < cfg.checkpoint_seconds <= seconds_since_last


class Checkpointer:
    """Validate and keep the best weights, save the latest state, and restore it on --resume; only rank 0
    writes (the ranks need not agree on when: no collective here)."""

    def __init__(self, run: Run, stage: Stage, optimizer: torch.optim.Optimizer, average: WeightAverage | None) -> None:
        self.run, self.stage, self.optimizer, self.average = run, stage, optimizer, average
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.latest, self.best = run.ckpt_dir / f"{stage.name}.latest.safetensors", best_path(run, stage.name)
        self.saved_at = time.perf_counter()

    def restore(self, fresh: TrainState) -> TrainState:
        """The state to train from: fresh, or with --resume the latest checkpoint's (model, optimizer, RNG and
        weight average restored with it), its best score and step read from the best checkpoint."""
        state = fresh
        if self.run.cfg.resume and self.latest.exists():
            extra: dict[str, torch.Tensor] = {}
            record = load_checkpoint(self.latest, self.stage.model, self.optimizer, extra)["state"]
            state = TrainState.from_dict(record, fresh.global_batch)
            if state.global_batch != fresh.global_batch:
                # the epoch's batches are cut from the global batch size: another one would replay other examples
                raise RunError(
                    f"{self.latest}: written by a run of {state.global_batch} examples per batch (--batch-size "
                    f"x ranks), resumed with {fresh.global_batch}: resume on as many ranks as it ran on"
                )
            if self.average is not None:
                self.average.load(extra)
            if self.best.exists():  # the best checkpoint may be newer than the latest one's record of it
                record = read_record(self.best)
                state.best_val, state.best_step = record["val"], record["step"]
        self.saved_at = time.perf_counter()
        return state

    def validate(self, state: TrainState, chooses: bool = True) -> dict[str, float]:
        """Validate the weights the stage keeps (the average, with --weight-average); keep them when
        validation improves (ties keep the earlier, cheaper ones). chooses=False: a point for the curves
        only (--curve-points), which keeps nothing."""
        metric = self.run.task.metrics[0]
        with self.average.swapped_in() if self.average is not None else nullcontext():
            val = self.stage.validate()
            state.validations.append({"step": state.step, "val": val, "chooses": chooses})
            self.run.board.validation(self.stage.name, state.step, val)
            if chooses and (state.best_val is None or val[metric] > state.best_val[metric]):
                state.best_val, state.best_step = val, state.step
                if self.run.ranks.main:
                    save_checkpoint(self.best, self.stage.model, {"step": state.step, "val": val})
        return val

    def due(self, step: int) -> bool:
        return checkpoint_due(self.run.cfg, step, time.perf_counter() - self.saved_at)

    def save_latest(self, state: TrainState) -> None:
        if self.run.ranks.main:
            extra = self.average.tensors() if self.average is not None else None
            save_checkpoint(self.latest, self.stage.model, {"state": state.to_dict()}, self.optimizer, extra)
        self.saved_at = time.perf_counter()

    def finish(self, state: TrainState) -> dict:
        """The best weights back in the model, and the stage's result, recorded as finished; then the latest
        checkpoint goes: a finished stage resumes from its best one, and the latest's optimizer state is most of
        a run's disk. A kill before the unlink leaves it, unread."""
        distributed.barrier(f"{self.stage.name}: best checkpoint written")
        load_checkpoint(self.best, self.stage.model)
        result = {k: getattr(state, k) for k in ("history", "curve", "validations", "best_val", "best_step")}
        self.run.finish_stage(self.stage.name, result)
        if self.run.ranks.main:
            self.latest.unlink(missing_ok=True)
        return result
