"""Measurements for the benchmarks (`mask2former bench`, bench/): never imported by the user path.

- `PeakMemory`: high-water mark of the resident set size during a block (Linux /proc), the one peak
  measure that sees PyTorch's CPU allocations.
- `matmul_peak_gflops` / `onednn_matmul_peak_gflops`: the machine's measured matmul throughput in a dtype
  (fp32, bf16, fp16), the yardstick for achieved GFLOP/s.
- `allocator(mode)`: glibc malloc tuning for timing (reuse freed memory) or memory peaks (release it).
- `run_stages`: one inference stage by stage (backbone, pixel decoder, transformer decoder,
  post-processing), each wrapped in a caller's context (a timer, a FLOP counter, a memory probe).
  The reference kernels for comparisons: `modeling.kernels.use_kernels(deform_attn="reference")`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn

from mask2former.config import ModelConfig
from mask2former.glibc import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    REUSE_MMAP_THRESHOLD,
    REUSE_TRIM_THRESHOLD,
    SETTLED_MMAP_THRESHOLD,
    SETTLED_TRIM_THRESHOLD,
    libc_function,
)
from mask2former.inference.optimize import onednn_available
from mask2former.inference.postprocess import PostprocessSettings, postprocess

STAGES = ("backbone", "pixel decoder", "transformer decoder", "post-processing")


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


def matmul_peak_gflops(size: int = 2048, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of a (size x size) @ (size x size) torch.matmul in `dtype`, current thread count."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.matmul(a, b)  # warm-up (thread pool, MKL/oneDNN dispatch)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def onednn_matmul_peak_gflops(
    size: int = 2048, repeats: int = 3, dtype: torch.dtype = torch.float32
) -> float | None:
    """Best GFLOP/s of the same product through oneDNN on a prepacked weight (what OneDNNLinear runs);
    None without oneDNN."""
    if not onednn_available():
        return None
    a = torch.randn(size, size).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(size, size).to(dtype), None)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# glibc malloc tuning through mallopt, as (trim threshold, mmap threshold).
ALLOCATOR_MODES = {
    # Where glibc's own dynamic thresholds settle once large blocks have been freed.
    "default": (SETTLED_TRIM_THRESHOLD, SETTLED_MMAP_THRESHOLD),
    # What inference sets (`glibc.keep_freed_memory`): freed blocks of any size stay mapped for reuse.
    "reuse": (REUSE_TRIM_THRESHOLD, REUSE_MMAP_THRESHOLD),
    # Blocks over 64 KiB go back to the OS at once, so the resident set follows live tensors (memory peaks).
    "release": (128 * 2**10, 64 * 2**10),
}


def set_allocator(mode: str) -> bool:
    """Switch glibc's malloc to one of ALLOCATOR_MODES for the whole process ("release" also trims what it
    holds now). False where glibc is not the allocator. Changes speed and resident memory, never results."""
    trim, mmap = ALLOCATOR_MODES[mode]
    mallopt, malloc_trim = libc_function("mallopt"), libc_function("malloc_trim")
    if mallopt is None or malloc_trim is None:
        return False
    ok = mallopt(M_TRIM_THRESHOLD, trim) == 1 and mallopt(M_MMAP_THRESHOLD, mmap) == 1
    if mode == "release":
        malloc_trim(0)
    return ok


@contextlib.contextmanager
def allocator(mode: str) -> Iterator[bool]:
    """`set_allocator(mode)` inside the block, "default" after it; yields whether glibc took it."""
    try:
        yield set_allocator(mode)
    finally:
        set_allocator("default")


def run_stages(
    model: nn.Module,
    images: torch.Tensor,
    config: ModelConfig,
    stage_context: Callable[[str], AbstractContextManager] = lambda name: contextlib.nullcontext(),
    full_resolution_masks: bool = False,
) -> list:
    """One inference of a normalised padded batch (B, 3, H, W), stage by stage, each stage inside
    `stage_context(name)` for name in STAGES -> the per-image results (the config's task).

    full_resolution_masks: run the decoder as in training (every intermediate mask at H/4 x W/4, aux outputs
    discarded), the reference for the inference-time low-resolution masks.
    """
    head = model.sem_seg_head
    with torch.inference_mode():
        with stage_context("backbone"):
            features = model.backbone(images)
        with stage_context("pixel decoder"):
            mask_features, multi_scale_features = head.pixel_decoder(features)
        with stage_context("transformer decoder"):
            outputs = head.predictor(multi_scale_features, mask_features, return_aux=full_resolution_masks)
        with stage_context("post-processing"):
            # float32 outputs, as the Predictor's runner hands them over whatever the model's dtype
            outputs = {key: outputs[key].float() for key in ("pred_logits", "pred_masks")}
            settings = PostprocessSettings.from_config(config, config.task)
            return [postprocess(outputs, index, config.task, settings) for index in range(images.shape[0])]
