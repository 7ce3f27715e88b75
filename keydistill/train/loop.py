"""The training loop every stage shares: validate every epoch, keep the best weights, checkpoint for --resume.

Read top to bottom, fit() is the lean loop: per optimizer step, its micro-batches (each this rank's chunk,
weighted by its share of the step's examples, seeded by where it is) go forward and backward under autocast,
then lr schedule, clip, step, zero_grad(set_to_none=True); the step is logged in the TrainState
(keydistill.train.state), and the Checkpointer (keydistill.train.checkpointer) validates, keeps the best
weights and saves the latest state in an order that survives a kill between any two writes.
"""

from __future__ import annotations

import inspect
import math
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from keydistill.checkpoint import load_checkpoint
from keydistill.data import length_bucketed_batches
from keydistill.optim import clip_grad_norm_, make_optimizer
from keydistill.train import distributed
from keydistill.train.averaging import WeightAverage
from keydistill.train.checkpointer import Checkpointer, best_path
from keydistill.train.config import TrainConfig
from keydistill.train.distributed import Dist
from keydistill.train.features import batches_on, forward, progress_bar
from keydistill.train.state import Stage, TrainState

if TYPE_CHECKING:
    from keydistill.train.context import Run


def fit(run: Run, stage: Stage) -> dict:
    """Train one stage: validate every epoch, keep the best weights, checkpoint for --resume.

    Returns {"history": one entry per epoch, "curve": [[step, loss], ...], "best_val": ..., "best_step": ...}
    and leaves the best weights in stage.model. On data-parallel ranks each global batch (batch_size x
    ranks) is split into one chunk per rank; losses and counts are summed across ranks, so the history and
    the curve are those of the global batches, the same on every rank.
    """
    cfg, metric, ranks = run.cfg, run.task.metrics[0], run.ranks
    if stage.name in run.progress:  # finished before an interruption
        load_checkpoint(best_path(run, stage.name), stage.model)
        return run.progress[stage.name]
    # AdamW (fused where torch has it); row-sparse value gradients step only their rows (keydistill.optim)
    optimizer = make_optimizer(param_groups(stage.model, stage.params, cfg.weight_decay), lr=stage.lr)
    average = WeightAverage(stage.params, stage.average) if stage.average else None
    lengths = stage.dataset.lengths()
    global_batch = cfg.batch_size * ranks.world
    total_steps = stage.epochs * math.ceil(math.ceil(len(lengths) / global_batch) / cfg.grad_accum)
    checkpoints = Checkpointer(run, stage, optimizer, average)
    state = checkpoints.restore(TrainState(global_batch))
    curve_steps = curve_points(cfg.curve_points, total_steps, stage.epochs, len(lengths) * stage.epochs, len(run.val))
    trainer = trainer_for(run, stage.model)
    for epoch in range(state.epoch, stage.epochs):
        batches = length_bucketed_batches(lengths, global_batch, cfg.seed, epoch)
        weights = accumulation_weights(batches, cfg.grad_accum)
        stage.model.train()
        seen, desc = sum(map(len, batches[: state.batch])), f"{stage.name} epoch {epoch + 1}/{stage.epochs}"
        bar, clock = progress_bar(total=len(lengths), initial=seen, unit="ex", desc=desc), Stopwatch()
        for micro_batches in optimizer_steps(state.batch, len(batches), cfg.grad_accum):
            step_loss = StepLoss()
            for i in micro_batches:
                micro = micro_batch(run, stage, batches, weights, lengths, epoch, i)
                step_loss.add(backward(run, stage, trainer, micro, sync=i == micro_batches[-1]), micro.examples)
                bar.update(len(batches[i]))
            optimizer_step(run, stage, optimizer, average, learning_rate(cfg, stage.lr, state.step, total_steps))
            state.add_step(*step_loss.across(ranks), next_batch=micro_batches[-1] + 1)
            run.board.loss(stage.name, state.step, state.curve[-1][1])
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                checkpoints.validate(state)
            elif state.step in curve_steps and state.batch < len(batches):  # the epoch's end validates anyway
                checkpoints.validate(state, chooses=False)
            if checkpoints.due(state.step) and state.batch < len(batches):
                state.seconds += clock.lap()
                checkpoints.save_latest(state)
        bar.close()
        state.seconds += clock.lap()
        summary = state.end_epoch(stage.name, checkpoints.validate(state))
        print(
            f"{stage.name} epoch {epoch + 1}: loss {summary['loss']['total']:.4f}, "
            f"val {metric} {summary['val'][metric]:.4f}, {summary['examples_per_s']:.1f} ex/s"
        )
        checkpoints.save_latest(state)
    return checkpoints.finish(state)


