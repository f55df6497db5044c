"""The command line: every command's help is the one docs/cli.md shows; options
shared between commands are declared once and changed per command."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from clinfuse.cli import build_parser
from clinfuse.cli_options import COHORT, add_command

REPO = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, prefix: str = "clinfuse"):
    """(name, parser) of every command that runs something (groups such as ``weights``
    only list theirs), depth first."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield prefix, parser
    for action in groups:
        for name, sub in action.choices.items():
            yield from _commands(sub, f"{prefix} {name}")


def test_every_command_help_is_the_one_docs_cli_md_shows(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # the width docs/_gen_cli.py prints at
    page = (REPO / "docs" / "cli.md").read_text()
    commands = dict(_commands(build_parser()))
    assert len(commands) == 9 and "clinfuse weights verify" in commands
    for name, parser in commands.items():
        assert parser.format_help().strip() in page, f"{name}: run python docs/_gen_cli.py"


def test_a_shared_option_changed_for_one_command_stays_as_declared_for_the_others():
    subparsers = argparse.ArgumentParser().add_subparsers()

    def first(args: argparse.Namespace) -> int:
        """first command

        What it does.
        """
        return 0

    a = add_command(subparsers, "a", first, [COHORT(required=True, help="where to read")])
    b = add_command(subparsers, "b", first, [COHORT])
    assert "where to read" in a.format_help() and a.description == "What it does."
    assert "overrides cohort= in the config" in b.format_help()
    assert b.parse_args([]).cohort is None
    with pytest.raises(SystemExit):
        a.parse_args([])  # --cohort is required there only
