"""One audit record for each host operation, telling how it really ended (invariant 8).

The outcome comes from the error class, never from exit-code numbers:

- ``ok``: it did what it was asked.
- ``refused``: proven-bad or policy-refused input (verification, policy, a model that fails
  its health check) or a host busy with another operation. Nothing was changed.
- ``failed``: anything else that ended it before it changed the host: host state, disk,
  environment set-up, an interrupt (SIGINT, SIGTERM), or a bug (``internal error`` with the
  exception's type). The exception is re-raised unchanged after the record is written.
- ``activated-incomplete``: an install switched to its new slot, then a later step failed or
  was interrupted. The record says ``"activated": true`` and what failed.

If the record itself cannot be written (a full or read-only disk, a tampered log), the
operator is told so, together with the operation's own error: no outcome goes unmentioned.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from appliance.audit import AuditLog
from appliance.host import HostTime
from appliance.signals import Terminated, sigterm_raises
from signing.errors import (
    AirgapError,
    HostBusyError,
    IntegrityError,
    ModelError,
    PolicyError,
    StateError,
    VerificationError,
)

OK: Final = "ok"
REFUSED: Final = "refused"
FAILED: Final = "failed"
ACTIVATED_INCOMPLETE: Final = "activated-incomplete"
_REFUSALS: Final = (VerificationError, PolicyError, ModelError, HostBusyError)


def outcome_of(exc: BaseException, record: dict[str, Any]) -> tuple[str, str]:
    """The outcome and the one-line error for an operation that ``exc`` ended."""
    if isinstance(exc, AirgapError):
        error = exc.diagnostics()
    elif isinstance(exc, KeyboardInterrupt):
        error = "interrupted"
    elif isinstance(exc, Terminated):
        error = "terminated (SIGTERM)"
    elif isinstance(exc, OSError):
        error = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    else:
        error = f"internal error: {type(exc).__name__}: {exc}"
    if record.get("activated"):
        return ACTIVATED_INCOMPLETE, error
    return (REFUSED if isinstance(exc, _REFUSALS) else FAILED), error


@contextmanager
def audited(log: AuditLog, event: str, clock: HostTime, **fields: Any) -> Iterator[dict[str, Any]]:
    """Write one audit record for the operation in the block, whatever ends it.

    The block fills the yielded dict with what the record should say. SIGTERM raises
    :class:`Terminated` inside the block, so a stopped service is recorded too. An ``OSError``
    that escapes becomes a :class:`StateError` (exit 5) naming the operation.
    """
    record: dict[str, Any] = {**clock.audit_fields(), **fields}
    if log.path.parent.is_dir():
        log.ensure_appendable()  # a log that shows tampering stops the operation itself
    try:
        with sigterm_raises():
            yield record
    except BaseException as exc:
        outcome, error = outcome_of(exc, record)
        if isinstance(exc, ModelError) and record.get("health_check") != OK:
            # A model that failed to load in the health check; one that passed it and then
            # failed later (the evaluation gate's child) keeps its "ok", and its own record.
            record["health_check"] = "failed"
        _append_or_explain(log, event, outcome, clock, record, error=error, cause=exc)
        if isinstance(exc, OSError):
            raise StateError(f"{event} failed: {error}") from exc
        raise
    _append_or_explain(log, event, OK, clock, record, error=None, cause=None)


def _append_or_explain(
    log: AuditLog,
    event: str,
    outcome: str,
    clock: HostTime,
    record: dict[str, Any],
    *,
    error: str | None,
    cause: BaseException | None,
) -> None:
    if not log.path.parent.is_dir():
        return  # no host root at all: nothing happened to a host
    try:
        log.append(time=clock.system, event=event, outcome=outcome, **record, error=error)
    except (StateError, IntegrityError) as exc:
        what = f"{event} {outcome}" + (f" ({error})" if error else "")
        if record.get("activated"):
            what = f"{event} activated slot {record.get('slot')}: {outcome}"
        raise type(exc)(
            f"{what}, but its audit record could not be written: {exc.diagnostics()}"
        ) from cause
