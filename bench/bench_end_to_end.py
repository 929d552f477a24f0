"""R50 panoptic end to end (forward + panoptic post-processing) at 800x1088 on CPU: our fast path against our
reference path and against Hugging Face transformers' eager Mask2Former.

- fast: the module `mask2former predict` runs, the Predictor's private copy (`TorchRunner.inference_model()`:
  FrozenBN folded, oneDNN layers), the corner-gather deformable attention, intermediate masks at
  attention-mask size, official panoptic post-processing (`profiling.run_stages`).
- fast bf16 (where the CPU has native bf16, unless --no-bf16): the same in bf16, as `predict --dtype bf16`
  runs it; its agreement with fp32 is printed (pred_masks sign, argmax class of each query).
- reference: the same weights unfolded, grid_sample deformable attention, every intermediate mask at
  full resolution (the decoder run with aux outputs, then dropped), same post-processing.
- allocators: every contender runs under the glibc malloc settings its users get. Ours (fast, fast bf16,
  reference) under what `predict` sets (`glibc.keep_freed_memory`, via TorchRunner.reuse_memory), Hugging
  Face under glibc's defaults. Unless --no-allocator-variants, two more rows swap them: "fast, default
  allocator" and "huggingface, reuse memory" (the same allocator as ours), so the ratio between the models
  alone is printed too.
- huggingface: transformers' Mask2FormerForUniversalSegmentation with a ResNet-50 backbone (bottleneck
  [3, 4, 6, 3], 256..2048; 100 queries, 9 decoder layers, 6 encoder layers), built offline, eager, then its
  image processor's post_process_panoptic_segmentation at the input size. It gets our random weights through
  `checkpoints.huggingface.write_hf_folder` + from_pretrained (offline), so both compute the same function
  (the bench prints how far apart the outputs are); without that converter it falls back to the same
  architecture with independent random weights. Post-processing keeps almost no query for a random model
  (scores below 0.8), so it costs little everywhere.

Same input tensor for all, 1 thread by default, torch.inference_mode. The first run of each contender is an
untimed warm-up (and the fast/reference parity check); then --runs rounds, interleaved (fast, reference,
huggingface, fast, ...) so drifting machine load hits all alike; min, median and median of per-round ratios.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_end_to_end.py [--runs 3] [--threads 1] [--size 800x1088]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
import warnings

import torch

import mask2former
from mask2former.inference.precision import cpu_supports
from mask2former.inference.predictor import TorchRunner
from mask2former.modeling.kernels import use_kernels
from mask2former.profiling import STAGES, allocator, run_stages


def build_huggingface(model: torch.nn.Module, config) -> tuple[torch.nn.Module, str]:
    """(HF Mask2FormerForUniversalSegmentation with `model`'s weights, how they were obtained).

    Through our checkpoint converter when it is there (write_hf_folder, then from_pretrained offline);
    otherwise the same architecture from a Mask2FormerConfig with independent random weights."""
    import tempfile

    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    from transformers.utils import logging

    logging.set_verbosity_error()  # "resnet is not a supported backbone" is about pretrained weights only
    try:
        from mask2former.checkpoints.huggingface import write_hf_folder
    except ImportError:
        write_hf_folder = None
    if write_hf_folder is not None:
        with tempfile.TemporaryDirectory() as folder:
            write_hf_folder(model.state_dict(), config, folder)
            hf = Mask2FormerForUniversalSegmentation.from_pretrained(folder)
        return hf.eval(), "the same weights (checkpoints.huggingface.write_hf_folder)"
    backbone = ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    hf_config = Mask2FormerConfig(
        backbone_config=backbone, num_labels=config.num_classes, use_pretrained_backbone=False
    )
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(hf_config).eval(), "independent random weights"


def huggingface_processor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from transformers import Mask2FormerImageProcessorPil as Processor
        except ImportError:  # older transformers
            from transformers import Mask2FormerImageProcessor as Processor
    return Processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="coco-panoptic-r50")
    parser.add_argument("--size", default="800x1088", help="HxW, multiples of 32")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-huggingface", action="store_true")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 runs")
    parser.add_argument(
        "--no-allocator-variants",
        action="store_true",
        help="skip the 'fast, default allocator' and 'huggingface, reuse memory' runs",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    height, width = (int(side) for side in args.size.split("x"))

    config = mask2former.get_preset(args.preset)
    model = mask2former.build(config, seed=0).requires_grad_(False)
    reference_model = copy.deepcopy(model).eval()
    fast_model = TorchRunner(model).inference_model()
    bf16 = not args.no_bf16 and cpu_supports(torch.bfloat16)
    bf16_model = TorchRunner(model, dtype="bf16").inference_model() if bf16 else None
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    stage_times: dict[str, dict[str, list[float]]] = {"fast": {}, "fast bf16": {}, "reference": {}}

    def timed_stages(path: str):
        @contextlib.contextmanager
        def context(name: str):
            start = time.perf_counter()
            yield
            stage_times[path].setdefault(name, []).append(time.perf_counter() - start)

        return context

    def fast(timed: bool = True, path: str = "fast") -> None:
        run_stages(fast_model, images, config, timed_stages(path) if timed else _untimed)

    def reference(timed: bool = True) -> None:
        with use_kernels(deform_attn="reference"):
            run_stages(
                reference_model,
                images,
                config,
                timed_stages("reference") if timed else _untimed,
                full_resolution_masks=True,
            )

    def fast_bf16(timed: bool = True) -> None:
        run_stages(bf16_model, images.bfloat16(), config, timed_stages("fast bf16") if timed else _untimed)

    # name -> (run, glibc allocator mode it runs under: profiling.ALLOCATOR_MODES)
    contenders = {"fast": (fast, "reuse"), "reference": (reference, "reuse")}
    if bf16:
        contenders["fast bf16"] = (fast_bf16, "reuse")
    if not args.no_allocator_variants:
        stage_times["fast, default allocator"] = {}
        contenders["fast, default allocator"] = (
            lambda timed=True: fast(timed, "fast, default allocator"),
            "default",
        )
    if not args.no_huggingface:
        hf_model, provenance = build_huggingface(reference_model, config)
        hf_model.requires_grad_(False)
        processor = huggingface_processor()
        print(f"Hugging Face model: {provenance}")

        def huggingface(timed: bool = True) -> None:
            with torch.inference_mode():
                outputs = hf_model(pixel_values=images)
                processor.post_process_panoptic_segmentation(outputs, target_sizes=[(height, width)])

        contenders["huggingface"] = (huggingface, "default")
        if not args.no_allocator_variants:
            contenders["huggingface, reuse memory"] = (huggingface, "reuse")
        ours = sum(p.numel() for p in reference_model.parameters()) / 1e6
        theirs = sum(p.numel() for p in hf_model.parameters()) / 1e6
        print(f"parameters: ours {ours:.2f}M, Hugging Face {theirs:.2f}M")

    # Warm-up, and the parity of the two paths of our model on this input.
    with torch.inference_mode():
        got = fast_model(images)
        with use_kernels(deform_attn="reference"):
            expected = reference_model(images, return_aux=True)
    for key in ("pred_logits", "pred_masks"):
        difference = (got[key] - expected[key]).abs().max().item()
        print(
            f"max |fast - reference| {key}: {difference:.2e} (values up to {expected[key].abs().max():.1f})"
        )
    if bf16:
        with torch.inference_mode():
            half = bf16_model(images.bfloat16(), return_aux=False)
        sign = ((half["pred_masks"] > 0) == (got["pred_masks"] > 0)).float().mean().item()
        argmax = (half["pred_logits"].argmax(-1) == got["pred_logits"].argmax(-1)).float().mean().item()
        print(f"bf16 vs fp32: pred_masks same sign {sign:.4%}, argmax class per query same {argmax:.2%}")
    if "huggingface" in contenders:
        with torch.inference_mode():
            theirs = hf_model(pixel_values=images)
        for key, hf_key in (("pred_logits", "class_queries_logits"), ("pred_masks", "masks_queries_logits")):
            difference = (got[key] - getattr(theirs, hf_key)).abs().max().item()
            print(f"max |fast - huggingface| {key}: {difference:.2e}")
    for run, mode in contenders.values():
        with allocator(mode):
            run(timed=False)
    for times in stage_times.values():
        times.clear()

    totals: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.runs):
        for name, (run, mode) in contenders.items():
            with allocator(mode):
                start = time.perf_counter()
                run()
                totals[name].append(time.perf_counter() - start)

    print(
        f"\n{args.preset} (random weights), input 1x3x{height}x{width}, {args.threads} thread(s), "
        f"{args.runs} interleaved runs after 1 warm-up"
    )
    print(f"{'':26s} {'min s':>7s} {'median s':>9s} {'max s':>7s}   per-stage median s ({', '.join(STAGES)})")
    for name, values in totals.items():
        stages = stage_times.get(name, {})
        per_stage = " ".join(f"{statistics.median(stages[s]):6.2f}" for s in STAGES) if stages else ""
        print(
            f"{name:26s} {min(values):7.2f} {statistics.median(values):9.2f} {max(values):7.2f}   {per_stage}"
        )
    comparisons = [
        (mine, name)
        for mine in ("fast", "fast bf16")
        for name in ("reference", "huggingface", "huggingface, reuse memory")
    ]
    comparisons.append(("fast", "fast, default allocator"))
    for mine, name in comparisons:
        if name not in contenders or mine not in contenders:
            continue
        paired = [other / ours for other, ours in zip(totals[name], totals[mine], strict=True)]
        print(
            f"{mine} vs {name}: {min(totals[name]) / min(totals[mine]):.2f}x faster (min/min), "
            f"{statistics.median(paired):.2f}x (median of paired runs)"
        )


@contextlib.contextmanager
def _untimed_context():
    yield


def _untimed(name: str):
    return _untimed_context()


if __name__ == "__main__":
    main()
