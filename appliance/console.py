"""The CLI boundary shared by ``appliance`` and ``appliance-builder``.

Errors are caught once, here: an :class:`~signing.errors.AirgapError` becomes one line on
stderr and its documented exit code (docs/cli.md); anything else is a bug and says so in one
line (set APPLIANCE_DEBUG=1 for the traceback). Progress bars go to stderr, only on a terminal.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from signing.canonical import parse_time
from signing.errors import AirgapError, InputError

EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

stderr = Console(stderr=True)


def run_cli(group: click.Group, prog_name: str) -> NoReturn:
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
    except Exception as exc:
        if os.environ.get("APPLIANCE_DEBUG"):
            raise
        click.echo(
            f"internal error: {type(exc).__name__}: {exc} (APPLIANCE_DEBUG=1 shows more)", err=True
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(0)


def parse_cli_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value, what="--assume-time")
    except AirgapError as exc:
        raise InputError(exc.diagnostics()) from None


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


class ByteProgress:
    """A rich progress bar over bytes, shown only when stderr is a terminal."""

    def __init__(self) -> None:
        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
            disable=not stderr.is_terminal,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> ByteProgress:
        self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._progress.stop()

    def start(self, total: int, description: str) -> None:
        self._task = self._progress.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)

    def callback(self) -> Callable[[int], None]:
        return self.advance
