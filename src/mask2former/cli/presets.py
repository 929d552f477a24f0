"""`mask2former presets`: list the named model-zoo architectures."""

from __future__ import annotations

import argparse

from mask2former.cli import example


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "presets",
        help="list the named presets (official model-zoo architectures)",
        epilog=example("mask2former presets"),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mask2former.checkpoints.zoo import BUNDLED, RELEASES, home, is_our_format
    from mask2former.config import PRESETS

    print(
        f"{'preset':<24} {'task':<9} {'backbone':<26} {'classes':>7} {'things':>6} {'queries':>7}  "
        f"{'test size':<10} weights"
    )
    for name, make in PRESETS.items():
        config = make()
        bb = config.backbone
        backbone = (
            f"resnet{sum(bb.layers) * 3 + 2} {tuple(bb.layers)}"
            if bb.kind == "resnet"
            else f"swin d={bb.embed_dim} {tuple(bb.depths)}"
        )
        inp = config.input
        size = f"{inp.short_edge}/{inp.max_size}" if inp.mode == "official" else "x".join(map(str, inp.size))
        print(
            f"{name:<24} {config.task:<9} {backbone:<26} {config.num_classes:>7} "
            f"{sum(config.thing_classes):>6} "
            f"{config.decoder.num_queries:>7}  {size:<10} "
            f"{_weights(name, RELEASES, BUNDLED, home(), is_our_format)}"
        )
    print(
        f"released weights are downloaded on first use into {home()} (MASK2FORMER_HOME), e.g. --weights NAME"
    )
    return 0


def _weights(name, releases, bundled, cache, is_our_format) -> str:
    """released (cached) / released / bundled / none."""
    if name in bundled:
        return "bundled"
    if name in releases:
        return "released (cached)" if is_our_format(cache / "models" / name) else "released"
    return "none"
