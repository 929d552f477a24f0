"""`mask2former ops`: the operator inventory of an ONNX graph (op counts, MACs of Conv/MatMul/Gemm/Einsum)."""

from __future__ import annotations

import argparse
import json

from mask2former.cli import UserError, example


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ops",
        help="count the operators of an ONNX graph and the MACs of its matrix ops",
        epilog=example("mask2former ops model.onnx --size 512x512 --json"),
    )
    parser.add_argument("model", help="an .onnx file (e.g. from `mask2former export`)")
    parser.add_argument(
        "--size",
        default=None,
        help="HxW input size to fix before shape inference (needed for dynamic graphs)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="batch size for a dynamic batch axis (default 1)"
    )
    parser.add_argument("--json", action="store_true", help="print the inventory as JSON")
    parser.set_defaults(func=run)


def parse_size(text: str | None, option: str = "--size") -> tuple[int, int] | None:
    """'512x640' -> (512, 640); one-line UserError for anything else."""
    if text is None:
        return None
    parts = text.lower().replace("*", "x").split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"{option} {text}: expected HxW, e.g. 512x512") from None
    if height < 1 or width < 1:
        raise UserError(f"{option} {text}: height and width must be positive")
    return height, width


def run(args: argparse.Namespace) -> int:
    from mask2former.cli.checks import AT_LEAST_1, check_input_size, check_number
    from mask2former.export.ops import (
        float64_locations,
        forbidden_ops,
        format_table,
        load_graph,
        op_inventory,
    )
    from mask2former.export.runtime import ExportError

    size = parse_size(args.size)
    check_number("--batch-size", args.batch_size, AT_LEAST_1)
    check_input_size("--size", size)
    try:
        model = load_graph(args.model)
        inventory = op_inventory(model, size=size, batch=args.batch_size)
        doubles = float64_locations(model)
        forbidden = forbidden_ops(model)
    except ExportError as error:
        raise UserError(str(error).replace("give a size (H, W)", "pass --size HxW")) from None
    if args.json:
        report = inventory.to_dict()
        report.update(model=str(args.model), float64=doubles, forbidden_ops=forbidden)
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}")
    print(format_table(inventory))
    print(f"float64 anywhere: {'no' if not doubles else f'YES ({len(doubles)}: {doubles[0]}, ...)'}")
    print(f"ScatterND: {forbidden.get('ScatterND', 0)}")
    return 0
