"""Device names as users write them ("auto", "cpu", "cuda", "cuda:1", "mps") -> a torch.device that exists.

"auto" is CUDA when this torch build sees a GPU, else CPU. A device this machine cannot run raises a
one-line ValueError starting with "device NAME:", which the CLI turns into "--device NAME: ...".
"""

from __future__ import annotations

import torch

AUTO = "auto"


def resolve_device(name: str | torch.device | None = AUTO) -> torch.device:
    """`name` (None means "auto") -> a usable torch.device; ValueError naming the device otherwise."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or AUTO).strip().lower()
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name}: not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA GPU visible"
            raise ValueError(f"device {name}: CUDA is not available ({build}, torch {torch.__version__})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name}: Apple MPS is not available on this machine")
        return device
    raise ValueError(f"device {name}: unsupported device type {device.type!r}; use auto, cpu, cuda or mps")
