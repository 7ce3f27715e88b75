"""The hot-path ops of the key bottleneck, each with a `backend` switch.

- nearest_key(x, keys) -> (index, sqdist): per-head nearest codebook key.
- ema_update_(keys, cluster_size, embed_sum, x, index, decay=..., eps=...): EMA codebook update, in place.
- kd_loss(student_logits, teacher_logits, temperature=..., mask=..., reduction=...): T^2 * KL distillation.
- kd_loss_linear(student_hidden, student_weight, teacher_logits, ...): kd_loss of a linear head's logits,
  chunked so the full [N, V] student logits never exist (vocabulary-level distillation).
- sparse_adamw_(param, exp_avg, exp_avg_sq, rows, grad, lr=..., ...): AdamW on the rows a row-sparse
  gradient touches, in place (the value table's optimizer step; keydistill.optim).

backend is "auto" (fastest available for the tensors' device), "cuda", "triton", "cpp" or "torch".
Each op is check -> resolve -> call: all validation happens here, once, before any backend runs, and every
backend module answers the same call (keydistill.ops._backends.Backend; which lacks what: _backends.LACKS).
"""

from __future__ import annotations

import torch

from keydistill.ops import _checks, reference
from keydistill.ops._backends import BackendUnavailable, backends, implementation, resolve

__all__ = [
    "nearest_key",
    "ema_update_",
    "kd_loss",
    "kd_loss_linear",
    "sparse_adamw_",
    "backends",
    "BackendUnavailable",
    "reference",
]


def nearest_key(x: torch.Tensor, keys: torch.Tensor, *, backend: str = "auto"):
    """For x [N, H, d] and keys [H, K, d]: (index int64 [N, H], sqdist float32 [N, H]).

    index[n, h] minimises ||x[n, h] - keys[h, k]||^2 over k (ties to the lowest k); sqdist is that distance,
    accumulated in float32. No backend materialises all N x K distances at once (the torch fallback works
    in chunks of at most reference.NEAREST_KEY_CHUNK_BYTES); also under autocast, which would run the torch
    fallback's distance matmul in bfloat16 and flip close choices.
    """
    _checks.check_nearest_key(x, keys)
    impl = implementation(resolve("nearest_key", backend, x.device))
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # a discrete choice: no gradient
        return impl.nearest_key(x, keys)


