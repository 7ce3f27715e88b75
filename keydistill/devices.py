"""Device names from the command line and the Python API: checked once, with one wording, before any work."""

from __future__ import annotations

import torch

DEVICE_HELP = "cpu, cuda, cuda:N, or auto: a CUDA GPU when there is one, else the CPU"


def resolve_auto(device: str) -> str:
    """--device auto as the device it means here."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def check_device(device: str | torch.device, flag: str = "device") -> torch.device:
    """`device` as a torch.device; ValueError naming `flag` for a name torch does not know or a GPU this
    machine lacks (found now, not as a CUDA error deep inside the first forward pass)."""
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
