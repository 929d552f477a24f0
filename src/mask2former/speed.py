"""Inference speed: result-preserving model optimisations and the measurements the benchmarks print.

- `optimize_for_inference(model)`: folds every FrozenBatchNorm2d into its convolution (exact up to
  rounding) and puts the model in eval mode. What else makes inference fast needs no switch: without aux
  outputs the transformer decoder computes the intermediate masks at attention-mask size, attends through
  scaled_dot_product_attention with one (B, 1, Q, hw) additive mask broadcast over heads, and
  MSDeformAttn takes the corner-gather path (`modeling.deform_attn_fast`) in eager mode.
- `PeakMemory`: high-water mark of the resident set size during a block (Linux /proc), the one peak
  measure that sees PyTorch's CPU allocations.
- `matmul_peak_gflops`: the machine's measured fp32 matmul throughput, the yardstick for achieved GFLOP/s.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from mask2former.modeling.layers import FrozenBatchNorm2d, fold_frozen_batchnorm


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Fold FrozenBN into the preceding convolutions and switch to eval mode, in place; returns the model.

    Outputs are unchanged up to float rounding (conv(x) * scale + shift == conv_with_folded_weights(x)).
    Folding is irreversible, so a model meant for further training should not go through here; the folded
    convolution weights and biases are marked as not requiring gradients.
    """
    fold_frozen_batchnorm(model)
    return model.eval()


def has_frozen_batchnorm(model: nn.Module) -> bool:
    """True while any FrozenBatchNorm2d is left (not folded into a convolution)."""
    return any(isinstance(module, FrozenBatchNorm2d) for module in model.modules())


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} is missing from /proc/self/status")


def resident_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    return _status_kib("VmRSS:") * 1024


class PeakMemory:
    """Peak resident memory added during a `with` block, in bytes (`.bytes`), Linux only.

    Resets the kernel's high-water mark (VmHWM) by writing 5 to /proc/self/clear_refs on entry and reads it on
    exit, minus the resident size at entry. glibc may keep freed blocks mapped, which makes later blocks look
    cheaper: for comparable figures run each case in a fresh process with MALLOC_MMAP_THRESHOLD_=65536.
    `.available` is False where /proc cannot be reset (then `.bytes` is the whole process's peak growth).
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.available = True
        self._start = 0

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            self.available = False
        self._start = resident_bytes()
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = max(0, _status_kib("VmHWM:") * 1024 - self._start)


def matmul_peak_gflops(size: int = 2048, repeats: int = 3) -> float:
    """Best fp32 GFLOP/s of a (size x size) @ (size x size) torch.matmul with the current thread count."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.matmul(a, b)  # warm-up (thread pool, MKL/oneDNN dispatch)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
