"""The CLI boundary shared by ``appliance`` and ``appliance-builder``.

Errors are caught once, here: an :class:`~signing.errors.AirgapError` becomes one line on
stderr and its documented exit code (docs/cli.md); anything else is a bug and says so in one
line (set APPLIANCE_DEBUG=1 for the traceback). Progress bars go to stderr, only on a terminal.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import click

from appliance.signals import Terminated
from signing.canonical import parse_time
from signing.errors import AirgapError, InputError, StateError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `cmd | head` elsewhere
# Errors of the host's disk rather than of the program: they are host state (exit 5).
_HOST_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM})

_stderr_console: Console | None = None


def __getattr__(name: str) -> Any:
    """``stderr``, the rich console on standard error, made on first use: rich costs tens of
    milliseconds of start-up that a command whose stderr is no terminal never needs."""
    if name == "stderr":
        return _stderr()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stderr() -> Console:
    global _stderr_console  # noqa: PLW0603 - one console per process, made lazily
    if _stderr_console is None:
        from rich.console import Console  # noqa: PLC0415 - only for a terminal

        _stderr_console = Console(stderr=True)
    return _stderr_console


def _may_be_terminal() -> bool:
    """False only where rich would surely find no terminal on stderr, without importing it
    (rich's ``Console.is_terminal``: ``TTY_COMPATIBLE``, ``FORCE_COLOR``, then ``isatty``)."""
    tty_compatible = os.environ.get("TTY_COMPATIBLE", "")
    if tty_compatible == "0":
        return False
    if tty_compatible == "1" or os.environ.get("FORCE_COLOR") is not None:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def run_cli(group: click.Group, prog_name: str) -> NoReturn:
    # The host's warnings (a stray entry in slots/, say; a GPU backend the health check could
    # not use) go to stderr as one line each, like errors; the server's own log
    # (appliance.server) keeps its configuration.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    for name in ("appliance.slots", "appliance.parts", "appliance.runtime.loader"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    try:
        # Not group.main(): it prints a blank line of its own on Ctrl-C before we can say why.
        with group.make_context(prog_name, sys.argv[1:]) as ctx:
            group.invoke(ctx)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        click.echo(f"error: {exc.format_message()} (see '{prog_name} --help')", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except AirgapError as exc:
        click.echo(f"error: {exc.diagnostics()}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        click.echo("error: terminated (SIGTERM)", err=True)
        sys.exit(EXIT_TERMINATED)
    except BrokenPipeError:
        # The reader went away (`appliance status | head`): nothing to say, and nothing more
        # may be written to stdout, not even by the interpreter's flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)
    except OSError as exc:
        if exc.errno not in _HOST_ERRNOS:
            if os.environ.get("APPLIANCE_DEBUG"):
                raise
            _internal(exc)
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror}{where}", err=True)
        sys.exit(StateError.exit_code)
    except Exception as exc:
        if os.environ.get("APPLIANCE_DEBUG"):
            raise
        _internal(exc)
    sys.exit(0)


def _internal(exc: BaseException) -> NoReturn:
    message = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(message) > 500:
        message = message[:500] + "..."
    click.echo(f"internal error: {message} (APPLIANCE_DEBUG=1 shows more)", err=True)
    sys.exit(EXIT_INTERNAL)


def parse_cli_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value, what="--assume-time")
    except AirgapError as exc:
        raise InputError(exc.diagnostics()) from None


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


class Progress(Protocol):
    """Where a long operation reports the bytes it has done: the one progress protocol of
    both halves (install and verify on the host, writing a bundle on the builder).
    :class:`ByteProgress` shows it on a terminal; callers may pass none."""

    def start(self, total: int, description: str) -> None: ...

    def advance(self, amount: int) -> None: ...


class ByteProgress:
    """A rich progress bar over bytes, shown only when stderr is a terminal.

    When stderr is surely no terminal (a pipe, a file, a service's journal) rich is not even
    imported, and every call does nothing.
    """

    def __init__(self) -> None:
        self._progress: RichProgress | None = None
        self._task: TaskID | None = None
        if not _may_be_terminal():
            return
        from rich.progress import (  # noqa: PLC0415 - only for a terminal
            BarColumn,
            DownloadColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress  # noqa: PLC0415

        console = _stderr()
        self._progress = RichProgress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )

    def __enter__(self) -> ByteProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, total: int, description: str) -> None:
        if self._progress is not None:
            self._task = self._progress.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, amount)

    def callback(self) -> Callable[[int], None]:
        return self.advance
