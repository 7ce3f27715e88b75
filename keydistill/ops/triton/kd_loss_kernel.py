"""Fused temperature-scaled KL distillation loss and its gradient, one Triton program per block of rows.

Per row (s = student/T, t = teacher/T):
    loss = T^2 * sum_v p_t (log p_t - log p_s),      grad_student = T * (p_s - p_t)
Sweep 1 streams V in chunks keeping an online max and sum of exponentials for student and teacher
together (so both log-sum-exps come from one read of each). Sweep 2 re-reads the row (from L2 on a GPU:
a 32k-vocabulary bf16 row pair is 128 KiB) and produces the loss terms and the gradient together. Both
sweeps are fp32 maths whatever the input dtype; the only [N, V] buffer is the gradient.

Non-finite logits follow the semantics of keydistill.ops.kd_loss: maxima start at -FLT_MAX (a -inf logit adds
exp(-inf) = 0, never exp(-inf - -inf)); a teacher row that is all -inf (sum 0) is treated like a masked-out
row; terms of teacher probability 0 are 0 (never 0 * inf); NaN and +inf reach the sums and make the row NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from keydistill.ops._fused_grad import scale_fused_gradient
from keydistill.ops.reference import reduce_rows
from keydistill.ops.triton._device import device_of

# Elements of one row chunk per program: 4096 gives long coalesced reads at 64-80 registers on 8 warps.
MAX_BLOCK_V = 4096
# Short rows are packed several to a program, up to this many elements: ptxas for sm_90 reports <= 150
# registers and no spills at 2048 (4096 packed elements need ~205).
MAX_PACKED = 2048


@triton.jit
def _kd_loss_kernel(
    student_ptr,
    teacher_ptr,
    mask_ptr,
    loss_ptr,
    grad_ptr,
    n_rows,
    n_cols,
    stride_s,
    stride_t,
    stride_g,
    inv_temperature,
    temperature,
    grad_factor,
    HAS_MASK: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_in = rows < n_rows
    if HAS_MASK:
        row_on = row_in & (tl.load(mask_ptr + rows, mask=row_in, other=0) != 0)
    else:
        row_on = row_in
    rows64 = rows.to(tl.int64)  # row * stride overflows int32 beyond 2^31 elements
    cols = tl.arange(0, BLOCK_V)
    s_row = student_ptr + rows64[:, None] * stride_s
    t_row = teacher_ptr + rows64[:, None] * stride_t

    # Sweep 1: online max and sum of exp for student and teacher. Masked-out rows read nothing; the
    # running maxima start at -FLT_MAX, not -inf, so such rows keep finite maths (no exp(-inf - -inf)).
    max_s = tl.full((ROWS,), -3.4028234663852886e38, tl.float32)
    max_t = tl.full((ROWS,), -3.4028234663852886e38, tl.float32)
    sum_s = tl.zeros((ROWS,), tl.float32)
    sum_t = tl.zeros((ROWS,), tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        m = row_on[:, None] & (c < n_cols)[None, :]
        s = tl.load(s_row + c[None, :], mask=m, other=float("-inf")).to(tl.float32) * inv_temperature
        t = tl.load(t_row + c[None, :], mask=m, other=float("-inf")).to(tl.float32) * inv_temperature
        new_s = tl.maximum(max_s, tl.max(s, 1))
        new_t = tl.maximum(max_t, tl.max(t, 1))
        sum_s = sum_s * tl.exp(max_s - new_s) + tl.sum(tl.exp(s - new_s[:, None]), 1)
        sum_t = sum_t * tl.exp(max_t - new_t) + tl.sum(tl.exp(t - new_t[:, None]), 1)
        max_s = new_s
        max_t = new_t
    # A teacher row that is all -inf (sum 0; a NaN sum is not 0) has no distribution: loss 0, gradient 0.
    row_on = row_on & (sum_t != 0)
    # log p = (x - max) - log(sum), never x - (max + log(sum)): at |x| ~ 1e4 the rounded log-sum-exp would
    # be off by an ulp of 1e4 (~1e-3), i.e. a 0.1% error in every probability. Off rows (sums 0) get
    # max 0 and log-sum 0, which keeps sweep 2 finite.
    max_s = tl.where(row_on, max_s, 0.0)
    max_t = tl.where(row_on, max_t, 0.0)
    log_sum_s = tl.log(tl.where(row_on, sum_s, 1.0))
    log_sum_t = tl.log(tl.where(row_on, sum_t, 1.0))

    # Sweep 2: loss terms p_t (log p_t - log p_s) (0 where p_t is 0, the limit of p log p, also against a
    # student -inf; a NaN p_t passes) and the gradient T (p_s - p_t).
    kl = tl.zeros((ROWS,), tl.float32)
    g_row = grad_ptr + rows64[:, None] * stride_g
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        m = row_on[:, None] & (c < n_cols)[None, :]
        s = tl.load(s_row + c[None, :], mask=m, other=0.0).to(tl.float32) * inv_temperature
        t = tl.load(t_row + c[None, :], mask=m, other=0.0).to(tl.float32) * inv_temperature
        log_p_s = (s - max_s[:, None]) - log_sum_s[:, None]
        log_p_t = (t - max_t[:, None]) - log_sum_t[:, None]
        p_t = tl.exp(log_p_t)
        kl += tl.sum(tl.where(m & (p_t != 0), p_t * (log_p_t - log_p_s), 0.0), 1)
        if COMPUTE_GRAD:
            g = tl.where(m, grad_factor * (tl.exp(log_p_s) - p_t), 0.0)
            tl.store(g_row + c[None, :], g.to(grad_ptr.dtype.element_ty), mask=row_in[:, None] & (c < n_cols)[None, :])
    tl.store(loss_ptr + rows, tl.where(row_on, kl * (temperature * temperature), 0.0), mask=row_in)


@triton.jit
def _scale_unless_one_kernel(grad_ptr, factor_ptr, n_elements, BLOCK: tl.constexpr):
    factor = tl.load(factor_ptr)
    if factor != 1.0:  # read on the device: loss.backward()'s gradient of 1 costs a launch, not a pass
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n_elements
        g = tl.load(grad_ptr + offs, mask=m).to(tl.float32)
        tl.store(grad_ptr + offs, (g * factor).to(grad_ptr.dtype.element_ty), mask=m)


SCALE_BLOCK = 4096


def scale_unless_one_(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """grad (contiguous) *= factor (a 0-dim tensor) in place, skipping the pass when factor is 1; tracers get
    the out-of-place product."""
    if type(grad) is not torch.Tensor:
        return grad * factor
    if grad.device.type == "cpu":  # the interpreter: a host read is free
        return grad if float(factor) == 1.0 else grad.mul_(factor)
    if grad.numel():
        with device_of(grad):
            _scale_unless_one_kernel[(triton.cdiv(grad.numel(), SCALE_BLOCK),)](
                grad, factor.float().reshape(1), grad.numel(), BLOCK=SCALE_BLOCK, num_warps=8
            )
    return grad


def _launch_shape(n_cols: int):
    """(rows per program, chunk width, warps): short rows are packed several to a program."""
    block_v = min(MAX_BLOCK_V, max(16, triton.next_power_of_2(n_cols)))  # >= 16: no degenerate layouts
    rows = max(1, min(16, MAX_PACKED // block_v))
    num_warps = 8 if block_v * rows >= 2048 else 4
    return rows, block_v, num_warps


def kd_loss_fwd(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask, compute_grad: bool, grad_scale: float = 1.0
):
    """(loss rows float32 [N], gradient w.r.t. student times grad_scale, in student's dtype [N, V], or None)."""
    n, v = student.shape
    if student.stride(1) != 1:  # the kernel streams along V: it needs unit column stride
        student = student.contiguous()
    if teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    loss = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, v), dtype=student.dtype, device=student.device) if compute_grad else None
    if n == 0:
        return loss, grad
    rows, block_v, num_warps = _launch_shape(v)
    with device_of(student):
        _kd_loss_kernel[(triton.cdiv(n, rows),)](
            student,
            teacher,
            mask if mask is not None else loss,
            loss,
            grad if compute_grad else loss,
            n,
            v,
            student.stride(0),
            teacher.stride(0),
            grad.stride(0) if compute_grad else 0,
            1.0 / temperature,
            temperature,
            grad_scale * temperature,
            HAS_MASK=mask is not None,
            COMPUTE_GRAD=compute_grad,
            ROWS=rows,
            BLOCK_V=block_v,
            num_warps=num_warps,
        )
    return loss, grad


