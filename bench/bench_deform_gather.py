"""The gather kernel (`ms_deform_attn_gather`) against the grid_sample reference, on any device and dtype.

`ms_deform_attn_gather` is what MSDeformAttn runs outside eager CPU float32/float64: on CUDA, and for
bf16/fp16 on the CPU (`modeling.kernels`, deform_attn="auto"). This measures it where it runs: on CUDA when
present (fp32 and fp16), and on the CPU in fp32 and bf16 otherwise. Shapes: the R50 pixel decoder's three
levels for a --size x --size input, every token a query, decoder-like locations (bench_deform_attn.py).
Both kernels run interleaved in one process; min and median over --runs, forward and forward + backward.
The numbers of the two kernels are compared first (max |difference| of the output, in float32).

Run: .venv/bin/python bench/bench_deform_gather.py [--device cuda] [--size 512] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_deform_attn import make_inputs  # noqa: E402

from mask2former.modeling.deform_attn import ms_deform_attn_gather, ms_deform_attn_reference  # noqa: E402

KERNELS = {"reference": ms_deform_attn_reference, "gather": ms_deform_attn_gather}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(kernel: str, inputs, device: torch.device, backward: bool) -> float:
    value, locations, attention, shapes = inputs
    leaves = [t.detach().requires_grad_(backward) for t in (value, locations, attention)]
    _sync(device)
    start = time.perf_counter()
    output = KERNELS[kernel](leaves[0], shapes, leaves[1], leaves[2])
    if backward:
        output.float().square().mean().backward()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtypes", default=None, help="comma list (default: fp32,fp16 on CUDA, fp32,bf16 on CPU)"
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    default = "fp32,fp16" if device.type == "cuda" else "fp32,bf16"
    base = make_inputs(args.size, 8, 32, 4, uniform=False)
    print(
        f"device {device}, size {args.size}, Lq {base[0].shape[1]}, "
        f"{args.runs} runs, {args.threads} thread(s)"
    )
    print(
        f"{'dtype':6s} {'kernel':10s} {'max|diff|':>10s} {'fwd ms min/med':>16s} {'fwd+bwd ms min/med':>20s}"
    )
    for name in (args.dtypes or default).split(","):
        dtype = DTYPES[name]
        inputs = [t.to(device, dtype) for t in base[:3]] + [base[3]]
        with torch.no_grad():
            value, locations, attention = (t.float() for t in inputs[:3])
            expected = ms_deform_attn_reference(value, inputs[3], locations, attention)
            got = ms_deform_attn_gather(inputs[0], inputs[3], inputs[1], inputs[2]).float()
        difference = (got - expected).abs().max().item()
        times = {kernel: ([], []) for kernel in KERNELS}
        for kernel in KERNELS:  # warm-up
            run(kernel, inputs, device, backward=True)
        for _ in range(args.runs):
            for kernel in KERNELS:
                times[kernel][0].append(run(kernel, inputs, device, backward=False))
                times[kernel][1].append(run(kernel, inputs, device, backward=True))
        for kernel, (forward, both) in times.items():
            diff = f"{difference:10.2e}" if kernel == "gather" else f"{'-':>10s}"
            print(
                f"{name:6s} {kernel:10s} {diff} {min(forward) * 1e3:7.1f} "
                f"{statistics.median(forward) * 1e3:7.1f}  {min(both) * 1e3:9.1f} "
                f"{statistics.median(both) * 1e3:9.1f}"
            )
        ratio_f = statistics.median(times["reference"][0]) / statistics.median(times["gather"][0])
        ratio_b = statistics.median(times["reference"][1]) / statistics.median(times["gather"][1])
        print(
            f"{name:6s} gather speed-up over the reference: forward {ratio_f:.2f}x, "
            f"forward+backward {ratio_b:.2f}x"
        )


if __name__ == "__main__":
    main()
