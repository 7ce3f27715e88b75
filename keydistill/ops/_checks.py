"""Input validation shared by every backend: one place, run before dispatch.

Every failure raises TypeError (wrong type/dtype/device) or ValueError (wrong shape/value) naming the
argument and the reason, so no backend ever sees input it could crash or return garbage on.
"""

from __future__ import annotations

import math

import torch

# The public ops take these; the reference module also takes float64 (it is the test oracle).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STATE_DTYPE = torch.float32
REDUCTIONS = ("batchmean", "sum", "none")

# The int32 limits the kernels rely on, the same as csrc/checks.h imposes on direct torch.ops calls (every
# device and backend alike): int key indices plus a 64-key tile, CUDA's grid.y for heads, int (head, key)
# slots and int32 per-key counts in ema_update_, one CUDA block per kd_loss row.
INT32_MAX = 2**31 - 1
MAX_KEYS = INT32_MAX - 64
MAX_HEADS = 65535


def at_most(what: str, value: int, limit: int):
    if value > limit:
        raise ValueError(f"{what} = {value} exceeds the kernels' limit of {limit}")


def tensor(name: str, t, *, ndim: int | None = None, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    return t


def same_device(**named):
    items = list(named.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t is not None and t.device != first.device:
            raise TypeError(f"{name} is on {t.device} but {first_name} is on {first.device}; move both to one device")


def check_nearest_key(x, keys):
    tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    tensor("keys", keys, ndim=3, dtypes=FLOAT_DTYPES)
    same_device(x=x, keys=keys)
    if keys.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"keys must have x's dtype ({x.dtype}) or float32, got {keys.dtype}")
    if x.shape[1] != keys.shape[0]:
        raise ValueError(
            f"x has H={x.shape[1]} heads (shape {tuple(x.shape)}) "
            f"but keys has H={keys.shape[0]} (shape {tuple(keys.shape)})"
        )
    if x.shape[2] != keys.shape[2]:
        raise ValueError(
            f"x has d={x.shape[2]} (shape {tuple(x.shape)}) but keys has d={keys.shape[2]} (shape {tuple(keys.shape)})"
        )
    if keys.shape[1] == 0:
        raise ValueError("keys must hold at least one key per head (K >= 1), got K=0")
    at_most("K", keys.shape[1], MAX_KEYS)
    at_most("H", keys.shape[0], MAX_HEADS)
    at_most("d", keys.shape[2], INT32_MAX)


def check_ema_update(keys, cluster_size, embed_sum, x, index, decay, eps):
    for name, t in (("keys", keys), ("embed_sum", embed_sum)):
        tensor(name, t, ndim=3, dtypes=(STATE_DTYPE,))
    tensor("cluster_size", cluster_size, ndim=2, dtypes=(STATE_DTYPE,))
    tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    tensor("index", index, ndim=2, dtypes=(torch.int64, torch.int32))
    same_device(keys=keys, cluster_size=cluster_size, embed_sum=embed_sum, x=x, index=index)
    h, k, d = keys.shape
    if tuple(embed_sum.shape) != (h, k, d):
        raise ValueError(f"embed_sum must have keys' shape {(h, k, d)}, got {tuple(embed_sum.shape)}")
    if tuple(cluster_size.shape) != (h, k):
        raise ValueError(f"cluster_size must have shape {(h, k)} (H, K), got {tuple(cluster_size.shape)}")
    if x.shape[1:] != (h, d):
        raise ValueError(f"x must have shape [N, {h}, {d}] to match keys {(h, k, d)}, got {tuple(x.shape)}")
    if tuple(index.shape) != (x.shape[0], h):
        raise ValueError(f"index must have shape {(x.shape[0], h)} (N, H), got {tuple(index.shape)}")
    for name, t in (("keys", keys), ("cluster_size", cluster_size), ("embed_sum", embed_sum)):
        if not t.is_contiguous():
            raise ValueError(f"{name} is updated in place and must be contiguous")
    if not isinstance(decay, (int, float)) or not (0.0 <= decay < 1.0):
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
    if not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    at_most("H * K", h * k, INT32_MAX - 1)
    at_most("H", h, MAX_HEADS)  # the Triton kernels put heads on CUDA's grid.y
    at_most("N", x.shape[0], INT32_MAX - 1)
    at_most("d", d, INT32_MAX)
    # Off the CPU a host-side check would wait for the kernels queued before it at every EMA step: there each
    # backend asserts on the device where it reads (the CUDA kernel per index, the torch and Triton adapters
    # with assert_index_on_device), so the check costs no launches of its own on the CUDA backend.
    if index.numel() and index.device.type == "cpu":
        if torch.compiler.is_compiling():  # a host read would break the graph
            assert_index_on_device(index, k)
        else:
            lo, hi = torch.stack(torch.aminmax(index)).tolist()  # one pass, one device-to-host copy
            if lo < 0 or hi >= k:
                raise ValueError(f"index holds values in [{lo}, {hi}], outside [0, K={k})")


def assert_index_on_device(index, num_keys: int) -> None:
    """A device-side assertion that index lies in [0, num_keys): no host wait."""
    torch._assert_async(((index >= 0) & (index < num_keys)).all(), f"index holds values outside [0, K={num_keys})")


def check_kd_loss(student_logits, teacher_logits, temperature, mask, reduction):
    if _plain_kd_call(student_logits, teacher_logits, temperature, mask, reduction):
        return  # the common, valid call, checked in one expression: at [32, 2] logits checks cost like the kernel
    tensor("student_logits", student_logits, ndim=2, dtypes=FLOAT_DTYPES)
    tensor("teacher_logits", teacher_logits, ndim=2, dtypes=FLOAT_DTYPES)
    same_device(student_logits=student_logits, teacher_logits=teacher_logits, mask=mask)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have one shape [N, V]"
        )
    if student_logits.shape[1] < 1:
        raise ValueError("logits must have V >= 1 classes")
    at_most("N", student_logits.shape[0], INT32_MAX - 1)
    at_most("V", student_logits.shape[1], INT32_MAX)
    check_kd_options(student_logits.shape[0], temperature, mask, reduction)


