"""``appliance``: the offline half's command line (docs/cli.md)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

import click

from appliance.console import ByteProgress, emit_json, parse_cli_time, run_cli
from appliance.host import check_signing_time, host_time
from appliance.installer import Appliance, InstallOptions
from appliance.limits import HOST_LIMITS
from appliance.outcome import audited
from appliance.provenance import describe_provenance, slot_provenance
from appliance.service import DEFAULT_UNIT_DIR, UNIT_NAME, ServiceSpec, write_unit
from appliance.slots import DEFAULT_ROOT
from appliance.trust import read_root_file
from appliance.verifier import verify_head
from signing.bundle import open_bundle, read_head
from signing.canonical import encode_canonical, format_time
from signing.errors import InputError, IntegrityError

if TYPE_CHECKING:
    from appliance.apikeys import KeyStore
    from appliance.preflight import Check

_TIME_HELP = "Use this UTC time (YYYY-MM-DDTHH:MM:SSZ) instead of the system clock; logged."


_LAZY_COMMANDS: Final = {"serve": "appliance.server.command:serve"}


class _LazyGroup(click.Group):
    """Loads heavy commands on first use: ``serve`` brings pydantic-settings, FastAPI and
    uvicorn, which every other command (install, verify, rollback) would otherwise pay for in
    start-up time. The pattern is click's documented lazy loading of subcommands."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS:
            module_name, _, attribute = _LAZY_COMMANDS[cmd_name].partition(":")
            command = getattr(importlib.import_module(module_name), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{_LAZY_COMMANDS[cmd_name]} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    "root",
    type=click.Path(path_type=Path),
    envvar="APPLIANCE_ROOT",
    default=DEFAULT_ROOT,
    show_default=True,
    help="Appliance state directory.",
)
@click.pass_context
def cli(ctx: click.Context, root: Path) -> None:
    """Verify, install, roll back and inspect signed bundles on an isolated host."""
    ctx.obj = Appliance(root)


pass_appliance = click.make_pass_decorator(Appliance)


@cli.group()
def trust() -> None:
    """Manage the trusted root of keys."""


@trust.command("init")
@click.argument("root_json", type=click.Path(path_type=Path))
@click.option("--fingerprint", help="Expected root fingerprint (sha256 hex), compared exactly.")
@pass_appliance
def trust_init(app: Appliance, root_json: Path, fingerprint: str | None) -> None:
    """Trust ROOT_JSON as this host's first root; prints its fingerprint."""
    fp = app.trust_init(read_root_file(root_json), fingerprint=fingerprint)
    click.echo(f"trusted root installed; fingerprint {fp}")
    if fingerprint is None:
        click.echo(
            "compare this fingerprint with the one the key holders gave you out of band", err=True
        )


