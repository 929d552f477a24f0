"""Accuracy and speed of each precision on the bundled model: PQ / mIoU on held-out synthetic scenes for eager
fp32 / bf16 (/ fp16 where the CPU has it) and ONNX Runtime fp32 / fp16 / int8, all in one process.

    mask2former synth runs/synth-val --n 200 --seed 2      # held-out scenes (the README's figures)
    mask2former synth runs/synth-tune --n 200 --seed 3     # int8 calibration images, never the held-out ones
    OMP_NUM_THREADS=2 python bench/bench_precision.py --data runs/synth-val --calibrate runs/synth-tune

Every contender is a Predictor built the way the commands build it: `mask2former.load(dtype=...)` (what
`predict/eval --dtype` run) and `mask2former.load("model.onnx")` (what `predict/eval --weights model.onnx`
run) on dynamic graphs exported by `export_onnx`, so pre- and post-processing are identical (the model's own
test-time scale). Scores come from `evaluate_model`, as `mask2former eval` prints them. Latency: the
runners alone on one pre-processed scene, `--repeats` interleaved rounds after a warm-up, min / median / max,
and the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import interleaved, paired_ratio, spread

import mask2former
from mask2former.api import resolve_model
from mask2former.data.image_io import list_images, load_image
from mask2former.evaluation.model import evaluate_model
from mask2former.export.onnx import export_onnx
from mask2former.export.quantize import calibration_images
from mask2former.inference.precision import cpu_supports


def export_graphs(folder: Path, calibrate: str, count: int, threads: int) -> dict[str, Path]:
    loaded = resolve_model()
    size = (loaded.config.input.short_edge,) * 2
    graphs = {}
    for precision in ("fp32", "fp16", "int8"):
        out = folder / f"{precision}.onnx"
        calibration = calibration_images(calibrate, count) if precision == "int8" else None
        print(f"export {precision}:")
        export_onnx(
            loaded.model,
            loaded.config,
            out,
            size,
            dynamic=True,
            fp16=precision == "fp16",
            trained=True,
            source=loaded.source,
            threads=threads,
            int8_calibration=calibration,
            log=lambda line: print("  " + line),
        )
        graphs[precision] = out
    return graphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/synth-val", help="held-out dataset folder")
    parser.add_argument("--calibrate", default="runs/synth-tune", help="int8 calibration images")
    parser.add_argument("--calibration-images", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="score the first N scenes only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = ["fp32", "bf16"] + (["fp16"] if cpu_supports(torch.float16) else [])
    with tempfile.TemporaryDirectory() as folder:
        graphs = export_graphs(Path(folder), args.calibrate, args.calibration_images, args.threads)
        predictors = {f"eager {name}": mask2former.load(dtype=name) for name in dtypes}
        predictors.update({f"ort {name}": mask2former.load(path) for name, path in graphs.items()})
        scores = {}
        for name, predictor in predictors.items():
            quiet = {"progress": False, "log": lambda line: None, "limit": args.limit}
            panoptic = evaluate_model(predictor, args.data, "panoptic", **quiet)
            semantic = evaluate_model(predictor, args.data, "semantic", **quiet)
            scores[name] = (panoptic["PQ"], semantic["mIoU"])
            print(f"{name:<11} PQ {panoptic['PQ']:6.2f}  mIoU {semantic['mIoU']:6.2f}")
        scene = load_image(list_images(str(Path(args.data) / "images"))[0])
        fp32 = predictors["eager fp32"]
        batch = fp32.preprocess(scene).tensor
        runners = {name: (lambda p=p: p.runner(batch)) for name, p in predictors.items()}
        times = interleaved(runners, args.repeats)
    count = args.limit or len(list_images(str(Path(args.data) / "images")))
    reference = scores["eager fp32"]
    print(
        f"\nbundled model, {count} scenes of {args.data}, {args.threads} threads, torch {torch.__version__}; "
        f"latency of the runner on one {batch.shape[-2]}x{batch.shape[-1]} input, {args.repeats} rounds"
    )
    print(
        f"{'':<11} {'PQ':>6} {'dPQ':>6} {'mIoU':>6} {'dmIoU':>6} {'min/median/max ms':>20} {'fp32/this':>9}"
    )
    for name, (pq, miou) in scores.items():
        ratio = paired_ratio(times["eager fp32"], times[name])
        print(
            f"{name:<11} {pq:6.2f} {pq - reference[0]:+6.2f} {miou:6.2f} {miou - reference[1]:+6.2f} "
            f"{spread(times[name]):>20} {ratio:8.2f}x"
        )
    print(
        f"ort fp32 / ort int8: {paired_ratio(times['ort fp32'], times['ort int8']):.2f}x (median of rounds)"
    )


if __name__ == "__main__":
    main()
