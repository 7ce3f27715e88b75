"""The triton backend: Triton kernels for the three hot-path ops, one module per op.

The backend interface (keydistill.ops._backends.Backend) on validated input: nearest_key, ema_update_, kd_loss and
kd_loss_rows (no sparse_adamw_: keydistill.ops._backends.LACKS). Runs on CUDA tensors, or on CPU tensors
under TRITON_INTERPRET=1 (the interpreter: exact but slow, used by the tests on machines without a GPU).
"""

from keydistill.ops import _checks
from keydistill.ops.triton import ema_update_kernel
from keydistill.ops.triton.kd_loss_kernel import kd_loss, kd_loss_rows
from keydistill.ops.triton.nearest_key_kernel import nearest_key

__all__ = ["nearest_key", "ema_update_", "kd_loss", "kd_loss_rows"]


def ema_update_(keys, cluster_size, embed_sum, x, index, decay, eps, deterministic):
    if index.numel() and index.device.type != "cpu":  # the kernels do not check what they read
        _checks.assert_index_on_device(index, keys.shape[1])
    ema_update_kernel.ema_update_(keys, cluster_size, embed_sum, x, index, decay, eps, deterministic)
