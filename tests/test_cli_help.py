"""Every option of every subcommand says what it does and, when it has one, its default."""

from __future__ import annotations

import argparse

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


def test_every_command_is_walked():
    names = {name for name, _ in COMMANDS}
    assert {"pneumo train", "pneumo data check", "pneumo show-batch", "pneumo lr-find", "pneumo compare"} <= names
    assert len(names) >= 15


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
