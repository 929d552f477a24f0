"""`mask2former bench`: latency, peak memory and achieved GFLOP/s of a preset, stage by stage.

Stages: backbone, pixel decoder, transformer decoder, post-processing (the preset's task), on a random
normalised batch of the given size, run by the module `predict` runs: the Predictor's private optimised copy
(`TorchRunner.inference_model()`) in each --dtype, side by side. Three passes in one process:
1. timing: --warmup untimed runs, then --runs timed ones, the dtypes interleaved run by run (min, median and
   max per stage);
2. FLOPs: one run under torch.utils.flop_counter.FlopCounterMode (matmul, convolution and attention
   kernels; it has no formula for grid_sample, embedding_bag, index_select, norms, softmax or
   elementwise ops, so those stages' GFLOP/s are lower bounds);
3. memory: one run with glibc returning freed blocks to the OS, each stage inside a VmHWM probe.
GFLOP/s is set against the machine's matmul peak in the same dtype measured right before, with the same
thread count (FLOPs are counted once, in fp32: the same kernels do the same work in every dtype).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mask2former.cli import UserError, example
from mask2former.cli.checks import AT_LEAST_1, NON_NEGATIVE, Range, check_args, check_input_size


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time a model stage by stage: latency, peak memory, GFLOP/s against the matmul peak",
        epilog=example("mask2former bench --preset coco-panoptic-r50 --size 800x1088 --runs 3 --threads 1"),
    )
    parser.add_argument("--preset", required=True, help="architecture (see `mask2former presets`)")
    parser.add_argument("--size", required=True, help="input HxW, multiples of 32, e.g. 800x1088")
    parser.add_argument("--weights", default=None, help="checkpoint to load (default: random weights)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="the unoptimised reference path: grid_sample deformable attention, FrozenBN unfolded, "
        "intermediate masks at full resolution",
    )
    parser.add_argument(
        "--no-reuse-memory",
        action="store_true",
        help="time with glibc's usual thresholds instead of the setting predict's forward pass runs with "
        "(glibc keeping freed memory for reuse: no page faults for large tensors)",
    )
    parser.add_argument(
        "--dtype",
        default="all",
        help="comma-separated fp32,bf16,fp16 (default all: every dtype this device runs natively)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.set_defaults(func=run)


def parse_size(text: str, divisor: int) -> tuple[int, int]:
    """'800x1088' -> (800, 1088), both positive multiples of `divisor`."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text}: expected HxW, e.g. 800x1088") from None
    if height <= 0 or width <= 0 or height % divisor or width % divisor:
        up_h, up_w = (-(-max(side, 1) // divisor) * divisor for side in (height, width))
        raise UserError(
            f"--size {text}: height and width must be positive multiples of {divisor} (the model pads its "
            f"input to that), e.g. {up_h}x{up_w}"
        )
    return height, width


def dtypes_of(text: str, device: str = "cpu") -> list:
    """--dtype: "all" or a comma-separated list -> torch dtypes (fp32 first), with one-line errors."""
    import torch

    from mask2former.inference.precision import DTYPE_NAMES, check_supported, cpu_supports, resolve_dtype

    if text == "all":
        return [dtype for dtype in DTYPE_NAMES.values() if cpu_supports(dtype)]
    try:
        chosen = [resolve_dtype(part.strip()) for part in text.split(",") if part.strip()]
        for dtype in chosen:
            check_supported(dtype, device)
    except ValueError as error:
        raise UserError(f"--dtype {text}: {str(error).split(': ', 1)[-1]}") from None
    if not chosen:
        raise UserError(f"--dtype {text}: expected fp32, bf16 and/or fp16")
    return sorted(set(chosen), key=lambda dtype: dtype != torch.float32)


def load(args: argparse.Namespace, dtypes: list) -> tuple[dict, object]:
    """({dtype: the module `predict` runs in that dtype}, config) for --preset / --weights: the Predictor's
    private copy (`TorchRunner.inference_model()`), optimised unless --reference."""
    from mask2former.api import resolve_model
    from mask2former.checkpoints.io import CheckpointError
    from mask2former.inference.predictor import TorchRunner

    try:
        loaded = resolve_model(args.weights, args.preset)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        raise UserError(str(error).replace("weights ", "--weights ", 1)) from None
    # No parameter needs a gradient here, and FlopCounterMode's module tracker fails under inference mode
    # on parameters that require one.
    model = loaded.model.requires_grad_(False)
    models = {
        dtype: TorchRunner(model, optimize=not args.reference, dtype=dtype).inference_model()
        for dtype in dtypes
    }
    return models, loaded.config


def measure(args: argparse.Namespace) -> dict:
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mask2former.glibc import freed_memory_kept
    from mask2former.inference.precision import dtype_name
    from mask2former.modeling.kernels import use_kernels
    from mask2former.profiling import (
        STAGES,
        PeakMemory,
        allocator,
        matmul_peak_gflops,
        onednn_matmul_peak_gflops,
        run_stages,
    )

    check_args(
        args,
        {
            "--runs": AT_LEAST_1,
            "--warmup": NON_NEGATIVE,
            "--batch-size": AT_LEAST_1,
            "--threads": Range(1, 1024),
        },
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # The reference path is the float32 ground truth (its grid_sample and training-time decoder are fp32).
    dtypes = dtypes_of("fp32" if args.reference and args.dtype == "all" else args.dtype)
    if args.reference and dtypes != [torch.float32]:
        raise UserError(f"--dtype {args.dtype}: --reference runs fp32 only")
    models, config = load(args, dtypes)
    height, width = parse_size(args.size, config.input.size_divisibility or 1)
    check_input_size("--size", (height * args.batch_size, width))
    images = torch.randn(args.batch_size, 3, height, width, generator=torch.Generator().manual_seed(0))
    path = use_kernels(deform_attn="reference") if args.reference else contextlib.nullcontext()

    def once(dtype, stage_context=lambda name: contextlib.nullcontext(), keep_memory=True) -> None:
        # The malloc setting predict's forward pass runs under (TorchRunner.allocator), but for the peaks.
        with freed_memory_kept(keep_memory and not args.no_reuse_memory):
            run_stages(
                models[dtype], images.to(dtype), config, stage_context, full_resolution_masks=args.reference
            )

    peaks = {dtype: matmul_peak_gflops(dtype=dtype) for dtype in dtypes}
    onednn_peaks = {dtype: onednn_matmul_peak_gflops(dtype=dtype) for dtype in dtypes}
    times = {dtype: {name: [] for name in STAGES} for dtype in dtypes}

    def timed(dtype):
        @contextlib.contextmanager
        def context(name: str):
            start = time.perf_counter()
            yield
            times[dtype][name].append(time.perf_counter() - start)

        return context

    flops: dict[str, int] = {}

    @contextlib.contextmanager
    def counted(name: str):
        with FlopCounterMode(display=False) as counter:
            yield
        flops[name] = counter.get_total_flops()

    memory: dict = {dtype: {} for dtype in dtypes}

    def probed(dtype):
        @contextlib.contextmanager
        def context(name: str):
            with PeakMemory() as peak:
                yield
            memory[dtype][name] = peak.bytes

        return context

    whole = {}
    with path:
        for _ in range(args.warmup):
            for dtype in dtypes:
                once(dtype)
        for _ in range(args.runs):
            for dtype in dtypes:
                once(dtype, timed(dtype))
        with use_kernels(onednn=False):  # FlopCounterMode has no formulas for oneDNN's kernels
            once(dtypes[0], counted)
        for dtype in dtypes:
            with allocator("release") as freed, PeakMemory() as peak:
                once(dtype, probed(dtype), keep_memory=False)
            whole[dtype] = (peak, freed)
    reports = {}
    for dtype in dtypes:
        totals = [sum(run) for run in zip(*times[dtype].values(), strict=True)]
        stages = {name: _row(times[dtype][name], flops[name], memory[dtype][name]) for name in STAGES}
        peak, freed = whole[dtype]
        reports[dtype_name(dtype)] = {
            "matmul_peak_gflops": peaks[dtype],
            "onednn_matmul_peak_gflops": onednn_peaks[dtype],
            "stages": stages,
            "total": _row(totals, sum(flops.values()), peak.bytes),
            "memory_exact": freed and peak.available,
        }
    first = reports[dtype_name(dtypes[0])]
    return {
        "preset": args.preset,
        "weights": args.weights or "random",
        "path": "reference" if args.reference else "fast",
        "input": [args.batch_size, 3, height, width],
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "reuse_memory": not args.no_reuse_memory,
        "warmup": args.warmup,
        **first,  # the first dtype's figures at the top level, as before --dtype
        "dtypes": reports,
    }


def _row(seconds: list[float], flop: int, peak_bytes: int) -> dict:

    median = statistics.median(seconds)
    return {
        "min_ms": min(seconds) * 1e3,
        "median_ms": median * 1e3,
        "max_ms": max(seconds) * 1e3,
        "peak_mb": peak_bytes / 2**20,
        "gflop": flop / 1e9,
        "gflops_per_s": flop / 1e9 / median,
    }


def print_table(report: dict) -> None:
    batch, _, height, width = report["input"]
    dtypes = report["dtypes"]
    print(
        f"mask2former bench: {report['preset']} ({report['weights']} weights), {report['path']} path "
        f"(the Predictor's inference copy), input {batch}x3x{height}x{width}, {report['threads']} thread(s), "
        f"{report['runs']} runs after {report['warmup']} warm-up, dtypes interleaved"
        + (", glibc reusing freed memory" if report["reuse_memory"] else "")
    )
    for name, figures in dtypes.items():
        onednn = figures["onednn_matmul_peak_gflops"]
        also = f"; oneDNN on a prepacked weight {onednn:.1f}" if onednn else ""
        print(f"{name} matmul peak: torch.matmul {figures['matmul_peak_gflops']:.1f} GFLOP/s{also} (2048^3)")
    print("% peak is against torch.matmul's in the same dtype; ms as min / median / max\n")
    header = f"{'stage':<20} {'GFLOP':>7}"
    for name in dtypes:
        header += f" | {name + ' ms':>20} {'GFLOP/s':>8} {'% peak':>6} {'MB':>6}"
    print(header)
    for stage in list(report["stages"]) + ["total"]:
        first = report["total"] if stage == "total" else report["stages"][stage]
        line = f"{stage:<20} {first['gflop']:7.2f}"
        for figures in dtypes.values():
            row = figures["total"] if stage == "total" else figures["stages"][stage]
            spread = f"{row['min_ms']:.1f}/{row['median_ms']:.1f}/{row['max_ms']:.1f}"
            percent = 100 * row["gflops_per_s"] / figures["matmul_peak_gflops"]
            line += f" | {spread:>20} {row['gflops_per_s']:8.1f} {percent:6.1f} {row['peak_mb']:6.0f}"
        print(line)
    print(
        "\nGFLOP: matmul/convolution/attention kernels as counted by torch.utils.flop_counter "
        "(2 per multiply-add);\ngrid_sample, embedding_bag and index gathers, norms, softmax and "
        "elementwise ops are not counted,\nso GFLOP/s is a lower bound where a stage has them "
        "(deformable attention in the pixel decoder)."
    )
    exact = all(figures["memory_exact"] for figures in dtypes.values())
    how = "glibc returning freed blocks" if exact else "glibc may keep freed blocks: approximate"
    print(f"MB: resident-set high-water mark added during the stage (VmHWM; {how}).")


def run(args: argparse.Namespace) -> int:
    report = measure(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0
