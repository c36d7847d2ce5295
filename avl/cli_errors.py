"""How every `avl` subcommand reports a user error: one line `avl <cmd>: error: ...`, exit status 2.

Usage errors (an unknown option, a malformed value such as `positive_int` rejects) are one line as well
(`OneLineErrorParser`).
A user error is a bad checkpoint, file, option or input (ValueError, OSError, ImportError for a
missing optional package, NotImplementedError for an unsupported feature); anything else is a bug
and keeps its traceback. `--debug`, or `AVL_DEBUG=1` in the environment, shows the traceback of a
user error too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["DEBUG_ENV", "USER_ERRORS", "OneLineErrorParser", "add_debug_option", "positive_int",
           "run_reporting_errors"]

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, NotImplementedError)
DEBUG_ENV = "AVL_DEBUG"


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line too, `<prog>: error: ... (see <prog> --help)`,
    exit status 2 (argparse's own status for usage errors); sub-commands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the Python traceback of an error (also: {DEBUG_ENV}=1)")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; allowed: an integer >= 1")
    return value


def _debugging(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_reporting_errors(prog: str, args: argparse.Namespace, command: Callable[[], int | None]) -> int:
    """Run `command`; a user error prints `<prog>: error: <message>` on stderr and gives 2 (or is
    re-raised with `--debug`); otherwise the command's status (None: 0)."""
    try:
        return command() or 0
    except USER_ERRORS as error:
        if _debugging(args):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
