"""Peak memory of the point-sampled mask loss vs the full-resolution mask loss (forward + backward).

The paper credits point sampling with cutting training memory 3x (18 GB -> 6 GB). This measures the mask
loss alone on the same batch: B images, Q queries, T targets per image at S x S, predictions at S/4.
- point: SetCriterion.loss_masks (importance-sampled points, PointRend) on the matched pairs;
- full:  the matched predictions upsampled bilinearly to S x S, BCE (mean over pixels) + dice there
         (MaskFormer's loss before point sampling).
The matching is computed once beforehand and is the same for both.

How memory is measured on CPU. PyTorch keeps no allocator statistics for CPU tensors, and the profiler's
memory events do not give a time-ordered peak, so each variant runs in a fresh process whose glibc
allocator returns every block over 64 KiB to the OS at once (MALLOC_MMAP_THRESHOLD_=65536, which also
stops glibc from raising the threshold). The resident set size then follows the live tensors, and the
figure is the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident
size just before the measured step, after one warm-up step (so code pages and one-off buffers are not
counted). Inputs (predictions, float targets) exist before the step and are not counted; the gradient of
the predictions is. Linux only.

Run: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_point_loss_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from mask2former.training.criterion import SetCriterion, dice_loss, sigmoid_ce_loss
from mask2former.training.matcher import HungarianMatcher


def make_batch(batch: int, queries: int, targets: int, size: int, num_classes: int):
    generator = torch.Generator().manual_seed(0)
    pred_masks = torch.randn(batch, queries, size // 4, size // 4, generator=generator).requires_grad_()
    pred_logits = torch.randn(batch, queries, num_classes + 1, generator=generator)
    target_list = []
    for i in range(batch):
        # Blocky random masks at 1/16 upsampled to full size: object-like regions, float32 as in training.
        coarse = torch.rand(targets, 1, size // 16, size // 16, generator=generator) > 0.7
        masks = F.interpolate(coarse.float(), size=(size, size), mode="nearest")[:, 0]
        labels = torch.randint(0, num_classes, (targets,), generator=generator)
        target_list.append({"labels": labels, "masks": masks, "point_seed": i})
    return {"pred_logits": pred_logits, "pred_masks": pred_masks}, target_list


def full_resolution_loss(pred_masks, targets, indices, num_masks):
    """BCE + dice on the matched predictions upsampled to the target size."""
    logits, labels = [], []
    for b, (target, (pred_idx, tgt_idx)) in enumerate(zip(targets, indices, strict=True)):
        size = target["masks"].shape[-2:]
        logits.append(
            F.interpolate(pred_masks[b, pred_idx][:, None], size=size, mode="bilinear", align_corners=False)[
                :, 0
            ].flatten(1)
        )
        labels.append(target["masks"][tgt_idx].flatten(1))
    logits, labels = torch.cat(logits), torch.cat(labels)
    return sigmoid_ce_loss(logits, labels, num_masks) + dice_loss(logits, labels, num_masks)


def rss_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(variant: str, args) -> dict:
    """One variant in this process: warm-up step, then the measured step."""
    torch.manual_seed(0)
    outputs, targets = make_batch(args.batch, args.queries, args.targets, args.size, args.num_classes)
    matcher = HungarianMatcher(num_points=args.points)
    criterion = SetCriterion(args.num_classes, matcher, num_points=args.points)
    indices = criterion.matcher(outputs, targets)
    num_masks = float(sum(len(t["labels"]) for t in targets))

    def step():
        if variant == "point":
            losses = criterion.loss_masks(
                outputs["pred_masks"], targets, indices, num_masks, layer=0, generator=None
            )
            loss = losses["loss_mask"] + losses["loss_dice"]
        else:
            loss = full_resolution_loss(outputs["pred_masks"], targets, indices, num_masks)
        loss.backward()
        return loss.item()

    step()
    outputs["pred_masks"].grad = None
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current resident size
    before = rss_bytes("VmRSS")
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    return {"variant": variant, "peak_bytes": rss_bytes("VmHWM") - before, "seconds": seconds, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--targets", type=int, default=20, help="target masks per image")
    parser.add_argument("--size", type=int, default=512, help="target size; predictions are size/4")
    parser.add_argument("--points", type=int, default=12544)
    parser.add_argument("--num-classes", type=int, default=133)
    parser.add_argument("--variant", choices=["point", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results = {}
    for variant in ("point", "full"):
        command = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        results[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
    print(
        f"B={args.batch} Q={args.queries} targets/image={args.targets} targets {args.size}^2, "
        f"predictions {args.size // 4}^2, {args.points} points; mask loss forward + backward"
    )
    for variant, label in (("point", "point-sampled"), ("full", "full-resolution")):
        r = results[variant]
        print(
            f"  {label:16s} peak {r['peak_bytes'] / 2**20:8.1f} MiB   {r['seconds'] * 1000:7.1f} ms   "
            f"loss {r['loss']:.4f}"
        )
    ratio = results["full"]["peak_bytes"] / max(results["point"]["peak_bytes"], 1)
    print(f"  full / point peak memory: {ratio:.1f}x")


if __name__ == "__main__":
    main()