@trust.command("update")
@click.argument("root_json", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--assume-time", help=_TIME_HELP)
@pass_appliance
def trust_update(app: Appliance, root_json: tuple[Path, ...], assume_time: str | None) -> None:
    """Rotate to each ROOT_JSON in turn (version N+1 signed by N's and its own threshold)."""
    for path in root_json:
        version = app.trust_update(read_root_file(path), assume_time=parse_cli_time(assume_time))
        click.echo(f"trusted root is now version {version}")


@cli.command()
@click.argument("bundle", nargs=-1, required=True)
@click.option("--assume-time", help=_TIME_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def verify(app: Appliance, bundle: tuple[str, ...], assume_time: str | None, as_json: bool) -> None:
    """Check BUNDLE's signatures and every byte, writing nothing.

    BUNDLE is a bundle file, '-' (standard input), or split parts: a directory, or part files
    (and their .parts.json index), possibly on several mounts."""
    with ByteProgress() as progress:
        verified = app.verify(bundle, assume_time=parse_cli_time(assume_time), progress=progress)
    m = verified.manifest
    if as_json:
        emit_json(
            {
                "name": m.name,
                "version": m.version,
                "verified": True,
                "manifest_sha256": verified.manifest_sha256,
                "signers": sorted(verified.signers),
                "payload_bytes": m.payload_size,
            }
        )
    else:
        click.echo(
            f"OK {m.name} {m.version}: {len(m.entries)} files, {m.payload_size} bytes, "
            f"signed by {len(verified.signers)} trusted key(s)"
        )


@cli.command()
@click.argument("bundle", nargs=-1, required=True)
@click.option(
    "--allow-downgrade",
    is_flag=True,
    help="Install even if not newer than the highest installed version (logged).",
)
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    default=HOST_LIMITS.default_keep,
    show_default=True,
    help="Slots to keep, the active one included.",
)
@click.option("--assume-time", help=_TIME_HELP)
@click.option(
    "--skip-health-check",
    is_flag=True,
    envvar="APPLIANCE_SKIP_HEALTH_CHECK",
    help="Activate without loading the model first (hosts that cannot load it now; logged).",
)
@click.option(
    "--grace-period",
    type=click.IntRange(min=0, max=HOST_LIMITS.max_grace_period_s),
    default=HOST_LIMITS.default_grace_period_s,
    show_default=True,
    help="Seconds after activation in which 'serve' rolls back by itself if the model fails.",
)
@click.option(
    "--skip-preflight",
    is_flag=True,
    help="Install even if the host lacks what the bundle requires (logged; see 'preflight').",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def install(
    app: Appliance,
    bundle: tuple[str, ...],
    allow_downgrade: bool,
    keep: int,
    assume_time: str | None,
    skip_health_check: bool,
    grace_period: int,
    skip_preflight: bool,
    as_json: bool,
) -> None:
    """Verify BUNDLE, install it into a new slot, check its model runs, then switch to it.

    BUNDLE is a bundle file, '-' (standard input), or split parts: a directory, or part files
    (and their .parts.json index), possibly on several mounts; a bad part is named before
    anything is written, or rebuilt from parity."""
    options = InstallOptions(
        allow_downgrade=allow_downgrade,
        keep=keep,
        assume_time=parse_cli_time(assume_time),
        skip_health_check=skip_health_check,
        grace_period_s=grace_period,
        skip_preflight=skip_preflight,
    )
    with ByteProgress() as progress:
        slot = app.install(bundle, options, progress=progress)
    if as_json:
        emit_json(slot.to_json())
    else:
        click.echo(f"installed {slot.name} {slot.version} into slot {slot.id}; now active")


@cli.command()
@click.option("--to", "to_version", help="Version to switch to (default: the previous slot).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def rollback(app: Appliance, to_version: str | None, as_json: bool) -> None:
    """Switch back to an earlier slot, atomically and in constant time."""
    before, after = app.rollback(to=to_version)
    if as_json:
        emit_json({"from": before.to_json(), "to": after.to_json()})
    else:
        click.echo(
            f"rolled back {before.name} {before.version} -> {after.version} (slot {after.id})"
        )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def status(app: Appliance, as_json: bool) -> None:
    """Show the active slot, the other slots and the trusted root."""
    info = _status(app)
    if as_json:
        emit_json(info)
    else:
        _print_status(app, info)
    if problems := info["problems"]:
        more = f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""
        raise IntegrityError(f"host state is damaged: {problems[0]}{more}")


def _print_status(app: Appliance, info: dict[str, Any]) -> None:
    root = info["trust"]
    click.echo(f"root:     {app.paths.root}")
    if root:
        click.echo(
            f"trust:    root version {root['version']}, expires {root['expires']}, "
            f"fingerprint {root['fingerprint'][:16]}"
        )
    else:
        click.echo("trust:    not initialised")
    active = info["active"]
    click.echo(
        f"active:   {active['name']} {active['version']} (slot {active['id']})"
        if active
        else "active:   none"
    )
    for problem in info["problems"]:
        click.echo(f"damaged:  {problem}")
    if info["provenance"]:
        for line in describe_provenance(info["provenance"]):
            click.echo(line)
    for slot in info["slots"]:
        mark = "*" if active and slot["id"] == active["id"] else " "
        click.echo(
            f"  {mark} {slot['id']}  installed {slot['installed']}  signers {len(slot['signers'])}"
        )


def _status(app: Appliance) -> dict[str, Any]:
    trust_info = None
    if app.trust.is_initialised():
        signed = app.trust.load()
        trust_info = {
            "version": signed.root.version,
            "expires": format_time(signed.root.expires),
            "fingerprint": signed.fingerprint,
        }
    # status is where an operator looks when something is wrong: it shows damage, with its
    # repair, instead of failing on it.
    problems: list[str] = []
    current = None
    if (problem := app.slots.current_problem()) is not None:
        problems.append(f"{problem}; run 'appliance repair'")
    else:
        current = app.slots.current()
    slots, strays = app.slots.scan()
    problems.extend(f"slots/{e.name}: {why}; run 'appliance repair'" for e, why in strays)
    state, damage = app.load_state()
    if damage is not None:
        problems.append(damage.diagnostics())
    return {
        "root": str(app.paths.root),
        "trust": trust_info,
        "active": current.to_json() if current else None,
        "provenance": slot_provenance(current.path) if current else None,
        "slots": [s.to_json() for s in slots],
        "highest_installed": state.highest,
        "time_floor": format_time(state.time_floor) if state.time_floor else None,
        "problems": problems,
    }


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line, as stored.")
@click.option("--check", is_flag=True, help="Verify the hash chain; exit 6 if it is broken.")
@pass_appliance
def history(app: Appliance, as_json: bool, check: bool) -> None:
    """Show the audit log of everything that happened to this host."""
    if check:
        count = app.audit.check()
        click.echo(f"audit log intact: {count} records, hash chain verified")
        if torn := app.audit.torn_tail():
            click.echo(
                f"note: {torn} bytes of an interrupted append follow the last record; the next "
                "operation moves them aside and records that it did"
            )
        return
    for record in app.audit.records():
        if as_json:
            click.echo(encode_canonical(record).decode("utf-8"))
            continue
        what = " ".join(str(record[k]) for k in ("name", "version") if k in record)
        line = f"{record['seq']:>4} {record['time']} {record['event']:<12} {record['outcome']:<8}"
        click.echo(f"{line} {what}" + (f"  {record['error']}" if "error" in record else ""))


@cli.command()
@click.option(
    "--reanchor-audit-log",
    is_flag=True,
    help="Accept a broken audit log: keep it aside and start a new chain that names it.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def repair(app: Appliance, reanchor_audit_log: bool, as_json: bool) -> None:
    """Bring a damaged host state back to consistency (audited; see docs/cli.md)."""
    from appliance.repair import repair as run_repair  # noqa: PLC0415 - only this command

    actions = run_repair(app, reanchor_audit_log=reanchor_audit_log)
    if as_json:
        emit_json({"actions": actions})
        return
    for action in actions:
        click.echo(action)
    click.echo("host state consistent" + ("" if actions else "; nothing to repair"))


@cli.group()
def keys() -> None:
    """Manage the API keys of the REST server (ROOT/api-keys.json)."""


@keys.command("add")
@click.argument("name")
@pass_appliance
def keys_add(app: Appliance, name: str) -> None:
    """Make a key called NAME and print it: it is shown this once and never stored."""
    key = _key_store(app).add(name)
    click.echo(key)
    click.echo(f"API key {name!r} created; store it now, it cannot be shown again", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def keys_list(app: Appliance, as_json: bool) -> None:
    """List the keys: names and creation times (the keys themselves are not stored)."""
    stored = _key_store(app).list()
    if as_json:
        emit_json([{"name": k.name, "created": k.created} for k in stored])
        return
    for k in stored:
        click.echo(f"{k.name}  created {k.created}")
    if not stored:
        click.echo("no API keys; create one with 'appliance keys add NAME'", err=True)


@keys.command("revoke")
@click.argument("name")
@pass_appliance
def keys_revoke(app: Appliance, name: str) -> None:
    """Revoke the key called NAME; a running server refuses it from its next request on."""
    _key_store(app).revoke(name)
    click.echo(f"API key {name!r} revoked")


@cli.group()
def service() -> None:
    """Run the REST server as a system service."""


@service.command("install")
@click.option(
    "--unit-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_UNIT_DIR,
    show_default=True,
    help="Where to write appliance.service.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--user", help="Run the service as this user (default: the unit's default).")
@pass_appliance
def service_install(app: Appliance, unit_dir: Path, host: str, port: int, user: str | None) -> None:
    """Write a systemd unit that runs 'serve' from the active slot (then: systemctl enable)."""
    spec = ServiceSpec(root=app.paths.root.resolve(), host=host, port=port, user=user)
    path = write_unit(spec, unit_dir)
    click.echo(f"wrote {path}; run 'systemctl daemon-reload && systemctl enable --now {UNIT_NAME}'")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--assume-time", help=_TIME_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def preflight(app: Appliance, bundle: Path, assume_time: str | None, as_json: bool) -> None:
    """Will BUNDLE run on this host? Checks what its signed head requires; exit 11 if not."""
    # Only this command and install need the checks; the head is verified as verify's V1-V5.
    from appliance.hostfacts import check_host  # noqa: PLC0415
    from appliance.preflight import require_fit  # noqa: PLC0415

    state, damage = app.load_state()
    clock = host_time(state, override=parse_cli_time(assume_time))
    with audited(app.audit, "preflight", clock) as record:
        if damage is not None:
            raise damage
        root = app.trust.load().root
        try:
            stream = bundle.open("rb")
        except OSError as exc:
            raise InputError(f"cannot open bundle {bundle}: {exc.strerror}") from None
        with stream:
            head = read_head(open_bundle(stream, app.limits), app.limits)
        verified = verify_head(head, root=root, now=clock.now)
        check_signing_time(verified.manifest.created, clock)
        m = verified.manifest
        record.update(name=m.name, version=m.version, manifest_sha256=verified.manifest_sha256)
        checks = [] if m.requires is None else check_host(m.requires, app.paths.root)
        record["failed_checks"] = [c.name for c in checks if not c.ok] or None
        if as_json:
            emit_json(
                {
                    "name": m.name,
                    "version": m.version,
                    "ok": all(c.ok for c in checks),
                    "requires": None if m.requires is None else m.requires.to_dict(),
                    "checks": [c.to_json() for c in checks],
                }
            )
        elif m.requires is None:
            click.echo(f"{m.name} {m.version} states no host requirements (made before preflight)")
        else:
            _print_checks(f"{m.name} {m.version} on this host", checks)
        require_fit(checks, bundle=f"{m.name} {m.version}")


def _print_checks(title: str, checks: list[Check]) -> None:
    from rich.console import Console  # noqa: PLC0415 - only for this table
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    table = Table(title=title, title_justify="left")
    for column in ("check", "result", "found", "needed", "fix"):
        table.add_column(column, overflow="fold")
    for c in checks:
        result = Text("ok", style="green") if c.ok else Text("FAIL", style="bold red")
        # Text, not markup: found values come from the host ("[gpu]" is no style).
        cells = (Text(c.name), result, Text(c.found), Text(c.needed), Text(c.fix))
        table.add_row(*cells, style=None if c.ok else "red")
    Console(width=max(Console().width, 120)).print(table)


def _key_store(app: Appliance) -> KeyStore:
    from appliance.apikeys import KeyStore, key_file  # noqa: PLC0415 - only the keys commands

    return KeyStore(key_file(app.paths.root))


def main() -> NoReturn:
    run_cli(cli, "appliance")
