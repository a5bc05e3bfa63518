"""Every option of every subcommand says what it does and, when it has one, its default; and the help
of every command reads as tests/data/cli_help.txt (regenerate on purpose:
``PYTHONPATH=src python tests/test_cli_help.py --write``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from unittest import mock

import pytest

from pneumo.cli import build_parser


def subparsers(parser: argparse.ArgumentParser, prefix: str = "pneumo") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += subparsers(sub, f"{prefix} {name}")
    return found


COMMANDS = subparsers(build_parser())
GOLDEN = Path(__file__).parent / "data" / "cli_help.txt"


PYTHON = f"# argparse of Python {sys.version_info.major}.{sys.version_info.minor}, 100 columns\n"


def help_dump() -> str:
    """The help of ``pneumo`` and of every command under it, at a fixed width and without colour,
    after a first line naming the Python whose argparse laid it out (its layout changes between versions)."""
    with mock.patch.dict(os.environ, {"COLUMNS": "100", "NO_COLOR": "1", "PYTHON_COLORS": "0"}):
        helps = [f"=== {name} ===\n{parser.format_help()}\n" for name, parser in subparsers(build_parser())]
    return PYTHON + "".join(helps)


def test_help_reads_as_the_golden_file():
    """A refactoring of the parser changes no option, default or word of help unless this file changes too."""
    golden = GOLDEN.read_text(encoding="utf-8")
    if not golden.startswith(PYTHON):
        pytest.skip(f"{GOLDEN.name} was laid out by another Python's argparse: {golden.splitlines()[0]}")
    assert help_dump() == golden


def test_every_command_is_walked():
    names = {name for name, _ in COMMANDS}
    assert {"pneumo train", "pneumo data check", "pneumo show-batch", "pneumo lr-find", "pneumo compare"} <= names
    assert len(names) >= 15


def test_every_command_runs_its_own_handler():
    """Each command's options sit beside its handler (pneumo/cli/GROUP.py: add_NAME, cmd_NAME): the one it calls."""
    leaves = [(name, parser) for name, parser in COMMANDS if not parser._subparsers]
    assert len(leaves) == len(COMMANDS) - 3  # all but `pneumo`, `pneumo data` and `pneumo dicom`
    for name, parser in leaves:
        handler = parser.get_default("handler")
        assert handler.__name__ == "cmd_" + "_".join(name.split()[1:]).replace("-", "_"), name
        assert handler.__module__.startswith("pneumo.cli."), name


@pytest.mark.parametrize("name, parser", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_has_help_and_shows_its_default(name, parser):
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{name} {label}: no help"
        shown = parser._get_formatter()._get_help_string(action)
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings:
            assert "default" in shown, f"{name} {label}: default {action.default!r} not shown"
    assert "%(" not in text  # every placeholder was expanded


def test_defaults_and_tta_read_as_a_user_needs_them():
    helps = dict(COMMANDS)
    lr_find = " ".join(helps["pneumo lr-find"].format_help().split())
    assert "(default: 100)" in lr_find and "(default: valley)" in lr_find
    compare = " ".join(helps["pneumo compare"].format_help().split())
    assert "(default: 3)" in compare and "runs/compare" in compare
    for command in ("pneumo predict", "pneumo evaluate"):
        assert "mirror" in helps[command].format_help()  # --tta is explained, not just named
    show = " ".join(helps["pneumo show-batch"].format_help().split())
    assert "(default: batch.png)" in show and "(default: 3)" in show


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: PYTHONPATH=src python tests/test_cli_help.py --write")
    GOLDEN.write_text(help_dump(), encoding="utf-8")
    print(f"wrote {GOLDEN}")
