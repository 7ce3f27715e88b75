"""The compiled operator library keydistill._C, made composable from Python.

Importing this module loads _C (whose static initialisers register the schemas and the CPU/CUDA kernels),
then registers fake (meta) kernels and autograd so the ops work under torch.compile and pass
torch.library.opcheck. It is the module of the cpp and cuda backends (keydistill.ops._backends.Backend); the
dispatcher picks the CPU or CUDA kernel from the tensors' device.
"""

from __future__ import annotations

import torch

from keydistill import _C  # noqa: F401  (registers torch.ops.keydistill.*)
from keydistill.ops._fused_grad import scale_fused_gradient

OPS = ("nearest_key", "ema_update_", "kd_loss_fwd")  # the per-device kernels (kd_loss is composite over kd_loss_fwd)
CPU_ONLY_OPS = ("sparse_adamw_",)  # CPU kernels only: on CUDA the torch backend runs them


def has_kernel(op: str, dispatch_key: str) -> bool:
    """False also for an op this _C does not declare (a build older than the Python code: rebuild)."""
    return hasattr(torch.ops.keydistill, op) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"keydistill::{op}", dispatch_key
    )


def has_cpu_kernels() -> bool:
    """True when _C registered a CPU kernel for every op."""
    return all(has_kernel(op, "CPU") for op in OPS + CPU_ONLY_OPS)


def has_cuda_kernels() -> bool:
    """True when _C was built with CUDA kernels for every op."""
    return all(has_kernel(op, "CUDA") for op in OPS)


# ---- fake kernels: output metadata only, for torch.compile / FakeTensor tracing -------------------------
@torch.library.register_fake("keydistill::nearest_key")
def _nearest_key_fake(x, keys):
    n, h = x.shape[0], x.shape[1]
    return x.new_empty((n, h), dtype=torch.int64), x.new_empty((n, h), dtype=torch.float32)


@torch.library.register_fake("keydistill::ema_update_")
def _ema_update_fake(keys, cluster_size, embed_sum, x, index, decay, eps, deterministic):
    return None


@torch.library.register_fake("keydistill::kd_loss_fwd")
def _kd_loss_fwd_fake(student, teacher, temperature, mask, compute_grad, grad_scale=1.0):
    grad_shape = student.shape if compute_grad else (0,)
    return student.new_empty((student.shape[0],), dtype=torch.float32), student.new_empty(grad_shape)


@torch.library.register_fake("keydistill::kd_loss")
def _kd_loss_fake(student, teacher, temperature, mask, reduction):
    shape = (student.shape[0],) if reduction == "none" else ()
    return student.new_empty(shape, dtype=torch.float32)


if hasattr(torch.ops.keydistill, "sparse_adamw_"):  # else an older build: has_cpu_kernels() says rebuild

    @torch.library.register_fake("keydistill::sparse_adamw_")
    def _sparse_adamw_fake(param, exp_avg, exp_avg_sq, rows, grad, lr, beta1, beta2, eps, weight_decay, step, maximize):
        return None


# ---- autograd: the gradient was computed in the forward pass; backward only scales it per row -----------
# (keydistill/ops/_fused_grad.py says why in place). No zero gradient is materialised for the second output
# (it is not differentiable), and no reference to it is kept beyond the saved one, so autograd can hand the
# scaled buffer to student.grad without a copy. A second backward through the same graph
# (retain_graph=True) fails loudly on the saved tensor's version check.
def _kd_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])
    ctx.grad_scale = inputs[5] if len(inputs) > 5 else 1.0  # the kernel's gradient carries it


def _kd_backward(ctx, grad_rows, _grad_of_grad):
    if grad_rows is None:  # only the (non-differentiable) gradient output was used
        return None, None, None, None, None, None
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and grad_rows.numel() != 0:
        raise RuntimeError("kd_loss_fwd was called with compute_grad=False; call it with True to differentiate")
    if ctx.grad_scale != 1.0:
        grad_rows = grad_rows / ctx.grad_scale
    return scale_fused_gradient(grad, grad_rows), None, None, None, None, None


torch.library.register_autograd("keydistill::kd_loss_fwd", _kd_backward, setup_context=_kd_setup_context)


# ---- backend interface used by keydistill.ops --------------------------------------------------------------
def nearest_key(x, keys):
    return torch.ops.keydistill.nearest_key(x, keys)


def ema_update_(keys, cluster_size, embed_sum, x, index, decay, eps, deterministic):
    torch.ops.keydistill.ema_update_(keys, cluster_size, embed_sum, x, index, decay, eps, deterministic)


def sparse_adamw_(param, exp_avg, exp_avg_sq, rows, grad, lr, beta1, beta2, eps, weight_decay, step, maximize):
    torch.ops.keydistill.sparse_adamw_(
        param, exp_avg, exp_avg_sq, rows, grad.contiguous(), lr, beta1, beta2, eps, weight_decay, step, maximize
    )


def kd_loss(student, teacher, temperature, mask, reduction):
    """The reduced loss in one op call; its autograd is C++ (csrc/kd_loss.cpp)."""
    return torch.ops.keydistill.kd_loss.default(student, teacher, temperature, mask, reduction)


def kd_loss_rows(student, teacher, temperature, mask):
    """Per-row losses [N] (float32), differentiable w.r.t. student through the fused gradient."""
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    return torch.ops.keydistill.kd_loss_fwd(student, teacher, temperature, mask, compute_grad)[0]
