"""Inference speed: result-preserving model optimisations and the measurements the benchmarks print.

- `optimize_for_inference(model)`: folds every FrozenBatchNorm2d into its convolution, and on CPUs with
  oneDNN runs every nn.Linear and nn.Conv2d through oneDNN kernels on weights prepacked once (the kernels
  torch.compile's CPU backend uses): both exact up to float rounding. What else makes inference fast needs
  no switch: without aux outputs the transformer decoder computes the intermediate masks at attention-mask
  size and attends through scaled_dot_product_attention with one (B, 1, Q, hw) additive mask broadcast
  over heads, and MSDeformAttn takes the corner-gather path (`modeling.deform_attn_fast`) in eager mode.
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
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from mask2former.config import ModelConfig
from mask2former.modeling import deform_attn
from mask2former.modeling.layers import Conv2d, FrozenBatchNorm2d, fold_frozen_batchnorm
from mask2former.postprocess import postprocess

STAGES = ("backbone", "pixel decoder", "transformer decoder", "post-processing")


def optimize_for_inference(model: nn.Module, onednn: bool = True) -> nn.Module:
    """Make `model` fast for inference, in place, without changing its results beyond float rounding;
    returns it in eval mode.

    - FrozenBatchNorm2d is folded into its convolution (conv(x) * scale + shift == conv'(x)).
    - `onednn` (when PyTorch has oneDNN): nn.Linear and nn.Conv2d modules become `OneDNNLinear` /
      `OneDNNConv2d`, same parameters and state_dict keys, whose no-grad CPU float32 forward runs oneDNN on
      a prepacked weight. oneDNN uses AVX-512 wherever the CPU has it (MKL's sgemm, behind F.linear, keeps
      AVX2 on AMD CPUs) and its convolutions return channels-last maps, which the next convolution reads
      without a layout reorder: on the AVX-512 AMD EPYC of the benchmarks, linear layers ~1.7x, 1x1
      convolutions ~2x. With gradients, on other devices and while tracing they are plain nn.Linear/Conv2d.

    Folding is irreversible (the norm modules go away): optimise a model that will not be trained again.
    """
    fold_frozen_batchnorm(model)
    if onednn and onednn_available():
        for module in model.modules():
            # Exact classes only: a subclass may compute something else in its own forward.
            if type(module) in _ONEDNN_CLASSES:
                _to_onednn(module)
    return model.eval()


def has_frozen_batchnorm(model: nn.Module) -> bool:
    """True while any FrozenBatchNorm2d is left (not folded into a convolution)."""
    return any(isinstance(module, FrozenBatchNorm2d) for module in model.modules())


def onednn_available() -> bool:
    """True when this PyTorch has the oneDNN (mkldnn) prepacked linear and convolution kernels."""
    ops = getattr(torch.ops, "mkldnn", None)
    names = (
        "_linear_pointwise",
        "_reorder_linear_weight",
        "_convolution_pointwise",
        "_reorder_convolution_weight",
    )
    return torch.backends.mkldnn.is_available() and all(hasattr(ops, name) for name in names)


_onednn_enabled = True


@contextlib.contextmanager
def plain_kernels() -> Iterator[None]:
    """Inside the block OneDNNLinear / OneDNNConv2d run F.linear / F.conv2d: the same arithmetic, in the
    kernels torch.utils.flop_counter has formulas for (it does not know oneDNN's)."""
    global _onednn_enabled
    previous, _onednn_enabled = _onednn_enabled, False
    try:
        yield
    finally:
        _onednn_enabled = previous


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's prepacked kernels have no backward and no export: inference on CPU float32 only."""
    return (
        _onednn_enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
    )


def _packed(module: nn.Module, pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The module's weight in oneDNN's layout, packed on first use and again whenever the weight changed
    (moved, reloaded or edited in place: its storage or version counter differ)."""
    key = (module.weight.data_ptr(), module.weight._version)
    if getattr(module, "_onednn_key", None) != key:
        module._onednn_weight = pack(module.weight.detach())
        module._onednn_key = key
    return module._onednn_weight


class _PackedWeightCache:
    """Leaves the packed weight (an opaque oneDNN tensor, which cannot be copied) out of deepcopy and pickle;
    the copy packs its own on first use."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_onednn_weight", None)
        state.pop("_onednn_key", None)
        return state


class OneDNNLinear(_PackedWeightCache, nn.Linear):
    """nn.Linear whose inference runs oneDNN's matmul on a prepacked weight (see optimize_for_inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        weight = _packed(self, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None))
        return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")


class OneDNNConv2d(_PackedWeightCache, Conv2d):
    """A Conv2d (with the optional norm and activation of layers.Conv2d) whose inference runs oneDNN's
    convolution on a prepacked weight; its output is channels-last (see optimize_for_inference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not _use_onednn(x, self.weight):
            x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            weight = _packed(self, lambda w: torch.ops.mkldnn._reorder_convolution_weight(w, *geometry))
            x = torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *geometry, "none", [], "")
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


# nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear: an nn.Linear in all but name.
_ONEDNN_CLASSES = (nn.Linear, NonDynamicallyQuantizableLinear, nn.Conv2d, Conv2d, OneDNNLinear, OneDNNConv2d)


def _to_onednn(module: nn.Module) -> None:
    """Turn an nn.Linear / nn.Conv2d / layers.Conv2d into its oneDNN subclass in place: the same object,
    parameters and state_dict keys, so parents, optimisers and checkpoints keep working."""
    if isinstance(module, nn.Linear):
        module.__class__ = OneDNNLinear
    elif isinstance(module, nn.Conv2d):
        if not isinstance(module, Conv2d):  # a plain nn.Conv2d: no norm nor activation
            module.norm = None
            module.activation = None
        module.__class__ = OneDNNConv2d


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


def onednn_matmul_peak_gflops(size: int = 2048, repeats: int = 3) -> float | None:
    """Best fp32 GFLOP/s of the same product through oneDNN on a prepacked weight (what OneDNNLinear runs);
    None without oneDNN."""
    if not onednn_available():
        return None
    a = torch.randn(size, size)
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(size, size), None)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# glibc malloc tuning through mallopt (parameter numbers from malloc.h), as (trim threshold, mmap threshold).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_MODES = {
    # Where glibc's own dynamic thresholds settle once large blocks have been freed.
    "default": (64 * 2**20, 32 * 2**20),
    # Freed blocks of any size stay mapped for reuse: a large tensor no longer costs one page fault per fresh
    # 4 KiB page each time it is allocated (a quarter of R50 inference time on the benchmark machine); the
    # resident set stays at its high-water mark.
    "reuse": (2**31 - 1, 2**30),
    # Blocks over 64 KiB go back to the OS at once, so the resident set follows live tensors (memory peaks).
    "release": (128 * 2**10, 64 * 2**10),
}


def set_allocator(mode: str) -> bool:
    """Switch glibc's malloc to one of ALLOCATOR_MODES for the whole process ("release" also trims what it
    holds now). False where glibc is not the allocator. Changes speed and resident memory, never results."""
    trim, mmap = ALLOCATOR_MODES[mode]
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, mmap) == 1
        if mode == "release":
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return ok


@contextlib.contextmanager
def allocator(mode: str) -> Iterator[bool]:
    """`set_allocator(mode)` inside the block, "default" after it; yields whether glibc took it."""
    try:
        yield set_allocator(mode)
    finally:
        set_allocator("default")


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
