"""Deformable attention forward + backward: the fast corner-gather path vs the grid_sample reference.

Shapes of the R50 pixel decoder on a 1024x1024 input: levels 32x32, 64x64, 128x128, batch 1, d_model 256
(8 heads x 32), 4 points, every token a query (Lq = S = 21504). Sampling locations are what a pixel
decoder produces: each token's pixel centre plus the official initial ring offsets (1..4 pixels per
head direction) and Gaussian noise of 2 pixels, so some samples fall off the map (zero padding); attention
weights are a softmax of random logits. `--uniform` samples locations uniformly in [0, 1] instead (random
gathers over the whole map: the cache-unfriendly worst case).

Timing: both paths run in the same process, interleaved (ref, fast, ref, fast, ...) after one warm-up each,
so drifting machine load hits both alike; min and median of --runs.
Memory: each path runs in a fresh process whose glibc allocator returns blocks over 64 KiB to the OS at
once (MALLOC_MMAP_THRESHOLD_=65536), so the resident set follows the live tensors; the figure is the
high-water mark (VmHWM, reset through /proc/self/clear_refs) during the step minus the resident size before
it, after a warm-up step. Inputs are not counted; everything the step allocates, gradients included, is.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_deform_attn.py [--runs 5] [--threads 1] [--uniform]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from mask2former.modeling.deform_attn import ms_deform_attn_reference, offset_grid
from mask2former.modeling.deform_attn_fast import ms_deform_attn_fast
from mask2former.profiling import PeakMemory

PATHS = {"reference": ms_deform_attn_reference, "fast": ms_deform_attn_fast}


def make_inputs(size: int, heads: int, head_dim: int, points: int, uniform: bool, seed: int = 0):
    """value (1, S, M, D), locations (1, S, M, L, P, 2), attention (1, S, M, L, P), level shapes."""
    shapes = [(size // stride, size // stride) for stride in (32, 16, 8)]
    levels = len(shapes)
    tokens = sum(h * w for h, w in shapes)
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(1, tokens, heads, head_dim, generator=gen)
    if uniform:
        locations = torch.rand(1, tokens, heads, levels, points, 2, generator=gen)
    else:
        centres = []
        for h, w in shapes:
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            centres.append(torch.stack((xs.flatten(), ys.flatten()), -1))
        reference = torch.cat(centres)[None, :, None, None, None, :]  # (1, S, 1, 1, 1, 2)
        ring = offset_grid(heads, levels, points)  # (M, L, P, 2) pixels
        noise = 2.0 * torch.randn(1, tokens, heads, levels, points, 2, generator=gen)
        size_xy = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(levels, 1, 2)
        locations = reference + (ring + noise) / size_xy
    logits = torch.randn(1, tokens, heads, levels * points, generator=gen)
    attention = logits.softmax(-1).view(1, tokens, heads, levels, points)
    return value, locations, attention, shapes


def step(path: str, inputs, grad_output: torch.Tensor) -> tuple[float, float, list[torch.Tensor]]:
    """(forward seconds, backward seconds, [output, grad value, grad locations, grad attention])."""
    value, locations, attention, shapes = inputs
    leaves = [t.detach().requires_grad_() for t in (value, locations, attention)]
    start = time.perf_counter()
    output = PATHS[path](leaves[0], shapes, leaves[1], leaves[2])
    middle = time.perf_counter()
    output.backward(grad_output)
    end = time.perf_counter()
    return middle - start, end - middle, [output.detach()] + [leaf.grad for leaf in leaves]


def measure_memory(path: str, args) -> int:
    """Peak bytes allocated by one forward + backward, in this (fresh) process."""
    inputs = make_inputs(args.size, args.heads, args.head_dim, args.points, args.uniform)
    grad_output = torch.randn(1, inputs[0].shape[1], args.heads * args.head_dim)
    step(path, inputs, grad_output)  # warm-up: code pages, one-off buffers
    with PeakMemory() as peak:
        step(path, inputs, grad_output)
    return peak.bytes


def memory_in_subprocess(path: str, args) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, __file__, "--memory-of", path, "--size", str(args.size), "--threads", "1"]
    if args.uniform:
        command.append("--uniform")
    result = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def summary(values: list[float]) -> str:
    return f"{min(values) * 1e3:8.1f} {statistics.median(values) * 1e3:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="input image side (levels at /32, /16, /8)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--uniform", action="store_true", help="uniform random locations (worst case)")
    parser.add_argument("--memory-of", choices=list(PATHS), help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_bytes": measure_memory(args.memory_of, args)}))
        return

    inputs = make_inputs(args.size, args.heads, args.head_dim, args.points, args.uniform)
    grad_output = torch.randn(1, inputs[0].shape[1], args.heads * args.head_dim, generator=torch.Generator())
    results = {path: step(path, inputs, grad_output)[2] for path in PATHS}  # warm-up + parity
    names = ("output", "grad value", "grad locations", "grad attention")
    for name, fast, ref in zip(names, results["fast"], results["reference"], strict=True):
        print(f"max |fast - reference| {name:15s} {(fast - ref).abs().max().item():.2e}")
    # Bilinear interpolation has no derivative where a pixel coordinate is an integer: there the two paths may
    # round to different sides and take different one-sided derivatives. Compare away from those kinks.
    shapes = inputs[3]
    size_xy = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(len(shapes), 1, 2)
    pixels = inputs[1] * size_xy - 0.5
    smooth = (pixels - pixels.round()).abs() > 1e-4
    difference = (results["fast"][2] - results["reference"][2]).abs()
    scale = results["reference"][2].abs().max().item()
    print(
        f"max |fast - reference| grad locations off kinks {difference[smooth].max().item():.2e} "
        f"(gradients up to {scale:.0f}; {int((~smooth).sum())} coordinates within 1e-4 px of a kink)"
    )

    times = {path: ([], [], []) for path in PATHS}
    for _ in range(args.runs):
        for path in PATHS:
            forward, backward, _ = step(path, inputs, grad_output)
            for bucket, seconds in zip(times[path], (forward, backward, forward + backward), strict=True):
                bucket.append(seconds)
    memory = {} if args.no_memory else {path: memory_in_subprocess(path, args) for path in PATHS}

    levels = ", ".join(f"{h}x{w}" for h, w in inputs[3])
    where = "uniform" if args.uniform else "decoder-like"
    print(
        f"\nlevels {levels}, Lq {inputs[0].shape[1]}, {args.heads} heads x {args.head_dim}, "
        f"{args.points} points, {where} locations, {args.threads} thread(s), {args.runs} runs"
    )
    print(f"{'path':10s} {'forward ms':>17s} {'backward ms':>17s} {'fwd+bwd ms':>17s} {'peak MB':>9s}")
    print(f"{'':10s} {'min   median':>17s} {'min   median':>17s} {'min   median':>17s}")
    for path in PATHS:
        peak = f"{memory[path] / 2**20:9.0f}" if memory else f"{'-':>9s}"
        print(
            f"{path:10s} {summary(times[path][0])} {summary(times[path][1])} {summary(times[path][2])} {peak}"
        )
    ref, fast = times["reference"][2], times["fast"][2]
    paired = [r / f for r, f in zip(ref, fast, strict=True)]
    print(
        f"\nspeed-up fwd+bwd: {min(ref) / min(fast):.2f}x (min/min), "
        f"{statistics.median(paired):.2f}x (median of paired runs)"
    )
    if memory:
        print(f"peak memory: fast / reference = {memory['fast'] / memory['reference']:.2f}")


if __name__ == "__main__":
    main()