def curve_points(points: int, total_steps: int, epochs: int, examples: int, val_rows: int) -> set[int]:
    """The steps of a stage's curve-only validations (--curve-points): spread evenly over its steps, so that
    it shows at least `points` validations, where it has fewer epochs and trains on at least 10x the
    validation rows (a validation then costs at most about a tenth of the training between two)."""
    if epochs >= points or examples < 10 * val_rows:
        return set()
    return {round(k * total_steps / points) for k in range(1, points)} - {0}


# ----------------------------------------------------------------------------------------------------------
# One optimizer step: its micro-batches, each forward and backward, then the step itself
# ----------------------------------------------------------------------------------------------------------


def optimizer_steps(first: int, batches: int, grad_accum: int) -> Iterator[range]:
    """The micro-batches of each optimizer step from micro-batch first on: up to the next multiple of
    grad_accum, fewer at the end of the epoch."""
    while first < batches:
        end = min((first // grad_accum + 1) * grad_accum, batches)
        yield range(first, end)
        first = end


@dataclass
class MicroBatch:
    batch: dict  # this rank's examples on the device, with their token_scale
    weight: float  # on its mean loss: its share of the step's examples over all ranks (0 for padding)
    examples: int  # this rank's examples in it (0 for padding)
    padding: bool  # fewer examples than ranks: this rank runs one, weighted 0, to join the collectives
    seed: int  # of the RNG (dropout) while it runs: step_seed


def micro_batch(
    run: Run, stage: Stage, batches: list[list[int]], weights: list[float], lengths: list[int], epoch: int, i: int
) -> MicroBatch:
    """Micro-batch i of the epoch's batches (weights: accumulation_weights of them), this rank's part of it."""
    ranks, grad_accum = run.ranks, run.cfg.grad_accum
    mine = distributed.chunk(batches[i], ranks)
    padding = not mine
    _, batch = next(batches_on(run.device, stage.dataset, stage.collate, [mine or batches[i][:1]]))
    batch["token_scale"] = token_scale(batches, i, grad_accum, mine, lengths)
    # DDP averages over ranks; these weights make the step's loss the mean over its examples
    weight = 0.0 if padding else weights[i] * len(mine) / len(batches[i]) * ranks.world
    return MicroBatch(batch, weight, len(mine), padding, step_seed(run.cfg.seed, stage.name, epoch, i, ranks.rank))


def backward(run: Run, stage: Stage, trainer: nn.Module, micro: MicroBatch, sync: bool) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch, its gradient added to the step's; the ranks' gradients are
    all-reduced only when sync (the step's last micro-batch). Returns its loss terms."""
    torch.manual_seed(micro.seed)
    with nullcontext() if sync or not run.ranks.active else trainer.no_sync():
        with codebook_paused(stage.model, micro.padding), run.autocast():
            terms = stage.loss(trainer, micro.batch)
        (terms["total"] * micro.weight).backward()
    return terms


class StepLoss:
    """The step's loss terms summed over its examples, kept on the device (no host sync per micro-batch)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: torch.Tensor | None = None
        self.examples = 0

    def add(self, terms: dict[str, torch.Tensor], examples: int) -> None:
        losses = torch.stack([v.detach().double() for v in terms.values()]) * examples
        self.sums = losses if self.sums is None else self.sums + losses
        self.names = list(terms)
        self.examples += examples

    def across(self, ranks: Dist) -> tuple[dict[str, float], int]:
        """The sums by name and the examples, each summed over the data-parallel ranks: one all-reduce, and
        the step's one device-to-host copy (the loss curve needs it)."""
        values = torch.cat([self.sums, self.sums.new_full((1,), self.examples)])  # a fill, no host copy
        if ranks.active:
            distributed.all_reduce_sum_(values, "step loss")
        *sums, examples = values.tolist()
        return dict(zip(self.names, sums)), int(examples)


def optimizer_step(
    run: Run, stage: Stage, optimizer: torch.optim.Optimizer, average: WeightAverage | None, lr: float
) -> None:
    """lr, the ranks' row-sparse gradients, clip, step, zero; then the weight average follows."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if run.ranks.active:
        distributed.row_sparse_value_gradients_(stage.model)  # the rows one process would step
    if run.cfg.grad_clip > 0:
        clip_grad_norm_(stage.params, run.cfg.grad_clip)  # torch's, without copying sparse gradients
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if average is not None:
        average.update()


def learning_rate(cfg: TrainConfig, peak: float, step: int, total: int) -> float:
    """Linear warmup to peak, then linear or cosine decay to 0."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))


def accumulation_weights(batches: list[list[int]], grad_accum: int) -> list[float]:
    """Per micro-batch, the weight of its mean loss in its optimizer step: its share of the step's examples.

    Summed over a group this gives the mean loss over all the group's examples, as one large batch would,
    also for the last group of an epoch (fewer micro-batches) and for short micro-batches.
    """
    weights = []
    for start in range(0, len(batches), grad_accum):
        group = batches[start : start + grad_accum]
        examples = sum(len(b) for b in group)
        weights += [len(b) / examples for b in group]
    return weights


def token_scale(batches: list[list[int]], i: int, grad_accum: int, mine: list[int], lengths: list[int]) -> float:
    """For loss terms that are means over tokens (the hidden-state MSE): the factor on this micro-batch's own
    token count that makes it the step's tokens times this micro-batch's share of the step's examples. The
    loop weights each micro-batch (and rank) by its examples, so the weighted sum is then the token mean over
    the whole step, as one large batch gives. Exactly 1.0 in one process without accumulation."""
    if not mine:  # a padding micro-batch, weighted 0
        return 1.0
    start = i - i % grad_accum
    step = batches[start : start + grad_accum]
    step_tokens, step_examples = sum(lengths[j] for b in step for j in b), sum(len(b) for b in step)
    return step_tokens * len(mine) / step_examples / sum(lengths[j] for j in mine)


def step_seed(seed: int, stage: str, epoch: int, batch: int, rank: int) -> int:
    """The RNG seed of one micro-batch: a function of where it is, so a resumed run draws (dropout) what an
    uninterrupted one would, on every rank, without saving generator states."""
    return zlib.crc32(f"{seed}/{stage}/{epoch}/{batch}/{rank}".encode())


@contextmanager
def codebook_paused(model: nn.Module, paused: bool):
    """Keep a padding example out of the codebook statistics (its rank still joins their all-reduce)."""
    bottlenecks = [m for m in model.modules() if hasattr(m, "ema_paused")] if paused else []
    for m in bottlenecks:
        m.ema_paused = True
    try:
        yield
    finally:
        for m in bottlenecks:
            m.ema_paused = False


class Stopwatch:
    """An epoch's training time, in laps: lap() is the time since the last lap (or since the start)."""

    def __init__(self) -> None:
        self.since = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.since = now - self.since, now
        return seconds


# ----------------------------------------------------------------------------------------------------------
# What a stage trains, and through what
# ----------------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weights, none on biases and LayerNorm weights (as HF Trainer does)."""
    exempt = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    exempt |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    groups = [
        {"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


class BatchForward(nn.Module):
    """model on a batch dict (token or cached-feature batch), as one module: what DDP wraps, so that every
    stage's forward goes through DistributedDataParallel's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, with_labels: bool = True, detach_head: bool = False):
        if not detach_head:
            return forward(self.model, batch, with_labels)
        # The head reads a detached encoder output (the key-less student under the hard lookup); the encoder
        # output itself, with its gradient, stays in hidden_states for the feature loss.
        hidden = self.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).hidden_states
        out = self.model.forward_hidden(
            hidden.detach(), batch["attention_mask"], batch["labels"] if with_labels else None
        )
        out.hidden_states = hidden
        return out


def trainer_for(run: Run, model: nn.Module) -> nn.Module:
    """The module a stage trains through: DDP around BatchForward on data-parallel ranks (EMA buffers are
    synchronised by the bottleneck itself, so DDP must not broadcast rank 0's), else BatchForward."""
    wrapped = BatchForward(model)
    if not run.ranks.active:
        return wrapped
    device_ids = [run.device] if run.device.type == "cuda" else None
    # Newer torch names the switch forward_sync_buffers (it still syncs once at init, which is right here:
    # every rank's codebook is identical when a stage starts); older torch knows only broadcast_buffers.
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return nn.parallel.DistributedDataParallel(wrapped, device_ids=device_ids, **no_buffer_sync)


def trainable(model: nn.Module, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    if cfg.freeze_embeddings:
        model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def token_loss(trainer: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    """The model's own loss: task loss plus, with a bottleneck, its weighted commitment loss."""
    out = trainer(batch)
    return {"total": out.loss, "task": out.task_loss}
