"""Every bound and timeout of the host, in one place (as python-tuf's ``UpdaterConfig``).

A limit written where it is used is a limit nobody finds: the root size, the audit record
bound, the set-up and health-check timeouts and the trial period used to sit in the seven
modules that enforce them. They are all fields of :class:`HostLimits` now, each documented
with why it has its value, and :data:`HOST_LIMITS` is the one instance the modules read. The
bundle reader's own bounds (:class:`signing.bundle.Limits`, shared with the builder) are
embedded, not copied: both halves read a bundle under the same limits.

Nothing here reads the environment or a file: the defaults are the product's. ``Appliance``
takes another reader :class:`~signing.bundle.Limits` for tests and benchmarks; the others are
fixed for a host, because changing them changes what the host accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

from signing.bundle import Limits


@dataclass(frozen=True, kw_only=True)
class HostLimits:
    """The host's limits and timeouts; every default is the product's."""

    bundle: Limits = field(default_factory=Limits)
    """What the bundle reader enforces (head sizes, chunk size and count, kernel-copy window):
    invariant 3, memory independent of bundle size."""

    parity_memory_bytes: int = 64 << 20
    """Rebuilding a bad part from parity holds one stripe of every part twice (what was read
    and what was decoded): the part index's stripe size times the parts must fit in this
    (appliance.parts). The index is not signed, so its stripe size cannot choose the memory."""

    part_hash_threads: int = 16
    """Install or verify from split parts: how many parts are hashed at once before anything
    is written (appliance.parts), each with a 1 MiB buffer; at most one per core."""

    max_root_bytes: int = 1 << 20
    """Trusted root metadata, read from the trust store or given to ``trust init/update``: a
    root of many keys fits in a few KiB; a megabyte is a wrong file."""

    max_signed_ahead: timedelta = timedelta(days=1)
    """How far ahead of the host's time a bundle's signing time may be (docs/adr/0005): clocks
    of builders and hosts drift by minutes, time zones by hours; a day ahead is a wrong clock."""

    default_keep: int = 3
    """Slots kept after an install, the active one included (``install --keep``)."""

    default_grace_period_s: int = 600
    """After activation, a model that fails to load in ``serve`` within this time rolls back
    by itself (``install --grace-period``)."""

    max_grace_period_s: int = 30 * 24 * 3600
    """A longer trial is a typo, and a far larger one overflows the clock arithmetic."""

    env_setup_timeout_s: float = 3600.0
    """Each child of step I7 that installs or checks packages (pip install, pip check,
    byte-compilation, micromamba create): a CUDA-sized environment takes minutes, not hours."""

    smoke_import_timeout_s: float = 600.0
    """The smoke imports of step I7, in the environment's interpreter."""

    health_check_timeout_s: float = 300.0
    """Step I7's health check: load the slot's model in a child process and generate a few
    tokens; a model that hangs is refused after this time."""

    audit_max_text: int = 1000
    """Characters of one string in an audit record (invariant 8, bounded records)."""

    audit_max_items: int = 20
    """Items of one list (or keys of one object) in an audit record, then ``… N more``."""

    audit_max_record_bytes: int = 16 << 10
    """Bytes of one audit line; a record still larger keeps only its core fields, and a torn
    tail longer than this is tampering, not a crash (appliance.audit)."""

    audit_reserve_bytes: int = 256 << 10
    """Disk space held in ``audit.reserve``, released when the disk is full so that the record
    of what happened still lands."""


HOST_LIMITS: Final = HostLimits()
"""The limits the host runs under."""
