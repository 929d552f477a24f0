"""`mask2former convert`: official detectron2 / Hugging Face / our checkpoints, in and out.

    mask2former convert model_final_f07440.pkl r50-panoptic/            # detectron2 -> ours
    mask2former convert hf-folder/ ours/ --from hf
    mask2former convert ours/ model.pkl --to detectron2                  # or model.pth
    mask2former convert ours/ hf-out/ --to hf                            # transformers from_pretrained

The architecture is read from the checkpoint; --preset supplies what it cannot say (class names, input
size, and a few sizes no weight shape shows). Weights are loaded strictly into our model before writing.
"""

from __future__ import annotations

import argparse

from mask2former.cli import UserError, example

FORMATS = ("ours", "detectron2", "hf")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints between detectron2 (.pkl/.pth), Hugging Face and our format",
        epilog=example(
            "mask2former convert model_final_f07440.pkl r50-panoptic/",
            "mask2former convert r50-panoptic/ r50-hf/ --to hf",
        ),
    )
    parser.add_argument("src", help="checkpoint: .pkl/.pth file, Hugging Face folder or our folder")
    parser.add_argument("dst", help="output: a folder (ours, hf) or a .pkl/.pth file (detectron2)")
    parser.add_argument(
        "--from",
        dest="source_format",
        choices=FORMATS,
        default=None,
        help="source format (default: detected)",
    )
    parser.add_argument(
        "--to", dest="target_format", choices=FORMATS, default="ours", help="output format (default: ours)"
    )
    parser.add_argument(
        "--preset", default=None, help="preset for what the checkpoint does not say (class names, input size)"
    )
    parser.set_defaults(func=run)


def describe(config) -> str:
    """One line: backbone, widths, queries, layers, classes."""
    bb = config.backbone
    if bb.kind == "resnet":
        backbone = f"ResNet blocks {tuple(bb.layers)}"
    else:
        backbone = f"Swin embed {bb.embed_dim} depths {tuple(bb.depths)} window {bb.window_size}"
    dec = config.decoder
    return (
        f"{backbone}, {dec.num_queries} queries, {dec.dec_layers} decoder layers, hidden {dec.hidden_dim}, "
        f"{config.num_classes} classes ({config.dataset})"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mask2former.checkpoints.convert import convert
    from mask2former.checkpoints.io import CheckpointError
    from mask2former.cli.checks import check_output_file, check_output_folder

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if src.resolve() == dst.resolve():
        raise UserError(f"{dst}: the output would overwrite the input")
    if args.target_format == "detectron2" and dst.suffix not in (".pkl", ".pth", ".pt"):
        raise UserError(f"{dst}: a detectron2 checkpoint must end with .pkl or .pth")
    if args.target_format in ("ours", "hf") and dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a folder")
    if args.target_format in ("ours", "hf"):
        check_output_folder("output", dst)
    else:
        check_output_file("output", dst)
    try:
        converted = convert(src, dst, args.source_format, args.target_format, args.preset)
    except CheckpointError as error:
        raise UserError(str(error).splitlines()[0]) from None
    print(f"read {converted.source_format} checkpoint {src}: {describe(converted.config)}")
    for note in converted.notes:
        print(f"note: {note}")
    for warning in converted.warnings:
        print(f"warning: {warning}")
    print(f"wrote {args.target_format} checkpoint {dst} (model {converted.config.name})")
    return 0
