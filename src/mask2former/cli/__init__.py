"""The `mask2former` command: one thin subcommand module per job.

Each module in SUBCOMMANDS defines `register(subparsers)`, which adds its parser (with an `epilog` from
`example(...)`) and sets `func=run` where `run(args) -> int` is the exit code. Every subcommand's help
shows the options' defaults (`DefaultsFormatter`); output cut short by a closed pipe (`| head`) ends
quietly.
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


def flag_error(
    error: Exception, parameters: tuple[str, ...] = ("weights", "preset", "size", "opset", "out", "device")
):
    """A library error as a one-line UserError naming the flag: library messages start with the name of the
    parameter at fault ("weights X: no such file"), which the CLI spells as its flag ("--weights X: ...")."""
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    for name in parameters:
        if message.startswith((name + " ", name + ":")):
            return UserError("--" + name.replace("_", "-") + message[len(name) :])
    return UserError(message)


def resolve_device_flag(name: str | None) -> str:
    """--device (auto, cpu, cuda, cuda:N, mps) -> the device to use, as a string; one-line UserError for a
    device this machine lacks ("--device cuda: CUDA is not available ...")."""
    from mask2former.devices import resolve_device

    try:
        return str(resolve_device(name))
    except ValueError as error:
        raise flag_error(error) from None


DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps"


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that ends each option with "(default: X)" when it has a default worth showing: not None, not a
    store_true False, and not when the help text already speaks of its default. Epilogs keep their lines.

    An option whose default lives elsewhere (None meaning "the config's value") may carry
    `action.default_help`, a function returning the text, called only when the help is shown."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        describe = getattr(action, "default_help", None)
        if describe is not None and "default" not in text.lower():
            shown = str(describe()).replace("%", "%%")
            return f"{text} (default: {shown})" if text else f"default: {shown}"
        if (
            "default" in text.lower()
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def example(*commands: str) -> str:
    """The epilog of a subcommand's help: its example command lines."""
    title = "example:" if len(commands) == 1 else "examples:"
    return title + "\n" + "\n".join(f"  {command}" for command in commands)


def version_text() -> str:
    from importlib import metadata

    from mask2former import __version__

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"mask2former {__version__} (torch {torch_version}, Python {sys.version.split()[0]})"


class _VersionAction(argparse.Action):
    """--version, with the text made only when asked for (reading package metadata costs ~50 ms)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mask2former",
        description="Mask2Former in pure PyTorch.",
        epilog=example("mask2former predict photo.jpg --out predictions", "mask2former COMMAND --help"),
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="show the versions and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"mask2former.cli.{name}").register(subparsers)
    for subparser in subparsers.choices.values():
        subparser.formatter_class = DefaultsFormatter
    return parser


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (`mask2former presets | head -1`): nothing more can be shown, and
    Python's own flush at exit would complain again, so stdout now points at /dev/null. Exit status
    141 = 128 + SIGPIPE, what a shell reports for a command a closed pipe ended."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no real file (captured in a test): nothing to redirect
        pass
    finally:
        os.close(devnull)
    return 141


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            # Also after --help / --version (a SystemExit): a closed pipe shows here, not at exit.
            sys.stdout.flush()
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _main(argv: list[str] | None) -> int:
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
