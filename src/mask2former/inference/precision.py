"""Inference precision: the dtypes a Predictor can run in and whether this hardware runs them natively.

    resolve_dtype("bf16")                      # torch.bfloat16 ("fp32" / "bf16" / "fp16" or a torch.dtype)
    check_supported(torch.bfloat16, "cpu")     # ValueError, one line, where the CPU would only emulate it

bf16 and fp16 run the whole network in that dtype (weights converted on the Predictor's private copy; the
caller's model is left as it is). What needs range or precision stays safe whatever the dtype: the attention
masks are a finite -1e4 bias (`modeling.transformer_decoder.MASK_VALUE`, representable in fp16), the
deformable sampling keeps its coordinates in float32 (`modeling.deform_attn.ms_deform_attn_gather`), the
kernels of softmax / LayerNorm / GroupNorm accumulate in float32, and the runner hands float32 outputs to the
post-processing (softmax of class logits and sigmoid of mask logits in float32). On a CPU, bf16 and fp16 are
only offered where the instruction set has them (AVX512-BF16 / AMX-BF16, AVX512-FP16 / AMX-FP16, or the Arm
bf16 / fp16 extensions): elsewhere PyTorch emulates them, slower than float32.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}

# /proc/cpuinfo flags that mean native arithmetic in a dtype (x86 "flags", Arm "Features").
_NATIVE_CPU_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16", "asimdhp"),
}


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """ "fp32" / "bf16" / "fp16" (or float32 / bfloat16 / float16, or a torch.dtype) -> the torch.dtype."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES.values():
            raise ValueError(f"dtype {dtype}: expected one of {', '.join(DTYPE_NAMES)}")
        return dtype
    name = _ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (the names --dtype takes)."""
    for name, value in DTYPE_NAMES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_supports(dtype: torch.dtype, flags: frozenset[str] | None = None) -> bool:
    """True when this CPU (or one with these /proc/cpuinfo `flags`) computes in `dtype` natively."""
    if dtype == torch.float32:
        return True
    flags = cpu_flags() if flags is None else flags
    if flags:
        return any(flag in flags for flag in _NATIVE_CPU_FLAGS.get(dtype, ()))
    # No /proc/cpuinfo: Apple silicon has both; elsewhere ask oneDNN (which also counts emulation).
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def check_supported(
    dtype: torch.dtype, device: str | torch.device, cpu_flags_override: frozenset[str] | None = None
) -> None:
    """Raise ValueError (one line) when `device` has no native `dtype` arithmetic (a CPU's flags are read
    from /proc/cpuinfo unless given)."""
    device = torch.device(device)
    name = dtype_name(dtype)
    if dtype == torch.float32:
        return
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError(f"dtype {name}: this GPU has no bf16 support; use fp16 or fp32")
        return
    if device.type == "cpu":
        if not cpu_supports(dtype, cpu_flags_override):
            flags = " / ".join(_NATIVE_CPU_FLAGS[dtype][:2]).upper().replace("_", "-")
            raise ValueError(
                f"dtype {name}: this CPU has no native {name} arithmetic ({flags}), PyTorch would emulate "
                f"it slower than fp32; use fp32"
                + (" (or an fp16 ONNX export)" if dtype == torch.float16 else "")
            )
        return
    raise ValueError(f"dtype {name}: not supported on device {device}; use fp32")
