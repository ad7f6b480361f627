"""What the four commands (``train``, ``eval``, ``convert``, ``eval.pass_filter``) share: the
exit-code convention, one-line errors, and the logging set-up.

Exit codes: 0 success; 2 usage or bad input (argparse errors, config errors, missing or
malformed input files; nothing was run); 1 a runtime failure (the run started and failed).
A command may add its own result codes above 2 (``train --plan``: 3, the plan does not fit).

Library code logs through ``logging.getLogger(__name__)`` and never configures handlers;
``setup_logging`` (called by each command's ``main``) sends the ``topd_jax`` loggers to
stderr through ``tqdm.write``, so log lines do not break a progress bar.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from tqdm.auto import tqdm

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
LOG_LEVELS = ("debug", "info", "warning", "error")


class UsageError(Exception):
    """Bad command-line input or input file: the command prints one line and exits 2."""


class CommandFailed(Exception):
    """The command ran and failed: it prints one line and exits 1."""


class TqdmHandler(logging.Handler):
    """Writes records through ``tqdm.write`` (an active bar is cleared, the line written, the
    bar redrawn) to ``stream``, or to whatever ``sys.stderr`` is at the time of the record."""

    def __init__(self, stream=None):
        super().__init__()
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self._stream if self._stream is not None else sys.stderr
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: never raise from emit
            self.handleError(record)


def setup_logging(level: str = "info", stream=None) -> logging.Logger:
    """Route the ``topd_jax`` loggers to ``stream`` (default: the current stderr) at ``level``;
    idempotent (a second call replaces the handler instead of adding one). Returns the
    package logger."""
    logger = logging.getLogger("topd_jax")
    for h in [h for h in logger.handlers if isinstance(h, TqdmHandler)]:
        logger.removeHandler(h)
    handler = TqdmHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False  # imports (orbax) install a root handler: no second copy there
    return logger


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="messages of the topd_jax loggers at or above this level go to stderr "
                             "(default: info)")


def error(message: object, code: int) -> int:
    """Print ``error: <message>`` to stderr; returns ``code``."""
    text = str(message).strip() or type(message).__name__
    print(f"error: {text}", file=sys.stderr, flush=True)
    return code


def run_command(body: Callable[[list[str]], int | None], argv: Sequence[str] | None, *,
                usage: tuple[type[BaseException], ...] = (),
                failure: tuple[type[BaseException], ...] = ()) -> int:
    """``body(argv)`` under the exit-code convention.

    argparse's own exits pass through as codes (``--help``: 0, a usage error: 2, its message
    already printed); ``UsageError`` and the ``usage`` exception types print one line and
    give 2; ``CommandFailed`` and the ``failure`` types print one line and give 1. Anything
    else is a bug and raises (a traceback, exit 1). The ``topd_jax`` logger's set-up
    (``setup_logging`` in ``body``) is undone on return.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    package = logging.getLogger("topd_jax")  # restored afterwards: an in-process call (a test)
    saved = (list(package.handlers), package.level, package.propagate)  # leaves no trace
    try:
        code = body(argv)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or EXIT_OK
        return error(e.code, EXIT_USAGE)  # SystemExit("message"): a usage message
    except (UsageError, *usage) as e:
        return error(e, EXIT_USAGE)
    except (CommandFailed, *failure) as e:
        return error(e, EXIT_FAILURE)
    finally:
        package.handlers[:] = saved[0]
        package.setLevel(saved[1])
        package.propagate = saved[2]
    return EXIT_OK if code is None else int(code)


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse ``type=`` that accepts numbers > 0 of ``kind`` (int or float)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"needs a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse
