"""The one place that knows which backends exist and picks one per call.

Backends: "cuda" (C++/CUDA kernels in keydistill._C), "triton" (keydistill.ops.triton), "cpp"
(C++ CPU kernels in keydistill._C) and "torch" (keydistill.ops.reference, always there).
`auto` takes the first available backend of the device's preference list and never fails; an explicit
request for a missing backend raises BackendUnavailable saying why and how to get it.

Every backend module answers the same calls, Backend below (on validated input, Python scalars converted,
no keywords), so a public op is check -> resolve -> call; the reference and Triton modules reach it through
thin adapters (keydistill.ops._torch_backend, keydistill.ops.triton). A backend that lacks an op is listed
in LACKS, here alone.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Optional, Protocol

import torch

from keydistill.errors import BackendUnavailable  # noqa: F401  (raised here; its home is keydistill.errors)

ALL = ("cuda", "triton", "cpp", "torch")

# Preference per device type for `auto`. On CUDA the order is per op and not yet measured (no GPU run so
# far): compiled CUDA first where it exists, Triton first for kd_loss (fewer launches at small shapes);
# benchmarks/gpu_check.py prints the timings to set it from. The Triton interpreter (CPU) is never automatic.
AUTO_ORDER = {
    "cpu": {
        "nearest_key": ("cpp", "torch"),
        "ema_update_": ("cpp", "torch"),
        "kd_loss": ("cpp", "torch"),
        "kd_loss_linear": ("cpp", "torch"),
        "sparse_adamw_": ("cpp", "torch"),
    },
    "cuda": {
        "nearest_key": ("cuda", "triton", "torch"),
        "ema_update_": ("cuda", "triton", "torch"),
        "kd_loss": ("triton", "cuda", "torch"),
        "kd_loss_linear": ("triton", "cuda", "torch"),  # the per-chunk kd_loss backend
        "sparse_adamw_": ("torch",),  # index_select / index_copy_ on the GPU
    },
}
# The ops a backend's module does not run; every other op of Backend it does.
LACKS = {
    "cuda": ("sparse_adamw_",),  # _C's sparse_adamw_ has a CPU kernel only
    "triton": ("sparse_adamw_",),
}
# Which device types each backend runs on.
DEVICES = {"cuda": ("cuda",), "triton": ("cuda", "cpu"), "cpp": ("cpu",), "torch": None}


class Backend(Protocol):
    def nearest_key(self, x: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index int64 [N, H], sqdist float32 [N, H]) for x [N, H, d] and keys [H, K, d]."""

    def ema_update_(
        self,
        keys: torch.Tensor,
        cluster_size: torch.Tensor,
        embed_sum: torch.Tensor,
        x: torch.Tensor,
        index: torch.Tensor,
        decay: float,
        eps: float,
        deterministic: bool,
    ) -> None:
        """The EMA codebook update, in place (called under no_grad)."""

    def kd_loss(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        temperature: float,
        mask: Optional[torch.Tensor],
        reduction: str,
    ) -> torch.Tensor:
        """The reduced distillation loss, differentiable w.r.t. student only."""

    def kd_loss_rows(
        self, student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Per-row losses [N] float32, differentiable w.r.t. student (kd_loss_linear's per-chunk kernel)."""

    def sparse_adamw_(
        self,
        param: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        rows: torch.Tensor,
        grad: torch.Tensor,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        step: float,
        maximize: bool,
    ) -> None:
        """AdamW on the rows `rows`, in place (called under no_grad)."""


OPS = tuple(name for name in Backend.__dict__ if not name.startswith("_"))  # what every backend answers


@functools.lru_cache(maxsize=None)
def _extension():
    """(module or None, reason) for the compiled extension keydistill._C."""
    try:
        from keydistill.ops import _library  # noqa: F401  (loads _C and registers fake kernels + autograd)

        return _library, ""
    except (ImportError, OSError) as err:  # no compiler at install time, or a broken build
        return (
            None,
            f"keydistill._C could not be loaded ({err}); reinstall with "
            "`pip install -e . --no-build-isolation` on a machine with a C++ compiler",
        )


@functools.lru_cache(maxsize=None)
def _triton():
    try:
        module = importlib.import_module("keydistill.ops.triton")
        return module, ""
    except ImportError as err:
        return None, f"Triton is not importable ({err}); `pip install triton`"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device_type: str | None = None) -> str:
    """Empty string when `backend` can run (on `device_type`, if given); otherwise the reason."""
    if backend not in ALL:
        return f"unknown backend {backend!r}; choose one of {('auto',) + ALL}"
    if device_type is not None and DEVICES[backend] is not None and device_type not in DEVICES[backend]:
        return f"backend {backend!r} runs on {'/'.join(DEVICES[backend])} tensors, not {device_type}"
    if backend == "torch":
        return ""
    if backend == "cpp":
        ext, reason = _extension()
        if ext is not None and not ext.has_cpu_kernels():
            return "keydistill._C has no CPU kernels registered; rebuild with `pip install -e . --no-build-isolation`"
        return reason
    if backend == "cuda":
        ext, reason = _extension()
        if ext is None:
            return reason
        if not ext.has_cuda_kernels():
            return (
                "keydistill._C was built without CUDA kernels; rebuild with a CUDA build of torch and nvcc "
                "on the PATH (and KEYDISTILL_SKIP_CUDA unset)"
            )
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return ""
    # triton
    module, reason = _triton()
    if module is None:
        return reason
    if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
        if not _interpreting():
            return "Triton needs a CUDA device; on the CPU set TRITON_INTERPRET=1 (exact but slow)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return ""


def backends(device: torch.device | str | None = None) -> list[str]:
    """The backends available on this machine, fastest first; with `device`, those that run on its tensors
    (on a GPU machine "cpp" is available, but not for CUDA tensors)."""
    device_type = None if device is None else torch.device(device).type
    return [b for b in ALL if not why_unavailable(b, device_type)]


_LOADED: dict = {}  # backend -> its module, once resolve() found it available


def implementation(backend: str):
    """The module that implements `backend` (the calls of Backend).

    A dict lookup once resolve() has run (it fills _LOADED), which torch.compile traces without loading
    anything."""
    module = _LOADED.get(backend)
    if module is None:
        module = _LOADED[backend] = _load(backend)
    return module


def _load(backend: str):
    if backend == "torch":
        from keydistill.ops import _torch_backend

        return _torch_backend
    if backend in ("cpp", "cuda"):
        return _extension()[0]
    return _triton()[0]


@torch.compiler.assume_constant_result  # torch.compile: evaluated once while tracing, a constant in the graph
def resolve(op: str, backend: str, device: torch.device) -> str:
    """The backend that will run `op` on tensors on `device` for a request of `backend`."""
    # Cached: availability does not change within a process, except the Triton interpreter switch, which is
    # part of the key where it matters (an explicit "triton"). At small shapes the uncached checks cost as
    # much as a kernel.
    return _resolve(op, backend, device.type, backend == "triton" and _interpreting())


def _lacks(op: str, backend: str) -> str:
    if op not in LACKS.get(backend, ()):
        return ""
    having = [b for b in ALL if op not in LACKS.get(b, ())]
    return f"{op} has {' and '.join(having)} backends only (the torch one runs on any device)"


@functools.lru_cache(maxsize=None)
def _resolve(op: str, backend: str, device_type: str, interpreting: bool) -> str:
    if backend == "auto":
        order = AUTO_ORDER.get(device_type, {}).get(op, ("torch",))
        chosen = next(b for b in order if not (_lacks(op, b) or why_unavailable(b, device_type)))
        implementation(chosen)
        return chosen
    reason = _lacks(op, backend) or why_unavailable(backend, device_type)
    if reason:
        raise BackendUnavailable(f"{op}: backend {backend!r} is unavailable: {reason}")
    implementation(backend)
    return backend
