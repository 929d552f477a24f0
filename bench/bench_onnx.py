"""ONNX Runtime vs the eager path `mask2former predict` runs, same threads, same input, one process.

    OMP_NUM_THREADS=2 python bench/bench_onnx.py                       # R50 at 512x512 and 800x1088
    python bench/bench_onnx.py --preset synth-tiny --sizes 192x192 --int8 --calibrate runs/synth-tune

Random weights unless --weights (latency does not depend on them). Each size is exported as a fixed-size
graph (the parity report against eager is printed on the way: fp32, and fp16 / int8 when asked); then every
contender maps the same normalised padded batch to pred_logits / pred_masks, `--repeats` interleaved rounds
after one warm-up, min / median / max in ms, and the median of per-round ratios against eager fp32:
- eager fp32 (and bf16 with --bf16): the Predictor's runner, `TorchRunner` of `mask2former.load`, i.e. the
  private optimised copy (FrozenBN folded, oneDNN layers, fast deformable attention) `predict` runs;
- ort fp32 / fp16 / int8: `OnnxRunner`, what `predict --weights model.onnx` runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from timing import interleaved, paired_ratio, spread

from mask2former.api import resolve_model
from mask2former.export.onnx import export_onnx
from mask2former.export.ops import load_graph, op_inventory
from mask2former.export.runtime import OnnxRunner
from mask2former.inference.predictor import TorchRunner


def bench_size(args, loaded, size, folder: Path) -> None:
    model, config = loaded.model, loaded.config
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    runs = {"eager fp32": TorchRunner(model, dtype="fp32")}
    if args.bf16:
        runs["eager bf16"] = TorchRunner(model, dtype="bf16")
    precisions = ["fp32"] + (["fp16"] if args.fp16 else []) + (["int8"] if args.int8 else [])
    gmacs = None
    for precision in precisions:
        out = folder / f"{config.name}-{size[0]}x{size[1]}-{precision}.onnx"
        calibration = None
        if precision == "int8":
            from mask2former.export.quantize import calibration_images

            calibration = calibration_images(args.calibrate, args.calibration_images)
        start = time.perf_counter()
        export_onnx(
            model,
            config,
            out,
            size,
            fp16=precision == "fp16",
            trained=loaded.trained,
            threads=args.threads,
            int8_calibration=calibration,
        )
        print(f"exported {precision} {size[0]}x{size[1]} in {time.perf_counter() - start:.1f} s")
        if precision == "fp32":
            gmacs = op_inventory(load_graph(out)).total_macs / 1e9
        runs[f"ort {precision}"] = OnnxRunner(out, threads=args.threads)
    times = interleaved({name: (lambda run=run: run(images)) for name, run in runs.items()}, args.repeats)
    print(f"\n{size[0]}x{size[1]}: {gmacs:.1f} GMAC, min / median / max ms over {args.repeats} rounds")
    for name, values in times.items():
        versus = paired_ratio(times["eager fp32"], values)
        print(f"  {name:<12} {spread(values):>22}   eager fp32 / this: {versus:.2f}x")
    if "ort int8" in times:
        print(f"  ort fp32 / ort int8: {paired_ratio(times['ort fp32'], times['ort int8']):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="coco-panoptic-r50")
    parser.add_argument("--weights", default=None, help="checkpoint (default: random weights of --preset)")
    parser.add_argument("--sizes", nargs="+", default=["512x512", "800x1088"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="also time eager bf16")
    parser.add_argument("--fp16", action="store_true", help="also time an fp16 graph")
    parser.add_argument("--int8", action="store_true", help="also time an int8 graph (needs --calibrate)")
    parser.add_argument("--calibrate", help="calibration images for --int8")
    parser.add_argument("--calibration-images", type=int, default=32)
    args = parser.parse_args()
    if args.int8 and not args.calibrate:
        parser.error("--int8 needs --calibrate DIR")
    torch.set_num_threads(args.threads)
    loaded = resolve_model(args.weights, None if args.weights else args.preset)
    print(f"{loaded.config.name} from {loaded.source}, {args.threads} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        for text in args.sizes:
            height, width = (int(v) for v in text.lower().split("x"))
            bench_size(args, loaded, (height, width), Path(folder))


if __name__ == "__main__":
    main()
