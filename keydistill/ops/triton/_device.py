"""The device a Triton launch runs on: the tensors' own, not whichever GPU happens to be current.

Triton launches on torch's *current* CUDA device and stream. Inputs on cuda:1 while cuda:0 is current would
run a cuda:0 kernel on cuda:1 pointers (an illegal address, or a wrong stream). Every launcher therefore
enters its tensors' device first, as the C++ kernels do with CUDAGuard. On the CPU (the interpreter) there is
nothing to enter.
"""

from __future__ import annotations

import contextlib

import torch


def device_of(tensor: torch.Tensor):
    """A context that makes tensor's CUDA device (and so its current stream) the current one."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