def ema_update_(
    keys,
    cluster_size,
    embed_sum,
    x,
    index,
    *,
    decay: float,
    eps: float = 1e-5,
    deterministic: bool | None = None,
    backend: str = "auto",
) -> None:
    """EMA update of a codebook from the rows x [N, H, d] assigned to keys by index [N, H], in place.

    State (keys [H, K, d], cluster_size [H, K], embed_sum [H, K, d]) is float32. Counts and sums are exact.
    deterministic=None follows torch.are_deterministic_algorithms_enabled(); True forces a fixed
    summation order on backends that otherwise accumulate with atomics. An index outside [0, K) raises
    ValueError on the CPU; on a GPU it fails a device-side assertion (checking on the host would wait for the
    GPU at every step), which, as any CUDA error, leaves the process unable to use the GPU again.
    """
    _checks.check_ema_update(keys, cluster_size, embed_sum, x, index, decay, eps)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    impl = implementation(resolve("ema_update_", backend, keys.device))
    with torch.no_grad():  # keys follow the data, never gradients
        impl.ema_update_(keys, cluster_size, embed_sum, x, index, float(decay), float(eps), bool(deterministic))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    backend: str = "auto",
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) per row, reduced.

    reduction: "batchmean" (sum over included rows / their number), "sum", or "none" ([N], 0 for
    masked-out rows). Differentiable w.r.t. student_logits only; the teacher is a constant.

    Non-finite logits, the same on every backend (cuda, triton, cpp, torch) and in kd_loss_linear. With
    p = softmax(logits / T), per included row:
    - a logit of -inf is probability 0 (padded or masked classes). Where the teacher's probability is 0 the
      entry contributes 0 to the loss (never 0 * inf), and its gradient is T * p_s (0 if the student is -inf
      there too);
    - a student -inf where the teacher has probability > 0 gives a loss of +inf (as F.kl_div does); the
      gradient stays the finite T * (p_s - p_t);
    - a teacher row that is all -inf has no distribution to match: loss 0 and gradient 0, as if masked out
      (it still counts in batchmean's denominator; pass mask to leave it out);
    - NaN or +inf anywhere in a row (student or teacher), or a student row that is all -inf (with a teacher
      that is not), makes that row's loss and its whole gradient row NaN, as in F.kl_div.
    Masked-out rows count for nothing: whatever they hold, their loss and gradient are 0.
    """
    _checks.check_kd_loss(student_logits, teacher_logits, temperature, mask, reduction)
    impl = implementation(resolve("kd_loss", backend, student_logits.device))
    return impl.kd_loss(student_logits, teacher_logits, float(temperature), mask, reduction)


def kd_loss_linear(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """kd_loss(student_hidden @ student_weight.T + student_bias, teacher logits) without the [N, V] logits.

    student_hidden [N, h], student_weight [V, h], student_bias [V] (one dtype). The teacher is
    teacher_logits [N, V], or teacher_hidden [N, h_t] @ teacher_weight.T [V, h_t] + teacher_bias, computed
    chunk by chunk as well. Rows are processed chunk_size at a time (default: chunks of logits about as big
    as student_hidden); each chunk's loss and logit gradient come from `backend`'s kd_loss kernel, and the
    gradients w.r.t. student_hidden, student_weight and student_bias are accumulated during the forward
    pass (Liger-Kernel's fused linear cross-entropy pattern). Differentiable w.r.t. the student only.

    Peak extra memory, for chunk rows c and element size e (weight gradient kept in the weight's dtype):
        fused   ~ 2*c*V*e (logits chunk + its gradient) + (N*h + V*h + V)*e (the gradients)
        unfused ~ 2*N*V*e (logits + their gradient)      + (N*h + V*h + V)*e
    At N=8192, h=768, V=30522, fp32 (c=256): fused ~ 0.18 GB against unfused ~ 2.1 GB (about 9%).
    Under autocast the linear heads run in its dtype, as torch.nn.functional.linear would (the inputs are
    cast, differentiably, so float32 parameters get float32 gradients).
    """
    device_type = student_hidden.device.type
    if torch.is_autocast_enabled(device_type):
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = _autocast_dtype(
            device_type, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias
        )
    _checks.check_kd_loss_linear(
        student_hidden,
        student_weight,
        student_bias,
        teacher_logits,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        temperature,
        mask,
        reduction,
        chunk_size,
    )
    kd_rows = implementation(resolve("kd_loss_linear", backend, student_hidden.device)).kd_loss_rows
    with torch.autocast(device_type, enabled=False):  # the chunks' matmuls write into buffers of the inputs' dtype
        return reference.kd_loss_linear(
            student_hidden,
            student_weight,
            teacher_logits,
            temperature=float(temperature),
            student_bias=student_bias,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            mask=mask,
            reduction=reduction,
            chunk_size=chunk_size,
            kd_rows=kd_rows,
        )


def _autocast_dtype(device_type: str, *tensors):
    """The floating-point tensors (None kept) in autocast's dtype for device_type."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def sparse_adamw_(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    rows: torch.Tensor,
    grad: torch.Tensor,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    step: float,
    maximize: bool = False,
    backend: str = "auto",
) -> None:
    """AdamW on the rows `rows` of param, exp_avg and exp_avg_sq [R, D], in place; all other rows untouched.

    rows: int64 [U], strictly increasing (a coalesced row-sparse gradient's indices); grad: [U, D], those rows'
    gradient, in param's dtype. step: the step count for the bias correction (>= 1). Per row the arithmetic is
    torch.optim.AdamW's (decoupled weight decay, moments, bias correction), so on rows that get a gradient
    every step the result is dense AdamW's. Backends: "cpp" (one fused pass per row) and "torch" (any device).
    """
    _checks.check_sparse_adamw(param, exp_avg, exp_avg_sq, rows, grad, lr, beta1, beta2, eps, weight_decay, step)
    impl = implementation(resolve("sparse_adamw_", backend, param.device))
    scalars = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), float(step), bool(maximize))
    with torch.no_grad():
        impl.sparse_adamw_(param, exp_avg, exp_avg_sq, rows, grad, *scalars)
