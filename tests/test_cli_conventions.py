"""CLI conventions: --version, every subcommand's help shows its defaults and an example, one spelling per
option across commands, and output cut short by a closed pipe (`| head`) ends quietly."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mask2former
from mask2former.cli import SUBCOMMANDS, build_parser, main

SRC = Path(mask2former.__file__).parents[1]
ENV = {"PYTHONPATH": str(SRC), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"mask2former {mask2former.__version__} (torch ")


def test_every_subcommand_help_shows_defaults_and_an_example():
    parsers = subparsers()
    assert set(parsers) == set(SUBCOMMANDS)
    for name, parser in parsers.items():
        text = parser.format_help()
        assert "\nexample" in text and f"mask2former {name}" in text.split("\nexample")[1], name
        assert "default: None" not in text and "(default: False)" not in text, name
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help text"
            shows = parser._get_formatter()._get_help_string(action)
            has_value = action.default not in (None, False, argparse.SUPPRESS)
            if has_value or getattr(action, "default_help", None):
                assert "default" in shows.lower(), f"{name} {action.option_strings[0]}: {shows!r}"


def test_one_spelling_per_option():
    spellings: dict[str, set[str]] = {}
    for parser in subparsers().values():
        for action in parser._actions:
            for option in action.option_strings:
                spellings.setdefault(action.dest, set()).add(option)
    for dest, options in spellings.items():
        long_options = {o for o in options if o.startswith("--")}
        assert len(long_options) <= 1, f"{dest} is spelt {sorted(long_options)}"
    flags = {o for options in spellings.values() for o in options}
    assert "--batch" not in flags and "--batch-size" in flags
    for name in ("predict", "eval", "train"):
        options = {o for a in subparsers()[name]._actions for o in a.option_strings}
        assert {"--device", "--no-progress"} <= options, name


@pytest.mark.parametrize("command", [["presets"], ["--help"], ["predict", "--help"]])
def test_closed_pipe_ends_quietly(command):
    # The reader closes its end before the command writes: every write then fails with EPIPE.
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mask2former", *command],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            timeout=60,
        )
    finally:
        os.close(writer)
    assert done.stderr == "", done.stderr
    assert done.returncode in (0, 141)


@pytest.mark.slow
def test_piped_into_head_prints_one_line_and_no_traceback():
    # Long output through a pipe whose reader stops after one line, as a shell user would run it.
    done = subprocess.run(
        ["sh", "-c", f"for i in 1 2 3 4 5 6 7 8; do {sys.executable} -m mask2former presets; done | head -1"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("preset")
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
