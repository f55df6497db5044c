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
import warnings
from collections.abc import Callable

from clinfuse.errors import UserError

# Modules that define subcommands, in the order --help lists them.
_COMMAND_MODULES = [
    "clinfuse.simulation.commands",
    "clinfuse.datasets.commands",
    "clinfuse.encoders.commands",
    "clinfuse.training.commands",
    "clinfuse.tune.commands",
    "clinfuse.scoring.commands",
    "clinfuse.integrity.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinfuse",
        description="Clinical risk from DICOM images, ICU vitals/labs and genotypes.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():
        # Also accepted after the command (``clinfuse score --debug ...``); SUPPRESS keeps
        # the global flag's value when the command's own is not given.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help=_DEBUG_HELP)  # fmt: skip
    return parser


_DEBUG_HELP = "show the traceback of an error (also CLINFUSE_DEBUG=1)"


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand and returns its exit code.

    A ``UserError`` (bad input, an output in the way, a corrupt or missing artifact, a
    held lock) prints one line, ``clinfuse <command>: error: <what>, <which file>,
    <what to do>``, and returns 2, as argparse does for a bad option. ``--debug`` or
    ``CLINFUSE_DEBUG=1`` re-raises it with its traceback. Any other exception is a
    bug and always keeps its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    default_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warnings(args.command, default_format)
    try:
        code = args.func(args)
    except UserError as err:
        if args.debug or _debug_env():
            raise
        print(f"clinfuse {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = default_format  # main() may run inside a notebook
    return int(code or 0)


def _one_line_warnings(command: str, default: Callable) -> Callable:
    """A ``warnings.formatwarning`` printing clinfuse's own warnings (a lock taken over,
    an artifact without checksums) as ``clinfuse <command>: warning: ...``; other
    libraries' keep ``default``."""
    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def format_warning(message, category, filename, lineno, line=None):
        if str(filename).startswith(ours) and issubclass(category, UserWarning):
            return f"clinfuse {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return format_warning


def _debug_env() -> bool:
    # CLINFUSE_TRACEBACK: the variable's name before --debug existed.
    return any(
        os.environ.get(v, "") not in ("", "0") for v in ("CLINFUSE_DEBUG", "CLINFUSE_TRACEBACK")
    )


def _version() -> str:
    from clinfuse import __version__

    return f"clinfuse {__version__}"


if __name__ == "__main__":
    sys.exit(main())
