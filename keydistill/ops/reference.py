"""Plain-PyTorch implementations of the hot-path ops.

These are first-class code, not an afterthought: they are the `torch` backend (the fallback that runs
everywhere) and, evaluated in float64, the oracle every compiled kernel is tested against.
Inputs are assumed validated by `keydistill.ops._checks`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

# The torch fallback of nearest_key materialises one [chunk, H, K] distance block at a time; its extra
# memory is bounded by NEAREST_KEY_CHUNK_BYTES (64 MiB) plus O(N*H) for the outputs, whatever N is.
NEAREST_KEY_CHUNK_BYTES = 64 * 2**20


def nearest_key(x: torch.Tensor, keys: torch.Tensor, *, chunk_bytes: int = NEAREST_KEY_CHUNK_BYTES):
    """Index of the nearest key per (row, head) and its squared distance.

    x: [N, H, d]; keys: [H, K, d]. Returns (index int64 [N, H], sqdist float32 [N, H]); ties go to the
    lowest k. Float64 inputs are computed in float64 (the test oracle); everything else in float32.

    Candidates are ranked with ||k||^2 - 2 x.k (one batched matmul per chunk); the winner's distance is
    then recomputed directly as sum((x - k)^2), so sqdist carries no cancellation error.
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, h, d = x.shape
    k = keys.shape[1]
    keys_c = keys.to(compute)
    index = torch.empty((n, h), dtype=torch.int64, device=x.device)
    sqdist = torch.empty((n, h), dtype=compute, device=x.device)  # float32, or float64 for the oracle
    if n == 0:
        return index, sqdist
    key_sq = keys_c.pow(2).sum(-1)  # [H, K], once per call
    elem = torch.finfo(compute).bits // 8
    chunk = max(1, min(n, chunk_bytes // max(1, h * k * elem)))
    for start in range(0, n, chunk):
        xc = x[start : start + chunk].to(compute).transpose(0, 1)  # [H, c, d]
        # scores[h, c, k] = ||k||^2 - 2 x.k  (||x||^2 is constant per row, so it does not change the argmin)
        scores = torch.baddbmm(key_sq.unsqueeze(1), xc, keys_c.transpose(1, 2), alpha=-2.0)
        idx = scores.argmin(-1)  # first minimum: ties go to the lowest k
        chosen = torch.gather(keys_c, 1, idx.unsqueeze(-1).expand(-1, -1, d))  # [H, c, d]
        index[start : start + chunk] = idx.transpose(0, 1)
        sqdist[start : start + chunk] = (xc - chosen).pow(2).sum(-1).transpose(0, 1).to(sqdist.dtype)
    return index, sqdist


def nearest_key_exact(x: torch.Tensor, keys: torch.Tensor):
    """All-pairs float64 distances by direct differences: the test oracle for nearest_key.

    Returns the full [N, H, K] float64 distance tensor; use only at test shapes.
    """
    diff = x.double().unsqueeze(2) - keys.double().unsqueeze(0)  # [N, H, K, d]
    return diff.pow(2).sum(-1)


def cluster_stats(x: torch.Tensor, index: torch.Tensor, num_keys: int):
    """Per-key counts [H, K] and sums [H, K, d] of the rows assigned to each key (float32, or float64 for float64 x).

    One flattened index_add_ for each: head h, key k lives at h*K + k.
    """
    n, h, d = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = (index + torch.arange(h, device=x.device) * num_keys).reshape(-1)
    counts = torch.zeros(h * num_keys, dtype=acc, device=x.device)
    counts.index_add_(0, flat, torch.ones(flat.numel(), dtype=acc, device=x.device))
    sums = torch.zeros(h * num_keys, d, dtype=acc, device=x.device)
    sums.index_add_(0, flat, x.reshape(-1, d).to(acc))
    return counts.view(h, num_keys), sums.view(h, num_keys, d)


def ema_update_(keys, cluster_size, embed_sum, x, index, *, decay: float, eps: float = 1e-5) -> None:
    """VQ-VAE EMA codebook update with Laplace smoothing, in place on (keys, cluster_size, embed_sum).

    cluster_size <- decay*cluster_size + (1-decay)*counts;  embed_sum <- decay*embed_sum + (1-decay)*sums;
    keys <- embed_sum / ((cluster_size + eps) / (n_h + K*eps) * n_h), with n_h = sum_k cluster_size[h, k].
    Means, not sums: a key is the smoothed average of the vectors assigned to it.
    """
    counts, sums = cluster_stats(x, index, keys.shape[1])
    ema_apply_(keys, cluster_size, embed_sum, counts, sums, decay=decay, eps=eps)


def ema_apply_(keys, cluster_size, embed_sum, counts, sums, *, decay: float, eps: float = 1e-5) -> None:
    """The EMA step of ema_update_ from given per-key counts [H, K] and sums [H, K, d] (e.g. summed across
    data-parallel ranks), in place."""
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1 - decay)
    embed_sum.mul_(decay).add_(sums.to(embed_sum.dtype), alpha=1 - decay)
    keys.copy_(embed_sum / smoothed_cluster_size(cluster_size, eps).unsqueeze(-1))


def smoothed_cluster_size(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """Laplace smoothing: (c + eps) / (n + K*eps) * n per head, so no key ever divides by zero."""
    n = cluster_size.sum(-1, keepdim=True)
    return (cluster_size + eps) / (n + cluster_size.shape[-1] * eps) * n


def kd_loss_rows(student_logits, teacher_logits, temperature: float, mask=None):
    """Per-row T^2 * KL(softmax(t/T) || softmax(s/T)), computed in float32 (float64 for float64 input).

    Follows the non-finite semantics of keydistill.ops.kd_loss: rows masked out (mask[n] false) and teacher
    rows that are all -inf give 0 and a zero gradient; entries of teacher probability 0 contribute 0; a
    student -inf under teacher mass gives +inf; NaN or +inf in a row, or a student row all -inf, give NaN.
    """
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    a = student_logits.to(compute) / temperature
    b = teacher_logits.to(compute) / temperature
    zero = torch.zeros((), dtype=compute, device=a.device)
    # Excluded rows are zeroed before any maths, so nothing in them (NaN, inf) reaches the loss or, through
    # autograd's 0 * NaN, the gradient.
    excluded = (b == float("-inf")).all(-1)  # no teacher distribution to match
    if mask is not None:
        excluded = excluded | ~mask
    a = torch.where(excluded.unsqueeze(-1), zero, a)
    b = torch.where(excluded.unsqueeze(-1), zero, b)
    log_p_s = torch.log_softmax(a, dim=-1)
    log_p_t = torch.log_softmax(b, dim=-1)
    p_t = log_p_t.exp()
    # Entries where p_t is exactly 0 contribute 0 (the limit of p log p), also against a student -inf where
    # 0 * inf would be NaN. A NaN p_t (NaN or +inf logits) is not 0 and stays NaN.
    kl = torch.where(p_t == 0, zero, p_t * (log_p_t - log_p_s)).sum(-1)
    return torch.where(excluded, zero, kl) * temperature**2


def reduce_rows(rows: torch.Tensor, mask, reduction: str):
    """Apply a kd_loss reduction to per-row losses; masked-out rows count for nothing."""
    if mask is not None:
        rows = torch.where(mask, rows, rows.new_zeros(()))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if mask is None:  # a host number: no tensor to copy to the device on every call
        return total / max(rows.shape[0], 1)
    return total / mask.sum().clamp_min(1).to(total.dtype)


def kd_loss(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None, reduction: str = "batchmean"):
    """Temperature-scaled distillation loss; differentiable w.r.t. student_logits only."""
    rows = kd_loss_rows(student_logits, teacher_logits.detach(), temperature, mask)
    return reduce_rows(rows, mask, reduction)


# ---- kd_loss_linear: vocabulary-level distillation without the full [N, V] student logits ----------------


def kd_loss_linear_chunk_rows(n_rows: int, vocab: int, hidden: int) -> int:
    """Default rows per chunk: a chunk of logits holds about as many elements as the hidden states [N, h]
    (Liger-Kernel's fused-linear-cross-entropy rule), rounded up to a power of two."""
    chunks = max(1, -(-vocab // max(hidden, 1)))
    rows = max(1, -(-n_rows // chunks))
    return 1 << (rows - 1).bit_length()


def kd_loss_linear(
    student_hidden,
    student_weight,
    teacher_logits=None,
    *,
    temperature: float = 1.0,
    student_bias=None,
    teacher_hidden=None,
    teacher_weight=None,
    teacher_bias=None,
    mask=None,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
    kd_rows=kd_loss_rows,
):
    """kd_loss(student_hidden @ student_weight.T + student_bias, teacher logits), computed chunk by chunk.

    The teacher is teacher_logits [N, V], or teacher_hidden @ teacher_weight.T + teacher_bias (also chunked).
    kd_rows(student_chunk, teacher_chunk, temperature, mask_chunk) -> [c] per-row losses, differentiable
    w.r.t. the student chunk: reference maths here, or any backend's kd_loss_rows.
    """
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach()  # the teacher is a constant

        def teacher(rows):
            return teacher_logits[rows]
    else:
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
        teacher_bias = teacher_bias.detach() if teacher_bias is not None else None

        def teacher(rows):
            return torch.nn.functional.linear(teacher_hidden[rows], teacher_weight, teacher_bias)

    n, h = student_hidden.shape
    chunk = chunk_size or kd_loss_linear_chunk_rows(n, student_weight.shape[0], h)
    spec = _LinearKDSpec(teacher, float(temperature), mask, reduction, chunk, kd_rows)
    return _ChunkedLinearKD.apply(student_hidden, student_weight, student_bias, spec)


class _LinearKDSpec(NamedTuple):
    teacher: Callable[[slice], torch.Tensor]  # rows -> teacher logits of those rows
    temperature: float
    mask: torch.Tensor | None
    reduction: str
    chunk: int  # rows per chunk
    kd_rows: Callable  # (student chunk, teacher chunk, temperature, mask chunk) -> [c] losses


class _ChunkedLinearKD(torch.autograd.Function):
    """Liger's fused-linear pattern: the gradients are computed in the forward pass, chunk by chunk, while
    each logits chunk is at hand; backward only scales them by the scalar upstream gradient.
    reduction="none" has a per-row upstream gradient, which the weight gradient cannot absorb after the
    fact, so there the forward computes losses only and backward sweeps the chunks again."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, spec: _LinearKDSpec):
        ctx.spec, ctx.used = spec, False
        if spec.reduction == "none":
            rows, _ = _sweep(hidden, weight, bias, spec, row_scale=None)
            ctx.save_for_backward(hidden, weight, bias)
            return reduce_rows(rows, spec.mask, spec.reduction)
        row_scale = _row_scale(hidden, spec) if any(ctx.needs_input_grad[:3]) else None
        rows, grads = _sweep(hidden, weight, bias, spec, row_scale)
        ctx.save_for_backward(*grads)
        return reduce_rows(rows, spec.mask, spec.reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.spec.reduction == "none":
            hidden, weight, bias = ctx.saved_tensors
            _, grads = _sweep(hidden, weight, bias, ctx.spec, row_scale=grad_out.float())
            return (*grads, None)
        if ctx.used:  # the saved gradients were scaled in place by the first backward
            raise RuntimeError(
                "kd_loss_linear: backward through the same graph twice is not supported; recompute the loss"
            )
        ctx.used = True
        grads = tuple(g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in ctx.saved_tensors)
        return (*grads, None)


def _row_scale(hidden, spec) -> torch.Tensor:
    """[N] float32: d loss / d row loss for "sum" and "batchmean"; a masked count stays on the device (reading
    it on the host would wait for the GPU at every call)."""
    ones = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    if spec.reduction == "sum":
        return ones
    if spec.mask is None:
        return ones.div_(max(hidden.shape[0], 1))
    return ones.div_(spec.mask.sum().clamp_min(1))


def _sweep(hidden, weight, bias, spec, row_scale):
    """Per-row losses [N] and, when row_scale [N] is given, the gradients of sum(row_scale * losses) w.r.t.
    (hidden, weight, bias). Memory beyond the outputs: one [chunk, V] logits block and its gradient.
    The weight gradient accumulates in the weight's dtype (as Liger does), the bias gradient in fp32."""
    teacher, temperature, mask, _, chunk, kd_rows = spec
    n = hidden.shape[0]
    rows = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    grads = (None, None, None)
    if row_scale is not None:
        if mask is not None:
            row_scale = torch.where(mask, row_scale, row_scale.new_zeros(()))
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        grad_weight = torch.zeros_like(weight)
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None
        )
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        logits = torch.nn.functional.linear(hidden[part], weight, bias)
        mask_part = mask[part] if mask is not None else None
        if row_scale is None:
            rows[part] = kd_rows(logits, teacher(part), temperature, mask_part)
            continue
        logits.requires_grad_(True)
        with torch.enable_grad():
            losses = kd_rows(logits, teacher(part), temperature, mask_part)
        rows[part] = losses.detach()
        (grad_logits,) = torch.autograd.grad(losses, logits, grad_outputs=row_scale[part])
        del logits, losses  # free the logits chunk (and any graph) before the matmuls
        torch.mm(grad_logits, weight, out=grad_hidden[part])
        grad_weight.addmm_(grad_logits.t(), hidden[part])
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0, dtype=torch.float32)
    if row_scale is not None:
        grads = (grad_hidden, grad_weight, grad_bias.to(bias.dtype) if grad_bias is not None else None)
    return rows, grads


# ---- sparse_adamw_: AdamW on the rows a row-sparse gradient touches ----------------------------------------


def sparse_adamw_(
    param,
    exp_avg,
    exp_avg_sq,
    rows,
    grad,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    maximize: bool = False,
) -> None:
    """torch.optim.AdamW's update (single-tensor form, term by term) of the rows `rows` of param, exp_avg and
    exp_avg_sq [R, D], from grad [U, D], the gradient of those rows; all other rows stay as they are.
    rows: int64 [U], strictly increasing. step: the step count the bias correction uses (>= 1)."""
    g = -grad if maximize else grad
    p, m, v = param.index_select(0, rows), exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    param.index_copy_(0, rows, p)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
