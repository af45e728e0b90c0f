"""The one exception hierarchy of airgap-appliance.

Every error that a user can cause derives from :class:`AirgapError`. The CLIs catch it once, at
the top, print :meth:`AirgapError.diagnostics` as one line and exit with :attr:`exit_code`.
Exit codes are documented in docs/cli.md; keep that table in step with this module.

It lives in ``signing`` because both halves (``builder`` and ``appliance``) import ``signing``,
and ``signing`` imports neither.
"""

from __future__ import annotations

from typing import ClassVar

from signing.bounded import MAX_LINE, clip


class AirgapError(Exception):
    """Root of every error this project raises on purpose."""

    exit_code: ClassVar[int] = 1

    def diagnostics(self) -> str:
        """One line for the operator: what failed and why, at most MAX_LINE characters.

        Messages are bounded where they are built (signing.bounded); the cut here is the last
        line of defence, because this line is what the audit log records for a refusal.
        """
        return clip(" ".join(str(self).split()), MAX_LINE)


class InputError(AirgapError):
    """A file or argument the user gave cannot be used (missing, unreadable, wrong kind)."""

    exit_code = 2


class KeyFileError(InputError):
    """A key file cannot be read, decrypted or is not an Ed25519 key."""


class RecipeError(InputError):
    """A recipe is not valid TOML or does not match the recipe schema."""


class VerificationError(AirgapError):
    """Something that must be proven good is not: refuse it."""

    exit_code = 3


class FormatError(VerificationError):
    """Signed data or a bundle is malformed: not canonical, wrong schema, bad tar structure."""


class SignatureError(VerificationError):
    """Signatures do not reach the threshold of the role that must sign."""


class UnsignedError(SignatureError):
    """Data that must be signed carries no signature at all."""


class ExpiredError(VerificationError):
    """Metadata is past its expiry time."""


class RotationError(VerificationError):
    """A new root is not a valid successor of the trusted root."""


class PayloadError(VerificationError):
    """A bundle's payload does not match its signed manifest."""


class PartError(VerificationError):
    """A split bundle's part is missing, corrupt, swapped or from another split, or its part
    index does not describe it (docs/adr/0015-split-bundles.md). The message names the part
    (its number, count and file) and says to re-copy it from the source medium."""


class PolicyError(AirgapError):
    """Proven-good input that host policy refuses (downgrade, replay)."""

    exit_code = 4


class StateError(AirgapError):
    """The host's state does not allow the operation (no trust root, lock held, no slot)."""

    exit_code = 5


class IntegrityError(AirgapError):
    """Local state was tampered with or damaged (audit chain broken, slot files changed)."""

    exit_code = 6


class ModelError(AirgapError):
    """The model cannot be loaded or run: bad file, missing runtime, failed health check."""

    exit_code = 7


class EnvironmentSetupError(AirgapError):
    """A bundle's package environment cannot be set up on this host (missing package, wrong
    Python, failed smoke import). The new slot is discarded; the active slot is untouched."""

    exit_code = 8


class ArtifactError(VerificationError):
    """A downloaded or cached artifact does not match the hash its lock pins."""


class LockError(InputError):
    """A lock cannot be made or used: unsolvable, wrong target platform, sdist-only package
    when no build is allowed, or a recipe environment that has no lock yet."""


class FetchError(AirgapError):
    """A URL cannot be fetched after retries (unreachable index, channel, hub or server)."""

    exit_code = 9


class HostBusyError(StateError):
    """Another state-changing operation holds the host lock: this one is refused, not run."""


class ActivatedError(AirgapError):
    """An install activated its new slot, then a later step failed (saving the host state,
    removing old slots). The new slot is active and the host consistent; the message says what
    to do about the step that failed."""

    exit_code = 10


class HostUnfitError(PolicyError):
    """The host cannot run a verified bundle: its CPU, memory, disk, Python, glibc or GPU falls
    short of what the signed manifest requires (appliance preflight, install step I3). Nothing
    was written; the message names every failed check and its fix. A refusal, like a policy's,
    with an exit code of its own, so that scripts can tell "wrong host" from "downgrade"."""

    exit_code = 11
