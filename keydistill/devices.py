"""Device names from the command line and the Python API: checked once, with one wording, before any work.

PyTorch is imported inside the functions: the command lines import DEVICE_HELP for their --help, and
`python -m keydistill.predict FILE.onnx` runs where PyTorch is not installed."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "cpu, cuda, cuda:N, or auto: a CUDA GPU when there is one, else the CPU"


def resolve_auto(device: str) -> str:
    """--device auto as the device it means here."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device, flag: str = "device") -> torch.device:
    """`device` as a torch.device; ValueError naming `flag` for a name torch does not know or a GPU this
    machine lacks (found now, not as a CUDA error deep inside the first forward pass)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {str(device)!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"{flag} {str(device)!r}: no CUDA GPU is available here")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"{flag} {str(device)!r}: this machine has {count} CUDA GPU(s)")
    return parsed
