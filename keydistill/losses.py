"""The distillation objective.

    total = alpha * soft + (1 - alpha) * task + feature_weight * feature + hidden_weight * hidden
            + attention_weight * attention + value_relation_weight * value_relation + aux

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
- attention, value_relation (--attention-weight, --value-relation-weight, added by the student stage):
  MiniLM's self-attention transfer, per layer, head and real token: the KL from the teacher layer's attention
  distribution to the student layer's (how each token reads the others, which the copied layers no longer
  see from their new inputs), and the same for the value relation softmax(V V^T / sqrt(d)).
- aux: the bottleneck's own weighted commitment loss (pulls encoder outputs toward their assigned keys,
  which start as the carried teacher keys); absent without a bottleneck.
"""

from __future__ import annotations

import math
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


def hidden_state_loss(
    student_layers: list[torch.Tensor],
    teacher_layers: list[torch.Tensor],
    attention_mask: torch.Tensor,
    token_scale: float = 1.0,
) -> torch.Tensor:
    """MSE between each student layer's output and its teacher layer's ([B, L, dim] each), over real tokens
    only, averaged over layers (TinyBERT's hidden-state loss without its projection: widths are equal).

    A mean over tokens, while the training loop weights micro-batches and ranks by their examples: the loop's
    token_scale (keydistill.train.loop.token_scale) rescales the token count so that the weighted sum is
    the token mean of the whole step (1.0: this batch alone)."""
    mask = attention_mask.unsqueeze(-1).float()
    squared = sum((((s.float() - t.float()) ** 2) * mask).sum() for s, t in zip(student_layers, teacher_layers))
    return squared / (mask.sum() * token_scale * student_layers[0].shape[-1] * len(student_layers))


def relation_log_probs(left: torch.Tensor, right: torch.Tensor, keep: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, heads, L, L]: per head, the log of softmax(left right^T / sqrt(d)) over the real tokens, from two
    [B, L, dim] projections of one layer: (query, key) gives its attention distributions, (value, value)
    MiniLM's value relation. In float32."""
    b, length, dim = left.shape
    a, c = (x.float().view(b, length, num_heads, dim // num_heads).transpose(1, 2) for x in (left, right))
    scores = a @ c.transpose(-1, -2) / math.sqrt(dim // num_heads)
    # A finite floor, not -inf: masked tokens then get probability 0 and a finite log, so p * (log p - log q)
    # is 0 there, not nan.
    scores = scores.masked_fill(~keep[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


def relation_loss(
    student_layers: list[tuple[torch.Tensor, torch.Tensor]],
    teacher_layers: list[tuple[torch.Tensor, torch.Tensor]],
    attention_mask: torch.Tensor,
    num_heads: int,
    token_scale: float = 1.0,
) -> torch.Tensor:
    """MiniLM's self-attention transfer, for one kind of relation: per layer, head and real token,
    KL(teacher || student) between the distributions over the real tokens that each layer's pair of
    projections gives (relation_log_probs), averaged over layers, heads and tokens. Student and teacher layers
    must have num_heads heads of one width. A mean over tokens, rescaled by token_scale as hidden_state_loss is."""
    keep = attention_mask.bool()
    total = 0.0
    for (s_left, s_right), (t_left, t_right) in zip(student_layers, teacher_layers):
        student = relation_log_probs(s_left, s_right, keep, num_heads)
        teacher = relation_log_probs(t_left, t_right, keep, num_heads)
        kl = (teacher.exp() * (teacher - student)).sum(-1)  # [B, heads, L]
        total = total + (kl * keep[:, None, :]).sum()
    return total / (keep.sum() * token_scale * num_heads * len(student_layers))


def distillation_loss(
    student_out,
    teacher_logits: torch.Tensor,
    teacher_features: torch.Tensor,
    student_features: torch.Tensor,
    weights: DistillationWeights,
) -> dict[str, torch.Tensor]:
    """Each term and their weighted "total". student_out is a model output computed with labels
    (it carries .task_loss and, with a bottleneck, .aux_loss)."""
    terms = {
        "soft": soft_loss(student_out.logits, teacher_logits, weights.temperature),
        "task": student_out.task_loss,
        "feature": F.mse_loss(student_features.float(), teacher_features.float()),
    }
    # Without a bottleneck the aux term is a zero on the logits' device: the loop stacks every term.
    aux = student_out.aux_loss
    if aux is None:
        aux = student_out.logits.new_zeros((), dtype=torch.float32)
    terms["total"] = (
        weights.alpha * terms["soft"]
        + (1 - weights.alpha) * terms["task"]
        + weights.feature_weight * terms["feature"]
        + aux
    )
    terms["aux"] = aux
    return terms
