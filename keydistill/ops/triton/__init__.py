"""The triton backend: Triton kernels for the three hot-path ops, one module per op.

Same interface as every backend module (see keydistill.ops._backends): nearest_key, ema_update_ and
kd_loss_rows, on validated input. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1
(the interpreter: exact but slow, used by the tests on machines without a GPU).
"""

from keydistill.ops.triton.ema_update_kernel import ema_update_
from keydistill.ops.triton.kd_loss_kernel import kd_loss_rows
from keydistill.ops.triton.nearest_key_kernel import nearest_key

__all__ = ["nearest_key", "ema_update_", "kd_loss_rows"]
