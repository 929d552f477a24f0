"""Eager PyTorch vs ONNX Runtime latency of one forward pass, same threads, same input, one run.

    OMP_NUM_THREADS=2 python bench/bench_onnx.py                       # R50 at 512x512 and 800x1088
    python bench/bench_onnx.py --sizes 512x512 --repeats 5 --fp16

Random weights (latency does not depend on them). Each size is exported as a fixed-size graph (the parity
report against eager is printed on the way), then both backends run `--repeats` times, interleaved, after
one warm-up; the median is reported with the ratio eager / onnxruntime (> 1: ONNX Runtime is faster).
Eager runs the model exactly as `mask2former predict` does (inference mode, fp32).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mask2former.config import get_preset
from mask2former.export.onnx import export_onnx
from mask2former.export.ops import load_graph, op_inventory
from mask2former.export.runtime import OnnxRunner
from mask2former.modeling.build import build_model


def median_seconds(runs: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each callable in `runs`, interleaved so that load from other processes on a
    shared machine hits both backends alike."""
    for run in runs.values():
        run()  # warm-up: first-call allocations and lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_size(model, config, size, threads, repeats, fp16, folder: Path) -> dict:
    out = folder / f"{config.name}-{size[0]}x{size[1]}.onnx"
    start = time.perf_counter()
    export_onnx(model, config, out, size, fp16=fp16, trained=False, threads=threads)
    export_seconds = time.perf_counter() - start
    macs = op_inventory(load_graph(out)).total_macs
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    runner = OnnxRunner(out, threads=threads)

    def eager():
        with torch.inference_mode():
            model(images, return_aux=False)

    medians = median_seconds({"eager": eager, "ort": lambda: runner(images)}, repeats)
    return {
        "size": size,
        "gmacs": macs / 1e9,
        "export_s": export_seconds,
        "eager_s": medians["eager"],
        "ort_s": medians["ort"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="coco-panoptic-r50")
    parser.add_argument("--sizes", nargs="+", default=["512x512", "800x1088"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp16", action="store_true", help="time an fp16 graph against fp32 eager")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = get_preset(args.preset)
    torch.manual_seed(0)
    model = build_model(config).eval()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for text in args.sizes:
            height, width = (int(v) for v in text.lower().split("x"))
            rows.append(
                bench_size(
                    model, config, (height, width), args.threads, args.repeats, args.fp16, Path(folder)
                )
            )
    kind = "fp16 graph" if args.fp16 else "fp32 graph"
    print(
        f"\n{args.preset}, {args.threads} threads, median of {args.repeats}, {kind}, "
        f"torch {torch.__version__}"
    )
    print(f"{'size':>10} {'GMAC':>8} {'export s':>9} {'eager ms':>9} {'ORT ms':>9} {'eager/ORT':>9}")
    for row in rows:
        size = f"{row['size'][0]}x{row['size'][1]}"
        print(
            f"{size:>10} {row['gmacs']:>8.1f} {row['export_s']:>9.1f} {row['eager_s'] * 1e3:>9.0f} "
            f"{row['ort_s'] * 1e3:>9.0f} {row['eager_s'] / row['ort_s']:>9.2f}"
        )


if __name__ == "__main__":
    main()
