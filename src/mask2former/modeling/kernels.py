"""Which kernels the model's hot spots run: the one named switch for deformable attention and oneDNN layers.

    from mask2former.modeling.kernels import use_kernels
    with use_kernels(deform_attn="reference", onednn=False):
        outputs = model(images)       # grid_sample reference, plain F.linear / F.conv2d

`deform_attn`:
- "auto" (default): the fast corner-gather path with an analytic backward in eager CPU float32/float64 (and
  for CPU bf16/fp16, on inputs up-cast to float32: faster than half-precision gathers), the gather forward
  (`ms_deform_attn_gather`, autograd backward) for other devices, and the
  grid_sample reference while tracing, exporting or compiling (one GridSample per level is what ONNX has);
- "reference": always the grid_sample reference (the ground truth every path is tested against);
- "gather": always the gather forward (any dtype and device);
- "fast": the fast path where it applies (eager CPU float32/float64), else as "auto".
`onednn`: layers that `inference.optimize.optimize_for_inference` turned into oneDNN layers run oneDNN's
prepacked kernels in no-grad CPU float32 (True, default) or the plain F.linear / F.conv2d they equal
(False: e.g. for torch.utils.flop_counter, which has no formulas for oneDNN's kernels).

The choice is scoped to the `with` block and to the calling thread or task (a ContextVar), so a server
thread or another model running at the same time is not affected.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

DEFORM_ATTN_KERNELS = ("auto", "fast", "gather", "reference")


@dataclass(frozen=True)
class Kernels:
    deform_attn: str = "auto"
    onednn: bool = True


# Kernels is frozen: the shared default cannot be edited.
_CURRENT: contextvars.ContextVar[Kernels] = contextvars.ContextVar(
    "mask2former_kernels",
    default=Kernels(),  # noqa: B039
)


def current_kernels() -> Kernels:
    """The kernel choice in force here (the defaults outside any `use_kernels` block)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_kernels(deform_attn: str | None = None, onednn: bool | None = None) -> Iterator[Kernels]:
    """Choose kernels inside the block (None keeps the choice in force); yields the choice."""
    if deform_attn is not None and deform_attn not in DEFORM_ATTN_KERNELS:
        expected = ", ".join(DEFORM_ATTN_KERNELS)
        raise ValueError(f"deform_attn: expected one of {expected}, got {deform_attn!r}")
    choice = current_kernels()
    if deform_attn is not None:
        choice = dataclasses.replace(choice, deform_attn=deform_attn)
    if onednn is not None:
        choice = dataclasses.replace(choice, onednn=bool(onednn))
    token = _CURRENT.set(choice)
    try:
        yield choice
    finally:
        _CURRENT.reset(token)
