"""Errors a user can cause or meet, as opposed to bugs.

The CLI prints a ``UserError`` as one line, ``clinfuse <command>: error: <what>,
<which file>, <what to do>``, and exits 2; any other exception is a programming
error and keeps its traceback. Code raises a ``UserError`` only where it knows the
cause is outside the program: a bad input file or option, an output in the way, a
corrupt or missing artifact, a lock held by another process.

The subclasses also derive from the built-in exception the same condition raised
before (``InputError`` is a ``ValueError``, ``OutputExistsError`` a
``FileExistsError``...), so callers of the Python API that catch those keep working.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """An error the user can fix.

    Args:
        what: what is wrong, e.g. ``"weights do not match artifact.json"``.
        path: the file or directory concerned.
        fix: what to do about it, e.g. ``"restore the model directory from a backup"``.
    """

    def __init__(self, what: str, path: str | Path | None = None, fix: str | None = None) -> None:
        self.what, self.path, self.fix = what, path, fix
        # One string argument, so the exception pickles (Ray, process pools) and prints.
        super().__init__(", ".join(str(part) for part in (what, path, fix) if part))


class InputError(UserError, ValueError):
    """A bad input file, config value or option."""


class NotFoundError(UserError, FileNotFoundError):
    """An input file or directory that does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """The output directory already holds what this command would write."""


class IntegrityError(UserError, ValueError):
    """A file clinfuse wrote no longer matches its recorded checksum, or cannot be parsed."""


class LockHeldError(UserError):
    """Another process is writing the same output directory."""


@contextmanager
def config_errors(path: str | Path | None, fix: str) -> Iterator[None]:
    """Re-raises a ``ValueError`` or ``KeyError`` from building components out of a
    user's config as an ``InputError``.

    Model and encoder builders check their arguments with plain ``ValueError`` (a
    non-divisible head count, an unknown registry name); inside this block those
    arguments come from the user's YAML or ``key=value`` overrides, so the cause is
    the config. Use it only around such construction, never around computation.
    """
    try:
        yield
    except UserError:
        raise
    except (ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise InputError(f"invalid config ({message})", path, fix) from err


class CohortError(InputError):
    """A cohort directory that breaks the contract (``docs/cohort-format.md``).

    The message lists every error ``datasets.validate.validate_cohort`` found, in one
    line; ``problems`` holds them one per item, with file, column, row and subject.

    Args:
        what: the summary, e.g. ``"the cohort breaks the contract (2 errors)"``.
        path: the cohort directory.
        fix: what to do about it.
        problems: every error, as printed by ``clinfuse validate``.
    """

    def __init__(
        self,
        what: str,
        path: str | Path | None = None,
        fix: str | None = None,
        problems: tuple[str, ...] | list[str] = (),
    ) -> None:
        self.problems = tuple(problems)
        listed = f"{what}: {'; '.join(self.problems)}" if self.problems else what
        super().__init__(listed, path, fix)