def _plain_kd_call(student, teacher, temperature, mask, reduction) -> bool:
    """True for plain tensors of one float dtype family, one shape [N, V >= 1] and device, no mask, a float
    temperature in (0, inf) and a known reduction; anything else goes through the checks that explain."""
    return (
        type(student) is torch.Tensor
        and type(teacher) is torch.Tensor
        and mask is None
        and type(temperature) is float
        and 0.0 < temperature < math.inf
        and reduction in REDUCTIONS
        and student.dtype in FLOAT_DTYPES
        and teacher.dtype in FLOAT_DTYPES
        and student.dim() == 2
        and student.shape == teacher.shape
        and 1 <= student.shape[1] <= INT32_MAX
        and student.shape[0] < INT32_MAX
        and student.device == teacher.device
    )


def check_kd_options(n_rows, temperature, mask, reduction):
    """temperature, mask [n_rows] and reduction of kd_loss and kd_loss_linear."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if mask is not None:
        tensor("mask", mask, ndim=1, dtypes=(torch.bool,))
        if mask.shape[0] != n_rows:
            raise ValueError(f"mask must have shape [N={n_rows}], got {tuple(mask.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_kd_loss_linear(
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
):
    tensor("student_hidden", student_hidden, ndim=2, dtypes=FLOAT_DTYPES)
    n, h = student_hidden.shape
    linear("student", student_weight, student_bias, student_hidden.dtype, h)
    vocab = student_weight.shape[0]
    if (teacher_logits is None) == (teacher_hidden is None and teacher_weight is None):
        raise ValueError("give the teacher as teacher_logits, or as teacher_hidden and teacher_weight (not both)")
    if teacher_logits is not None:
        tensor("teacher_logits", teacher_logits, ndim=2, dtypes=FLOAT_DTYPES)
        if tuple(teacher_logits.shape) != (n, vocab):
            raise ValueError(f"teacher_logits must have shape [N={n}, V={vocab}], got {tuple(teacher_logits.shape)}")
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight must be given together")
        tensor("teacher_hidden", teacher_hidden, ndim=2, dtypes=FLOAT_DTYPES)
        if teacher_hidden.shape[0] != n:
            raise ValueError(
                f"teacher_hidden must have N={n} rows like student_hidden, got {tuple(teacher_hidden.shape)}"
            )
        linear("teacher", teacher_weight, teacher_bias, teacher_hidden.dtype, teacher_hidden.shape[1])
        if teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"teacher_weight must have V={vocab} rows like student_weight, got {tuple(teacher_weight.shape)}"
            )
    same_device(
        student_hidden=student_hidden,
        student_weight=student_weight,
        student_bias=student_bias,
        teacher_logits=teacher_logits,
        teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
        mask=mask,
    )
    if vocab < 1:
        raise ValueError("student_weight must have V >= 1 rows (classes)")
    at_most("N", n, INT32_MAX - 1)
    at_most("V", vocab, INT32_MAX)
    check_kd_options(n, temperature, mask, reduction)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def linear(who: str, weight, bias, dtype, in_features: int):
    """A linear layer's weight [V, in_features] and optional bias [V], in the hidden states' dtype."""
    tensor(f"{who}_weight", weight, ndim=2, dtypes=(dtype,))
    if weight.shape[1] != in_features:
        raise ValueError(
            f"{who}_weight must have shape [V, {in_features}] to match {who}_hidden, got {tuple(weight.shape)}"
        )
    if bias is not None:
        tensor(f"{who}_bias", bias, ndim=1, dtypes=(dtype,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{who}_bias must have shape [V={weight.shape[0]}], got {tuple(bias.shape)}")


def check_sparse_adamw(param, exp_avg, exp_avg_sq, rows, grad, lr, beta1, beta2, eps, weight_decay, step):
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("grad", grad)):
        tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,))
        if t.dtype != param.dtype:
            raise TypeError(f"{name} must have param's dtype ({param.dtype}), got {t.dtype}")
    tensor("rows", rows, ndim=1, dtypes=(torch.int64,))
    same_device(param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, rows=rows, grad=grad)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.shape != param.shape:
            raise ValueError(f"{name} must have param's shape {tuple(param.shape)}, got {tuple(t.shape)}")
    if tuple(grad.shape) != (rows.shape[0], param.shape[1]):
        raise ValueError(f"grad must have shape {(rows.shape[0], param.shape[1])} (rows, D), got {tuple(grad.shape)}")
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"{name} is updated in place and must be contiguous")
    for name, value, low, high in (
        ("lr", lr, 0.0, math.inf),
        ("beta1", beta1, 0.0, 1.0),
        ("beta2", beta2, 0.0, 1.0),
        ("eps", eps, 0.0, math.inf),
        ("weight_decay", weight_decay, 0.0, math.inf),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value < high):
            raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not (1 <= step < math.inf):
        raise ValueError(f"step must be a finite number >= 1, got {step!r}")
    if not rows.numel():
        return
    # One pass over U ints: what makes the rows independent (and the update defined) is that they are distinct.
    valid = (rows[0] >= 0) & (rows[-1] < param.shape[0]) & (rows[1:] > rows[:-1]).all()
    if torch.compiler.is_compiling() or rows.device.type != "cpu":  # a host read would wait for the device
        torch._assert_async(valid, f"rows must be strictly increasing values in [0, R={param.shape[0]})")
    elif not valid:
        raise ValueError(
            f"rows must be strictly increasing values in [0, R={param.shape[0]}) (a coalesced "
            f"sparse gradient's), got values from {int(rows[0])} to {int(rows[-1])}"
        )
