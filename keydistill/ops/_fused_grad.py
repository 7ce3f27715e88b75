"""The one backward of the fused kd_loss kernels (Python side; csrc/kd_loss.cpp is the C++ twin for the
reduced op). The forward kernel already produced d loss_n / d student_n; backward only scales row n by the
incoming gradient of loss_n.

Memory: the fused gradient is the only [N, V] buffer of forward + backward, because in eager mode it is
scaled in place and handed on as the student's gradient. Tracers (FakeTensor, FunctionalTensor: tensor
subclasses) get the out-of-place form, which AOT autograd can partition; their compiled graphs manage memory
themselves. The buffer is consumed: a second backward through the same graph must fail, never scale twice.
"""

from __future__ import annotations

import torch


def scale_fused_gradient(grad: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """grad [N, V] * grad_rows [N] per row; the scale stays float32 until the write (bf16 gradients)."""
    scale = grad_rows.unsqueeze(1)
    return grad.mul_(scale) if type(grad) is torch.Tensor else grad * scale
