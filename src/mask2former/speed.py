"""Inference speed: result-preserving model optimisations and the measurements the benchmarks print.

- `optimize_for_inference(model)`: folds every FrozenBatchNorm2d into its convolution (exact up to
  rounding) and puts the model in eval mode. What else makes inference fast needs no switch: without aux
  outputs the transformer decoder computes the intermediate masks at attention-mask size, attends through
  scaled_dot_product_attention with one (B, 1, Q, hw) additive mask broadcast over heads, and
  MSDeformAttn takes the corner-gather path (`modeling.deform_attn_fast`) in eager mode.
- `PeakMemory`: high-water mark of the resident set size during a block (Linux /proc), the one peak
  measure that sees PyTorch's CPU allocations.
- `matmul_peak_gflops`: the machine's measured fp32 matmul throughput, the yardstick for achieved GFLOP/s.
- `run_stages`: one inference stage by stage (backbone, pixel decoder, transformer decoder,
  post-processing), each wrapped in a caller's context (a timer, a FLOP counter, a memory probe);
  `reference_path` switches to the unoptimised reference for comparisons.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
from torch import nn

from mask2former.config import ModelConfig
from mask2former.modeling import deform_attn
from mask2former.modeling.layers import FrozenBatchNorm2d, fold_frozen_batchnorm
from mask2former.postprocess import postprocess

STAGES = ("backbone", "pixel decoder", "transformer decoder", "post-processing")


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


@contextlib.contextmanager
def freed_memory_returned_to_os() -> Iterator[bool]:
    """Inside the block glibc hands blocks over 64 KiB back to the OS at once (after trimming what it holds),
    so the resident set follows live tensors and VmHWM measures peaks. Yields False where glibc is missing.

    Every large allocation then costs fresh pages, so time outside the block. On exit the mmap threshold goes
    to 32 MiB, the ceiling glibc's own dynamic threshold reaches once large blocks have been freed.
    """
    m_mmap_threshold = -3  # mallopt parameter number in glibc's malloc.h
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(m_mmap_threshold, 64 * 1024) == 1
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        yield False
        return
    try:
        yield ok
    finally:
        libc.mallopt(m_mmap_threshold, 32 * 2**20)


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Inside the block MSDeformAttn samples with the grid_sample reference instead of the fast path."""
    fast = deform_attn.ms_deform_attn
    deform_attn.ms_deform_attn = deform_attn.ms_deform_attn_reference
    try:
        yield
    finally:
        deform_attn.ms_deform_attn = fast


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
            size = tuple(images.shape[-2:])
            # As Predictor: a panoptic model's flags; an instance model keeps every class.
            thing_classes = config.thing_classes if config.task == "panoptic" else None
            return [
                postprocess(
                    outputs,
                    batch_index=index,
                    task=config.task,
                    padded_size=size,
                    image_size=size,
                    original_size=size,
                    thing_classes=thing_classes,
                    object_mask_threshold=config.object_mask_threshold,
                    overlap_threshold=config.overlap_threshold,
                    top_k=config.test_topk,
                    semantic_before_inference=config.task != "semantic",
                )
                for index in range(images.shape[0])
            ]
