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

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from keydistill.checkpoint import load_checkpoint, read_record, save_checkpoint
from keydistill.data import length_bucketed_batches
from keydistill.train.features import batches_on, forward


@dataclass
class Stage:
    name: str
    model: torch.nn.Module  # checkpointed whole
    params: list[torch.nn.Parameter]  # what the optimizer trains
    epochs: int
    lr: float
    dataset: torch.utils.data.Dataset
    collate: Callable
    loss: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]]  # batch -> {"total": ..., other terms}
    validate: Callable[[], dict[str, float]]


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
    groups = [{"params": [p for p in params if id(p) not in exempt], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def accumulation_weights(batches: list[list[int]], grad_accum: int) -> list[float]:
    """Per micro-batch, the weight of its mean loss in its optimizer step: its share of the step's examples.

    Summed over a group this gives the mean loss over all the group's examples, as one large batch would,
    also for the last group of an epoch (fewer micro-batches) and for short micro-batches.
    """
    weights = []
    for start in range(0, len(batches), grad_accum):
        group = batches[start:start + grad_accum]
        examples = sum(len(b) for b in group)
        weights += [len(b) / examples for b in group]
    return weights


def fit(run, stage: Stage) -> dict:
    """Train one stage: validate every epoch, keep the best weights, checkpoint for --resume.

    Returns {"history": one entry per epoch, "curve": [[step, loss], ...], "best_val": ..., "best_step": ...}
    and leaves the best weights in stage.model.
    """
    cfg, metric = run.cfg, run.task.metrics[0]
    run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    latest, best = run.ckpt_dir / f"{stage.name}.latest.safetensors", run.ckpt_dir / f"{stage.name}.best.safetensors"
    if stage.name in run.progress:  # finished before an interruption
        load_checkpoint(best, stage.model)
        return run.progress[stage.name]
    optimizer = torch.optim.AdamW(param_groups(stage.model, stage.params, cfg.weight_decay), lr=stage.lr)
    lengths = stage.dataset.lengths()
    micro_batches = math.ceil(len(lengths) / cfg.batch_size)
    total_steps = stage.epochs * math.ceil(micro_batches / cfg.grad_accum)
    state = {"epoch": 0, "batch": 0, "step": 0, "history": [], "curve": [], "best_val": None, "best_step": None,
             "sums": {}, "count": 0, "seconds": 0.0}
    if cfg.resume and latest.exists():
        state = load_checkpoint(latest, stage.model, optimizer)["state"]
        if best.exists():  # the best checkpoint may be newer than the latest one's record of it
            record = read_record(best)
            state["best_val"], state["best_step"] = record["val"], record["step"]

    def consider(val: dict) -> None:
        """Keep the weights when validation improves (ties keep the earlier, cheaper ones)."""
        if state["best_val"] is None or val[metric] > state["best_val"][metric]:
            state["best_val"], state["best_step"] = val, state["step"]
            save_checkpoint(best, stage.model, {"step": state["step"], "val": val})

    for epoch in range(state["epoch"], stage.epochs):
        batches = length_bucketed_batches(lengths, cfg.batch_size, cfg.seed, epoch)
        weights = accumulation_weights(batches, cfg.grad_accum)
        stage.model.train()
        bar = tqdm(total=len(lengths), initial=sum(map(len, batches[:state["batch"]])), unit="ex", mininterval=2,
                   desc=f"{stage.name} epoch {epoch + 1}/{stage.epochs}")
        started = time.perf_counter()
        todo = batches_on(run.device, stage.dataset, stage.collate, batches[state["batch"]:])
        for i, (indices, batch) in enumerate(todo, start=state["batch"]):
            with run.autocast():
                terms = stage.loss(stage.model, batch)
            (terms["total"] * weights[i]).backward()
            for k, v in terms.items():
                state["sums"][k] = state["sums"].get(k, 0.0) + float(v.detach()) * len(indices)
            state["count"] += len(indices)
            bar.update(len(indices))
            if (i + 1) % cfg.grad_accum and i + 1 < len(batches):
                continue  # accumulate more micro-batches before stepping
            # ---- optimizer step: lr schedule, clip, step, zero ----
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, stage.lr, state["step"], total_steps)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(stage.params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["curve"].append([state["step"], float(terms["total"].detach())])
            state["batch"] = i + 1
            if cfg.eval_every and state["step"] % cfg.eval_every == 0:
                consider(stage.validate())
            if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and i + 1 < len(batches):
                state["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                save_checkpoint(latest, stage.model, {"state": state}, optimizer)
        bar.close()
        # ---- end of epoch: validate, keep the best, record, checkpoint ----
        state["seconds"] += time.perf_counter() - started
        val = stage.validate()
        consider(val)
        state["history"].append({"stage": stage.name, "epoch": epoch + 1, "step": state["step"],
                                 "loss": {k: v / max(1, state["count"]) for k, v in state["sums"].items()},
                                 "val": val, "examples_per_s": state["count"] / max(state["seconds"], 1e-9),
                                 "seconds": state["seconds"]})
        print(f"{stage.name} epoch {epoch + 1}: loss {state['history'][-1]['loss']['total']:.4f}, "
              f"val {metric} {val[metric]:.4f}, {state['history'][-1]['examples_per_s']:.1f} ex/s")
        state.update(epoch=epoch + 1, batch=0, sums={}, count=0, seconds=0.0)
        save_checkpoint(latest, stage.model, {"state": state}, optimizer)
    load_checkpoint(best, stage.model)
    result = {k: state[k] for k in ("history", "curve", "best_val", "best_step")}
    run.finish_stage(stage.name, result)
    return result


def trainable(model, cfg) -> list[torch.nn.Parameter]:
    if cfg.freeze_embeddings:
        model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def token_loss(model, batch) -> dict[str, torch.Tensor]:
    """The model's own loss: task loss plus, with a bottleneck, its weighted commitment loss."""
    out = forward(model, batch)
    return {"total": out.loss, "task": out.task_loss}
