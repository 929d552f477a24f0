"""`mask2former synth DIR`: write the synthetic scenes dataset (COCO panoptic + semantic PNGs)."""

from __future__ import annotations

import re
import time

from mask2former.cli import UserError, example


def parse_size(text: str) -> tuple[int, int]:
    """ "128x96" -> (128, 96) as (H, W); a single number gives a square."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise UserError(f"--size {text!r}: expected HxW, e.g. 128x128")
    height = int(match.group(1))
    width = int(match.group(2)) if match.group(2) else height
    return height, width


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic scenes dataset (COCO panoptic format + semantic label PNGs)",
        epilog=example("mask2former synth runs/synth-val --n 200 --seed 2"),
    )
    parser.add_argument("dir", help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--n", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--size", default="128x128", help="image size HxW (default 128x128)")
    parser.add_argument(
        "--classes",
        default=None,
        help="comma-separated classes to draw (default: the bundled model's circle,square,triangle,star,ring,"
        "sky,grass,water,wall; also hexagon and cross), e.g. circle,hexagon,cross,sky,water",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse a non-empty folder, replacing a previous synthetic set in it",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from mask2former.cli.checks import (
        NON_NEGATIVE,
        Range,
        check_input_size,
        check_number,
        check_output_folder,
    )
    from mask2former.data.synth import generate

    size = parse_size(args.size)
    check_number("--n", args.n, Range(0, 10_000_000))
    check_number("--seed", args.seed, NON_NEGATIVE)
    if min(size) < 16:
        raise UserError(f"--size {args.size}: height and width must be at least 16")
    check_input_size("--size", size)
    check_output_folder("dir", args.dir)
    start = time.perf_counter()
    try:
        classes = [name.strip() for name in args.classes.split(",") if name.strip()] if args.classes else None
        panoptic = generate(
            args.dir, args.n, seed=args.seed, size=size, overwrite=args.overwrite, classes=classes
        )
    except ValueError as error:
        raise UserError(
            f"--classes {args.classes}: {error}" if "classes" in str(error) else str(error)
        ) from None
    except FileExistsError as error:
        raise UserError(str(error)) from None
    except OSError as error:
        raise UserError(f"{args.dir}: cannot write ({error.strerror or error})") from None
    segments = sum(len(a["segments_info"]) for a in panoptic["annotations"])
    print(
        f"wrote {args.n} images ({segments} segments, {size[0]}x{size[1]}) to {args.dir} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0
