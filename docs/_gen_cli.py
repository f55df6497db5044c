"""Prints the ``--help`` text of every ``clinfuse`` command, from the real parsers.

Run ``python docs/_gen_cli.py`` after changing a command and compare with docs/cli.md.
"""

from __future__ import annotations

import argparse
import os

from clinfuse.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser, prefix: str):
    """Yields (full command name, parser) for every subcommand, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _subcommands(sub, f"{prefix} {name}")


def main() -> None:
    os.environ.setdefault("COLUMNS", "100")
    parser = build_parser()
    print(parser.format_help())
    for name, sub in _subcommands(parser, "clinfuse"):
        print(f"=== {name}\n{sub.format_help()}")


if __name__ == "__main__":
    main()
