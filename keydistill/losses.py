"""The distillation objective.

    total = alpha * soft + (1 - alpha) * task + feature_weight * feature + hidden_weight * hidden + aux

- soft: ops.kd_loss(student, teacher, T) (T^2-scaled KL) for classification; for regression the teacher's
  score is the soft target, through MSE.
- task: cross-entropy on the labels, or MSE on the scores for regression.
- feature: MSE between the student's and the teacher's sentence features (the encoder output the bottleneck
  reads: the first token for cls pooling, the token mean for mean pooling). This is the student encoder's
  main learning path: the discrete key lookup passes no gradient back to the encoder, so without it the
  encoder would learn only through the commitment loss.
- hidden (--hidden-weight, added by the student stage): MSE between every student layer's output and the
  output of the teacher layer it was copied from, over all real tokens: the whole sentence's representation,
  layer by layer, rather than the one vector the feature loss matches.
- aux: the bottleneck's own weighted commitment loss (pulls encoder outputs toward their assigned keys,
  which start as the carried teacher keys); absent without a bottleneck.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from keydistill import ops


@dataclass(frozen=True)
class DistillationWeights:
    alpha: float  # share of the soft (teacher) loss against the hard-label task loss
    temperature: float  # softmax temperature of the soft loss (classification only)
    feature_weight: float  # weight of the feature loss toward the teacher's sentence features


def sentence_features(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, L, dim] encoder output -> [B, dim]: the first token ("cls") or the mean of real tokens ("mean")."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Agreement with the teacher: T^2 * KL for classes, MSE toward the teacher's score for regression."""
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.float().squeeze(-1), teacher_logits.float().squeeze(-1))
    return ops.kd_loss(student_logits.float(), teacher_logits.float(), temperature=temperature)


def hidden_state_loss(student_layers: list[torch.Tensor], teacher_layers: list[torch.Tensor],
                      attention_mask: torch.Tensor, token_scale: float = 1.0) -> torch.Tensor:
    """MSE between each student layer's output and its teacher layer's ([B, L, dim] each), over real tokens
    only, averaged over layers (TinyBERT's hidden-state loss without its projection: widths are equal).

    A mean over tokens, while the training loop weights micro-batches and ranks by their examples: the loop's
    token_scale (keydistill.train.loop.token_scale) rescales the token count so that the weighted sum is
    the token mean of the whole step (1.0: this batch alone)."""
    mask = attention_mask.unsqueeze(-1).float()
    squared = sum((((s.float() - t.float()) ** 2) * mask).sum() for s, t in zip(student_layers, teacher_layers))
    return squared / (mask.sum() * token_scale * student_layers[0].shape[-1] * len(student_layers))


def distillation_loss(student_out, teacher_logits: torch.Tensor, teacher_features: torch.Tensor,
                      student_features: torch.Tensor, weights: DistillationWeights) -> dict[str, torch.Tensor]:
    """Each term and their weighted "total". student_out is a model output computed with labels
    (it carries .task_loss and, with a bottleneck, .aux_loss)."""
    terms = {
        "soft": soft_loss(student_out.logits, teacher_logits, weights.temperature),
        "task": student_out.task_loss,
        "feature": F.mse_loss(student_features.float(), teacher_features.float()),
    }
    aux = student_out.aux_loss if student_out.aux_loss is not None else torch.zeros(())
    terms["total"] = (weights.alpha * terms["soft"] + (1 - weights.alpha) * terms["task"]
                      + weights.feature_weight * terms["feature"] + aux)
    terms["aux"] = aux
    return terms
