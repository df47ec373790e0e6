"""How the command lines end on a user's mistake: the message and exit status 2, no traceback.

A missing file or folder, a bad option value, a checkpoint that does not fit, an unreadable image or a missing
optional package is something the user fixes, and a traceback only hides the message that says how. Any other
exception is a bug and keeps its traceback. ``--debug`` on the command line shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Sequence

import yaml

EXIT_USAGE = 2
# Errors this project raises for input a user can fix (each message names the file, key or value, and what to do).
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError,
               ImportError, yaml.YAMLError)


def user_error_message(error: BaseException) -> str:
    """The message of ``error`` as the user should read it (a KeyError's message without the quotes repr adds)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error) or type(error).__name__


def run_command(main: Callable[[], Any], *, prog: str, argv: Sequence[str] | None = None) -> int:
    """Run ``main()`` and return the exit status: 0, or 2 after printing a user error's message to stderr.

    Args:
        main: the entry point's work.
        prog: the command's name, to start the message with.
        argv: the command line (default ``sys.argv``), only looked at for ``--debug``.
    """
    debug = '--debug' in (sys.argv[1:] if argv is None else argv)
    try:
        main()
    except USER_ERRORS as error:
        if debug:
            raise
        print(f'{prog}: error: {user_error_message(error)}\n({type(error).__name__}; run again with --debug for the '
              'traceback)', file=sys.stderr)
        return EXIT_USAGE
    return 0


def parse_or_status(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed command line, or the exit status argparse asked for (0 after --help/--version, 2 for a usage
    error), so that ``main(argv)`` can return it instead of exiting."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)


def set_up_logging(logger: logging.Logger, level: int) -> None:
    """``levelname: message`` lines at ``level``; a program that set logging up itself keeps its handlers and only
    this command's logger gets the level."""
    if logging.getLogger().handlers:
        logger.setLevel(level)
    else:
        logging.basicConfig(level=level, format='%(levelname)s: %(message)s')