class KDLossRows(torch.autograd.Function):
    """Per-row losses whose gradient was computed by the forward kernel; backward only scales it."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, mask):
        loss, grad = kd_loss_fwd(student, teacher, temperature, mask, student.requires_grad)
        ctx.save_for_backward(grad)
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        if ctx.used:  # the saved gradient was scaled in place by the first backward
            raise RuntimeError(
                "kd_loss (triton): backward through the same graph twice is not supported; recompute the loss"
            )
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return scale_fused_gradient(grad, grad_rows), None, None, None


class KDLoss(torch.autograd.Function):
    """The loss reduced by "sum" or "batchmean". batchmean's 1/N is folded into the kernel's gradient (without
    a mask: N is known on the host), so backward scales only by the incoming gradient, on the device and not
    at all when that is 1."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, mask, reduction):
        fold = reduction == "batchmean" and mask is None
        grad_scale = 1.0 / max(student.shape[0], 1) if fold else 1.0
        loss, grad = kd_loss_fwd(student, teacher, temperature, _as_bytes(mask), True, grad_scale)
        ctx.save_for_backward(grad, mask if reduction == "batchmean" else None)
        ctx.used = False
        return reduce_rows(loss, mask, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:  # the saved gradient was scaled in place by the first backward
            raise RuntimeError(
                "kd_loss (triton): backward through the same graph twice is not supported; recompute the loss"
            )
        ctx.used = True
        grad, mask = ctx.saved_tensors
        factor = grad_out if mask is None else grad_out / mask.sum().clamp_min(1)
        return scale_unless_one_(grad, factor), None, None, None, None


def _as_bytes(mask):
    """One byte per row, read as uint8 (bool pointers are not portable across Triton versions)."""
    return None if mask is None else mask.contiguous().view(torch.uint8)


def kd_loss_rows(student, teacher, temperature, mask):
    if student.requires_grad and torch.is_grad_enabled():
        return KDLossRows.apply(student, teacher, temperature, _as_bytes(mask))
    return kd_loss_fwd(student, teacher, temperature, _as_bytes(mask), False)[0]


def kd_loss(student, teacher, temperature, mask, reduction):
    teacher = teacher.detach()  # the teacher is a constant
    if reduction == "none" or not (student.requires_grad and torch.is_grad_enabled()):
        return reduce_rows(kd_loss_rows(student, teacher, temperature, mask), mask, reduction)
    return KDLoss.apply(student, teacher, temperature, mask, reduction)
