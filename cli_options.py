"""How a ``clinfuse`` command declares itself: its options, its parser, what it runs.

Every ``commands.py`` adds its commands with ``add_command``: the function that runs
the command, whose docstring is the command's help, and a list of ``Option`` values.
An option several commands take (``--config``, ``--cohort``, ``key=value``
overrides, ``--no-progress``) is written once, here, and a command changes only
what differs (``OUT(help="sweep directory")``). Run functions import what they
need inside, so ``clinfuse --help`` answers without importing torch or ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Option:
    """One argument of a command: ``ArgumentParser.add_argument(*flags, **settings)``.

    Calling an option gives the same option with some settings changed, e.g.
    ``RESUME(help="continue the sweep in --out")``.
    """

    flags: tuple[str, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, **changes: Any) -> Option:
        return Option(self.flags, {**self.settings, **changes})

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(*self.flags, **self.settings)


def option(*flags: str, **settings: Any) -> Option:
    """An ``Option``; the arguments are those of ``ArgumentParser.add_argument``."""
    return Option(flags, settings)


# Options several commands take.
CONFIG = option("--config", help="YAML file, or the name of a packaged preset (demo)")
COHORT = option("--cohort", help="cohort directory (overrides cohort= in the config)")
OUT = option("--out")
OVERRIDES = option("overrides", nargs="*", metavar="key=value", help="config overrides")
RESUME = option("--resume", action="store_true")
NO_PROGRESS = option("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    run: Run | None,
    options: Iterable[Option] = (),
    doc: str | None = None,
) -> argparse.ArgumentParser:
    """Adds command ``name``; ``run(args)`` returns its exit code.

    The docstring of ``run`` (or ``doc``) is the command's help: its first line for
    ``clinfuse --help``, the rest for ``clinfuse NAME --help``. ``run`` None makes a
    group of commands, which prints its help.
    """
    short, _, long = inspect.cleandoc(doc or run.__doc__ or "").partition("\n")
    parser = subparsers.add_parser(name, help=short, description=long.strip() or None)
    for opt in options:
        opt.add_to(parser)
    parser.set_defaults(func=run or (lambda _args: parser.print_help() or 2))
    return parser


def values_for(args: argparse.Namespace, fields: type | Iterable[str]) -> dict[str, Any]:
    """The values of ``args`` named like ``fields``, or like the fields of a dataclass
    that the command has an option for (the others keep their defaults).

    For handing parsed options to a function or an options object, e.g.
    ``SweepOptions(**values_for(args, SweepOptions))``, without naming each twice.
    """
    if isinstance(fields, type):
        fields = [f.name for f in dataclasses.fields(fields) if hasattr(args, f.name)]
    return {name: getattr(args, name) for name in fields}
