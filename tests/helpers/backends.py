"""Which backends the tests cover, and where each one's inputs live."""

import os

import torch

# The interpreter must be chosen before triton.jit decorates any kernel, i.e. before any import of them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_BACKENDS = ["cpp", "triton"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_device(backend: str) -> torch.device:
    """Where a backend's inputs live: the GPU for cuda (and triton when there is a GPU), else the CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
