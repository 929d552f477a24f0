"""`mask2former bench`: latency, peak memory and achieved GFLOP/s of a preset, stage by stage.

Stages: backbone, pixel decoder, transformer decoder, post-processing (the preset's task), on a random
normalised batch of the given size. Three passes in one process:
1. timing: --warmup untimed runs, then --runs timed ones (min and median per stage);
2. FLOPs: one run under torch.utils.flop_counter.FlopCounterMode (matmul, convolution and attention
   kernels; it has no formula for grid_sample, embedding_bag, index_select, norms, softmax or
   elementwise ops, so those stages' GFLOP/s are lower bounds);
3. memory: one run with glibc returning freed blocks to the OS, each stage inside a VmHWM probe.
GFLOP/s is set against the machine's fp32 matmul peak measured right before, with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mask2former.cli import UserError, example
from mask2former.cli.checks import check_input_size


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
        "--reuse-memory",
        action="store_true",
        help="time with glibc keeping freed memory for reuse (profiling.set_allocator('reuse')): "
        "no page faults for large tensors, resident memory stays at its peak",
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


def load(args: argparse.Namespace):
    """(model in eval mode, config) for --preset / --weights, optimised unless --reference.

    The bench loads its own model, so it may optimise it in place (no copy to keep)."""
    from mask2former.api import resolve_model
    from mask2former.checkpoints.io import CheckpointError
    from mask2former.inference.optimize import optimize_for_inference

    try:
        loaded = resolve_model(args.weights, args.preset)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        raise UserError(str(error).replace("weights ", "--weights ", 1)) from None
    # No parameter needs a gradient here, and FlopCounterMode's module tracker fails under inference mode
    # on parameters that require one.
    model = loaded.model.requires_grad_(False)
    return (model.eval() if args.reference else optimize_for_inference(model)), loaded.config


def measure(args: argparse.Namespace) -> dict:
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mask2former.modeling.kernels import use_kernels
    from mask2former.profiling import (
        STAGES,
        PeakMemory,
        allocator,
        matmul_peak_gflops,
        onednn_matmul_peak_gflops,
        run_stages,
    )

    for name, value, low in (
        ("--runs", args.runs, 1),
        ("--warmup", args.warmup, 0),
        ("--batch-size", args.batch_size, 1),
    ):
        if value < low:
            raise UserError(f"{name} {value}: must be at least {low}")
    if args.threads is not None:
        if args.threads < 1 or args.threads > 1024:
            raise UserError(f"--threads {args.threads}: must be between 1 and 1024")
        torch.set_num_threads(args.threads)
    model, config = load(args)
    height, width = parse_size(args.size, config.input.size_divisibility or 1)
    check_input_size("--size", (height * args.batch_size, width))
    images = torch.randn(args.batch_size, 3, height, width, generator=torch.Generator().manual_seed(0))
    path = use_kernels(deform_attn="reference") if args.reference else contextlib.nullcontext()

    def once(stage_context=lambda name: contextlib.nullcontext()) -> None:
        run_stages(model, images, config, stage_context, full_resolution_masks=args.reference)

    peak_gflops = matmul_peak_gflops()
    onednn_peak_gflops = onednn_matmul_peak_gflops()
    times: dict[str, list[float]] = {name: [] for name in STAGES}

    @contextlib.contextmanager
    def timed(name: str):
        start = time.perf_counter()
        yield
        times[name].append(time.perf_counter() - start)

    flops: dict[str, int] = {}

    @contextlib.contextmanager
    def counted(name: str):
        with FlopCounterMode(display=False) as counter:
            yield
        flops[name] = counter.get_total_flops()

    memory: dict[str, int] = {}

    @contextlib.contextmanager
    def probed(name: str):
        with PeakMemory() as peak:
            yield
        memory[name] = peak.bytes

    timing_allocator = allocator("reuse") if args.reuse_memory else contextlib.nullcontext()
    with path:
        with timing_allocator:
            for _ in range(args.warmup):
                once()
            for _ in range(args.runs):
                once(timed)
        with use_kernels(onednn=False):  # FlopCounterMode has no formulas for oneDNN's kernels
            once(counted)
        with allocator("release") as freed, PeakMemory() as whole:
            once(probed)
    totals = [sum(run) for run in zip(*times.values(), strict=True)]
    stages = {}
    for name in STAGES:
        median = statistics.median(times[name])
        stages[name] = {
            "min_ms": min(times[name]) * 1e3,
            "median_ms": median * 1e3,
            "peak_mb": memory[name] / 2**20,
            "gflop": flops[name] / 1e9,
            "gflops_per_s": flops[name] / 1e9 / median,
        }
    return {
        "preset": args.preset,
        "weights": args.weights or "random",
        "path": "reference" if args.reference else "fast",
        "input": [args.batch_size, 3, height, width],
        "threads": torch.get_num_threads(),
        "runs": args.runs,
        "reuse_memory": args.reuse_memory,
        "warmup": args.warmup,
        "matmul_peak_gflops": peak_gflops,
        "onednn_matmul_peak_gflops": onednn_peak_gflops,
        "stages": stages,
        "total": {
            "min_ms": min(totals) * 1e3,
            "median_ms": statistics.median(totals) * 1e3,
            "peak_mb": whole.bytes / 2**20,
            "gflop": sum(flops.values()) / 1e9,
            "gflops_per_s": sum(flops.values()) / 1e9 / statistics.median(totals),
        },
        "memory_exact": freed and whole.available,
    }


def print_table(report: dict) -> None:
    batch, _, height, width = report["input"]
    print(
        f"mask2former bench: {report['preset']} ({report['weights']} weights), {report['path']} path, "
        f"input {batch}x3x{height}x{width}, {report['threads']} thread(s), "
        f"{report['runs']} runs after {report['warmup']} warm-up"
        + (", glibc reusing freed memory" if report["reuse_memory"] else "")
    )
    peak = report["matmul_peak_gflops"]
    onednn = report["onednn_matmul_peak_gflops"]
    also = f"; oneDNN on a prepacked weight: {onednn:.1f}" if onednn else ""
    print(f"fp32 matmul peak of this machine: torch.matmul {peak:.1f} GFLOP/s{also} (2048x2048 @ 2048x2048)")
    print("% peak is against torch.matmul's\n")
    header = ("min ms", "median ms", "peak MB", "GFLOP", "GFLOP/s", "% peak")
    print(f"{'stage':<20} " + " ".join(f"{h:>{w}}" for h, w in zip(header, (9, 10, 8, 8, 8, 7), strict=True)))
    rows = list(report["stages"].items()) + [("total", report["total"])]
    for name, row in rows:
        print(
            f"{name:<20} {row['min_ms']:9.1f} {row['median_ms']:10.1f} {row['peak_mb']:8.1f} "
            f"{row['gflop']:8.2f} {row['gflops_per_s']:8.1f} {100 * row['gflops_per_s'] / peak:7.1f}"
        )
    print(
        "\nGFLOP: matmul/convolution/attention kernels as counted by torch.utils.flop_counter "
        "(2 per multiply-add);\ngrid_sample, embedding_bag and index gathers, norms, softmax and "
        "elementwise ops are not counted,\nso GFLOP/s is a lower bound where a stage has them "
        "(deformable attention in the pixel decoder)."
    )
    how = (
        "glibc returning freed blocks"
        if report["memory_exact"]
        else "glibc may keep freed blocks: approximate"
    )
    print(f"peak MB: resident-set high-water mark added during the stage (VmHWM; {how}).")


def run(args: argparse.Namespace) -> int:
    report = measure(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0
