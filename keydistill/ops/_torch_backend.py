"""The torch backend: keydistill.ops.reference behind the backend interface (keydistill.ops._backends.Backend)."""

from __future__ import annotations

from keydistill.ops import _checks, reference

__all__ = ["nearest_key", "ema_update_", "kd_loss", "kd_loss_rows", "sparse_adamw_"]


def nearest_key(x, keys):
    return reference.nearest_key(x, keys)


def ema_update_(keys, cluster_size, embed_sum, x, index, decay, eps, deterministic):
    # deterministic: ignored, as the torch backend always has (torch's own deterministic mode governs it)
    if index.numel() and index.device.type != "cpu":  # an index past K would land in the next head's slots
        _checks.assert_index_on_device(index, keys.shape[1])
    reference.ema_update_(keys, cluster_size, embed_sum, x, index.long(), decay=decay, eps=eps)


def kd_loss(student, teacher, temperature, mask, reduction):
    return reference.kd_loss(student, teacher, temperature=temperature, mask=mask, reduction=reduction)


def kd_loss_rows(student, teacher, temperature, mask):
    return reference.kd_loss_rows(student, teacher, temperature, mask)


def sparse_adamw_(param, exp_avg, exp_avg_sq, rows, grad, lr, beta1, beta2, eps, weight_decay, step, maximize):
    reference.sparse_adamw_(
        param,
        exp_avg,
        exp_avg_sq,
        rows,
        grad,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        maximize=maximize,
    )
