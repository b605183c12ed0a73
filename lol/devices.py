"""The one default-device rule: ``cuda`` when a GPU is visible, else ``cpu``; an explicit choice always wins."""
from __future__ import annotations

__all__ = ["default_device", "devices"]


def devices() -> list[str]:
    """Devices models can run on here: ``cuda`` when a GPU is visible, then ``cpu``."""
    import torch

    return (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]


def default_device(device: str | None = None) -> str:
    """``device`` if given, else ``cuda`` when present, else ``cpu``."""
    return str(device) if device else devices()[0]
