"""The ``clinfuse`` command line.

Each subcommand lives beside the code it drives, in a module that exposes
``register(subparsers)``; that function adds the parser and sets ``func``.
Modules import heavy libraries (torch, ray) inside the command, not at import,
so ``clinfuse --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that define subcommands, in the order --help lists them.
_COMMAND_MODULES = [
    "clinfuse.datasets.commands",
    "clinfuse.encoders.commands",
    "clinfuse.training.commands",
    "clinfuse.tune.commands",
    "clinfuse.scoring.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinfuse",
        description="Clinical risk from DICOM images, ICU vitals/labs and genotypes.",
    )
    parser.add_argument("--version", action="version", version=_version())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand. Bad input (a ValueError, a missing file) prints one clear line
    naming the file, column or row and returns 1; ``CLINFUSE_TRACEBACK=1`` re-raises."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        if os.environ.get("CLINFUSE_TRACEBACK"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"clinfuse {args.command}: error: {message}", file=sys.stderr)
        return 1
    return int(code or 0)


def _version() -> str:
    from clinfuse import __version__

    return f"clinfuse {__version__}"


if __name__ == "__main__":
    sys.exit(main())
