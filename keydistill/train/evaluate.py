"""Evaluation: predictions in dataset order, the task's metrics, and the codebook report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from keydistill.bottleneck import assignment_counts, codebook_usage
from keydistill.data import FileTask, GlueTask, compute_metrics
from keydistill.train.features import forward, gathered, sharded

if TYPE_CHECKING:
    from keydistill.train.context import Run


@dataclass
class Predictions:
    logits: torch.Tensor  # [N, num_labels], dataset order
    key_indices: list[torch.Tensor] | None  # per example [kept positions, H]; None without a bottleneck


@torch.no_grad()
def predict(run: Run, model, dataset, collate) -> Predictions:
    """Logits (and key indices) for every example of dataset, in eval mode, restoring the mode after.
    Data-parallel ranks each predict a share and gather the rest, so every rank holds all predictions."""
    was_training = model.training
    model.eval()
    logits, keys = {}, {}
    for indices, batch in sharded(run, dataset, collate, run.cfg.eval_batch_size):
        with run.autocast():
            out = forward(model, batch, with_labels=False)
        rows = out.positions.sum(1).tolist() if out.key_indices is not None else None
        per_row = out.key_indices.split(rows) if rows is not None else None
        for j, i in enumerate(indices):
            logits[i] = out.logits[j].float()
            if per_row is not None:
                keys[i] = per_row[j]
    model.train(was_training)
    all_logits = gathered(run, logits, len(dataset), "gather predictions")
    all_keys = gathered(run, keys, len(dataset), "gather key indices") if model_has_keys(model) else None
    return Predictions(torch.stack(all_logits), all_keys)


def model_has_keys(model) -> bool:
    return getattr(model, "bottleneck", None) is not None


def score(task: GlueTask | FileTask, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    predictions = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
    return compute_metrics(task, predictions.cpu().numpy(), labels.cpu().numpy())


def fidelity(task: GlueTask | FileTask, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """How closely the student reproduces the teacher's answers: the share of examples where both predict the
    same class, or for regression the Pearson correlation of their scores (what a student/teacher ratio of
    a task metric measures only indirectly, and noisily on small test sets)."""
    if task.is_regression:
        scores = torch.stack([teacher_logits.squeeze(-1), student_logits.squeeze(-1)]).double()
        return float(torch.corrcoef(scores)[0, 1])
    return float((teacher_logits.argmax(-1) == student_logits.argmax(-1)).double().mean())


def evaluator(run: Run, model, dataset, collate) -> Callable[[], dict[str, float]]:
    return lambda: score(run.task, predict(run, model, dataset, collate).logits, dataset.labels)


# ----------------------------------------------------------------------------------------------------------
# The codebook report: usage of each model's keys, and whether student and teacher pick the same ones
# ----------------------------------------------------------------------------------------------------------


def codebook_usage_report(model, pred: Predictions) -> dict | None:
    if pred.key_indices is None:
        return None
    counts = assignment_counts(torch.cat(pred.key_indices), model.bottleneck.config.num_keys)
    test_usage, ema_usage = codebook_usage(counts), model.bottleneck.usage()
    return {
        "test_perplexity": float(test_usage["perplexity"].mean()),
        "test_live_fraction": float(test_usage["live_fraction"].mean()),
        "ema_perplexity": float(ema_usage["perplexity"].mean()),
        "ema_live_fraction": float(ema_usage["live_fraction"].mean()),
        "num_heads": model.bottleneck.config.num_heads,
        "num_keys": model.bottleneck.config.num_keys,
        "key_counts": counts.tolist(),
    }


def key_agreement(teacher_keys: torch.Tensor, student_keys: torch.Tensor, *, match: bool) -> float:
    """Share of (position, head) pairs where the two models pick the same key.

    match=False compares key ids directly: right for carried keys, which are the teacher's. match=True first
    pairs each student key with a teacher key, per head, by the assignment (Hungarian, scipy) that maximises
    co-occurrence: fresh keys are an arbitrary permutation, so raw ids would compare unrelated codebooks.
    """
    if match:
        student_keys = matched_ids(teacher_keys, student_keys)
    return float((teacher_keys == student_keys).float().mean())


def matched_ids(teacher_keys: torch.Tensor, student_keys: torch.Tensor) -> torch.Tensor:
    """student_keys [N, H] renamed to the teacher key each student key co-occurs with most (one to one)."""
    from scipy.optimize import linear_sum_assignment

    n, heads = teacher_keys.shape
    num_keys = int(max(teacher_keys.max(), student_keys.max())) + 1
    renamed = torch.empty_like(student_keys)
    for h in range(heads):
        together = np.zeros((num_keys, num_keys))
        np.add.at(together, (student_keys[:, h].cpu().numpy(), teacher_keys[:, h].cpu().numpy()), 1)
        rows, cols = linear_sum_assignment(together, maximize=True)
        mapping = torch.as_tensor(cols[np.argsort(rows)], device=student_keys.device)
        renamed[:, h] = mapping[student_keys[:, h]]
    return renamed


def codebook_report(teacher, student, teacher_pred: Predictions, student_pred: Predictions, keys: str) -> dict:
    """Usage of both codebooks; key agreement for carried keys, matched agreement for fresh ones."""
    report = {
        "teacher": codebook_usage_report(teacher, teacher_pred),
        "student": codebook_usage_report(student, student_pred),
        "key_agreement": None,
        "key_agreement_kind": "n/a (no student bottleneck)",
    }
    if teacher_pred.key_indices is not None and student_pred.key_indices is not None:
        t, s = torch.cat(teacher_pred.key_indices), torch.cat(student_pred.key_indices)
        fresh = keys == "fresh"
        report["key_agreement"] = key_agreement(t, s, match=fresh)
        report["key_agreement_kind"] = "after matching keys by assignment" if fresh else "same key ids"
    return report
