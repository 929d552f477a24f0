"""The `mask2former` command: one thin subcommand module per job.

Each module in SUBCOMMANDS defines `register(subparsers)`, which adds its parser and sets
`func=run` where `run(args) -> int` is the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Listed explicitly (no registry): the order is the order of `mask2former --help`.
SUBCOMMANDS = ["predict", "presets", "eval", "synth", "train", "convert", "export", "ops", "bench", "serve"]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mask2former", description="Mask2Former in pure PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"mask2former.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        # Under torchrun every process checks the same arguments: tag the others' copies of the line.
        rank = os.environ.get("RANK", "0")
        where = "" if rank == "0" else f" (rank {rank})"
        print(f"mask2former {args.command}: error{where}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
