"""The training loop every stage shares: validate every epoch, keep the best weights, checkpoint for --resume.

Read top to bottom, fit() is the lean loop: lr schedule, accumulation weighted by real batch sizes,
autocast, clip, step, zero_grad(set_to_none=True), log, checkpoint.

Checkpoints survive a kill at any instant. Every file is written atomically (keydistill.checkpoint), so a
kill lands between two writes, and the order of the writes keeps them consistent: the best checkpoint
carries its own validation score and step, which are the truth about "best" on resume (the latest
checkpoint's copy may be older), and a stage is marked finished in progress.json only after its best
checkpoint exists.
"""

from __future__ import annotations

import inspect
import math
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from keydistill.checkpoint import load_checkpoint, read_record, save_checkpoint
from keydistill.data import length_bucketed_batches
from keydistill.optim import clip_grad_norm_, make_optimizer
from keydistill.train import distributed
from keydistill.train.averaging import WeightAverage
from keydistill.train.config import RunError
from keydistill.train.features import batches_on, forward, progress_bar


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


def learning_rate(cfg, peak: float, step: int, total: int) -> float:
    """Linear warmup to peak, then linear or cosine decay to 0."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (1 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: nn.Module, params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weights, none on biases and LayerNorm weights (as HF Trainer does)."""
    exempt = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    exempt |= {id(p) for name, p in model.named_parameters() if name.endswith("bias")}
    groups = [
        {"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


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


def trainer_for(run, model: nn.Module) -> nn.Module:
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


def fit(run, stage: Stage) -> dict:
    """Train one stage: validate every epoch, keep the best weights, checkpoint for --resume.

    Returns {"history": one entry per epoch, "curve": [[step, loss], ...], "best_val": ..., "best_step": ...}
    and leaves the best weights in stage.model. On data-parallel ranks each global batch (batch_size x
    ranks) is split into one chunk per rank; losses and counts are summed across ranks, so the history and
    the curve are those of the global batches, the same on every rank.
    """
    cfg, metric, ranks = run.cfg, run.task.metrics[0], run.ranks
    run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    latest, best = run.ckpt_dir / f"{stage.name}.latest.safetensors", run.ckpt_dir / f"{stage.name}.best.safetensors"
    if stage.name in run.progress:  # finished before an interruption
        load_checkpoint(best, stage.model)
        return run.progress[stage.name]
    # AdamW (fused where torch has it); row-sparse value gradients step only their rows (keydistill.optim)
    optimizer = make_optimizer(param_groups(stage.model, stage.params, cfg.weight_decay), lr=stage.lr)
    average = WeightAverage(stage.params, stage.average) if stage.average else None
    lengths = stage.dataset.lengths()
    global_batch = cfg.batch_size * ranks.world
    total_steps = stage.epochs * math.ceil(math.ceil(len(lengths) / global_batch) / cfg.grad_accum)
    state = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "history": [],
        "curve": [],
        "best_val": None,
        "best_step": None,
        "sums": {},
        "count": 0,
        "seconds": 0.0,
        "global_batch": global_batch,
    }
    if cfg.resume and latest.exists():
        extra: dict[str, torch.Tensor] = {}
        state = load_checkpoint(latest, stage.model, optimizer, extra)["state"]
        if state.setdefault("global_batch", global_batch) != global_batch:  # absent: written before it was kept
            # the epoch's batches are cut from the global batch size: another one would replay other examples
            raise RunError(
                f"{latest}: written by a run of {state['global_batch']} examples per batch (--batch-size "
                f"x ranks), resumed with {global_batch}: resume on as many ranks as it ran on"
            )
        if average is not None:
            average.load(extra)
        if best.exists():  # the best checkpoint may be newer than the latest one's record of it
            record = read_record(best)
            state["best_val"], state["best_step"] = record["val"], record["step"]
    trainer = trainer_for(run, stage.model)

    def validate() -> dict:
        """Validate the weights the stage keeps (the average, with --weight-average); keep them when
        validation improves (ties keep the earlier, cheaper ones)."""
        with average.swapped_in() if average is not None else nullcontext():
            val = stage.validate()
            if state["best_val"] is None or val[metric] > state["best_val"][metric]:
                state["best_val"], state["best_step"] = val, state["step"]
                if ranks.main:
                    save_checkpoint(best, stage.model, {"step": state["step"], "val": val})
        return val

    saved_at = time.perf_counter()

    def save_latest() -> None:
        nonlocal saved_at
        if ranks.main:  # only rank 0 writes: the ranks need not agree on when (no collective here)
            save_checkpoint(
                latest, stage.model, {"state": state}, optimizer, average.tensors() if average is not None else None
            )
        saved_at = time.perf_counter()

    for epoch in range(state["epoch"], stage.epochs):
        batches = length_bucketed_batches(lengths, global_batch, cfg.seed, epoch)
        weights = accumulation_weights(batches, cfg.grad_accum)
        stage.model.train()
        bar = progress_bar(
            total=len(lengths),
            initial=sum(map(len, batches[: state["batch"]])),
            unit="ex",
            desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}",
        )
        started = time.perf_counter()
        step_losses, step_examples = None, 0  # the step's loss terms summed over its examples, on the device
        for i in range(state["batch"], len(batches)):
            mine = distributed.chunk(batches[i], ranks)
            padding = not mine  # fewer examples than ranks: run one with weight 0 to join the collectives
            indices = mine or batches[i][:1]
            _, batch = next(batches_on(run.device, stage.dataset, stage.collate, [indices]))
            batch["token_scale"] = token_scale(batches, i, cfg.grad_accum, mine, lengths)
            torch.manual_seed(step_seed(cfg.seed, stage.name, epoch, i, ranks.rank))
            last_of_step = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(batches)
            with nullcontext() if last_of_step or not ranks.active else trainer.no_sync():  # sync on the last
                with codebook_paused(stage.model, padding), run.autocast():
                    terms = stage.loss(trainer, batch)
                # DDP averages over ranks; these weights make the step's loss the mean over its examples
                (
                    terms["total"] * (0.0 if padding else weights[i] * len(mine) / len(batches[i]) * ranks.world)
                ).backward()
            n = 0 if padding else len(mine)
            losses = torch.stack([v.detach().double() for v in terms.values()]) * n  # no host sync per micro-batch
            step_losses = losses if step_losses is None else step_losses + losses
            step_examples += n
            bar.update(len(batches[i]))
            if not last_of_step:
                continue  # accumulate more micro-batches before stepping
            # ---- optimizer step: lr schedule, clip, step, zero, the step's loss over all ranks ----
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, stage.lr, state["step"], total_steps)
            if ranks.active:
                distributed.row_sparse_value_gradients_(stage.model)  # the rows one process would step
            if cfg.grad_clip > 0:
                clip_grad_norm_(stage.params, cfg.grad_clip)  # torch's, without copying sparse gradients
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update()
            step_sums, examples = summed_across_ranks(list(terms), step_losses, step_examples, ranks)
            for k, v in step_sums.items():
                state["sums"][k] = state["sums"].get(k, 0.0) + v
            state["count"] += examples
            state["step"] += 1
            state["curve"].append([state["step"], step_sums["total"] / max(examples, 1)])
            state["batch"] = i + 1
            step_losses, step_examples = None, 0
            if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                validate()
            if checkpoint_due(cfg, state["step"], time.perf_counter() - saved_at) and i + 1 < len(batches):
                state["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                save_latest()
        bar.close()
        # ---- end of epoch: validate, keep the best, record, checkpoint ----
        state["seconds"] += time.perf_counter() - started
        val = validate()
        state["history"].append(
            {
                "stage": stage.name,
                "epoch": epoch + 1,
                "step": state["step"],
                "loss": {k: v / max(1, state["count"]) for k, v in state["sums"].items()},
                "val": val,
                "examples_per_s": state["count"] / max(state["seconds"], 1e-9),
                "seconds": state["seconds"],
            }
        )
        print(
            f"{stage.name} epoch {epoch + 1}: loss {state['history'][-1]['loss']['total']:.4f}, "
            f"val {metric} {val[metric]:.4f}, {state['history'][-1]['examples_per_s']:.1f} ex/s"
        )
        state.update(epoch=epoch + 1, batch=0, sums={}, count=0, seconds=0.0)
        save_latest()
    distributed.barrier(f"{stage.name}: best checkpoint written")
    load_checkpoint(best, stage.model)
    result = {k: state[k] for k in ("history", "curve", "best_val", "best_step")}
    run.finish_stage(stage.name, result)
    return result


def checkpoint_due(cfg, step: int, seconds_since_last: float) -> bool:
    """A resumable checkpoint inside an epoch: every --checkpoint-every steps, or once --checkpoint-seconds
    have passed since the last. By time by default: a fixed step count writes far too often where steps are
    fast (a GPU: each write is the model, its average and the optimizer state) and seldom where they are slow."""
    by_steps = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
    return by_steps or 0 < cfg.checkpoint_seconds <= seconds_since_last


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


def summed_across_ranks(names: list[str], losses: torch.Tensor, examples: int, ranks) -> tuple[dict[str, float], int]:
    """The step's loss sums by name and its examples, each summed over the data-parallel ranks: one
    all-reduce, and the step's one device-to-host copy (the loss curve needs it)."""
    values = torch.cat([losses, losses.new_tensor([examples])])
    if ranks.active:
        distributed.all_reduce_sum_(values, "step loss")
    *sums, total_examples = values.tolist()
    return dict(zip(names, sums)), int(total_examples)


def trainable(model, cfg) -> list[torch.nn.Parameter]:
    if cfg.freeze_embeddings:
        model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def token_loss(trainer, batch) -> dict[str, torch.Tensor]:
    """The model's own loss: task loss plus, with a bottleneck, its weighted commitment loss."""
    out = trainer(batch)
    return {"total": out.loss, "task": out.task_loss}
