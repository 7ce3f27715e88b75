"""The triton backend: Triton kernels for the three hot-path ops, one module per op.

The backend interface (keydistill.ops._backends.Backend) on validated input: nearest_key, ema_update_, kd_loss and
kd_loss_rows (no sparse_adamw_: keydistill.ops._backends.LACKS). Runs on CUDA tensors, or on CPU tensors
under TRITON_INTERPRET=1 (the interpreter: exact but slow, used by the tests on machines without a GPU).
"""

from keydistill.ops.reference import reduce_rows
from keydistill.ops.triton.ema_update_kernel import ema_update_
from keydistill.ops.triton.kd_loss_kernel import kd_loss_rows
from keydistill.ops.triton.nearest_key_kernel import nearest_key

__all__ = ["nearest_key", "ema_update_", "kd_loss", "kd_loss_rows"]


def kd_loss(student, teacher, temperature, mask, reduction):
    return reduce_rows(kd_loss_rows(student, teacher.detach(), temperature, mask), mask, reduction)
