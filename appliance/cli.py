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
    from appliance.apikeys import KeyLimits, KeyStore
    from appliance.preflight import Check

_TIME_HELP = "Use this UTC time (YYYY-MM-DDTHH:MM:SSZ) instead of the system clock; logged."


_LAZY_COMMANDS: Final = {
    "serve": "appliance.server.command:serve",
    "monitoring": "appliance.monitoring.command:monitoring",
}


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
@click.version_option(package_name="airgap-appliance", prog_name="appliance")
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
@click.option(
    "--skip-eval",
    is_flag=True,
    help="Do not run the bundle's evaluation set against the active slot (audited).",
)
@click.option(
    "--accept-eval-drop",
    is_flag=True,
    help="Activate even if the evaluation gate fails (the scores are audited).",
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
    skip_eval: bool,
    accept_eval_drop: bool,
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
        skip_eval=skip_eval,
        accept_eval_drop=accept_eval_drop,
    )
    with ByteProgress() as progress:
        slot = app.install(bundle, options, progress=progress)
    # The evaluation gate's verdict (appliance.evalgate): a slot its policy installs as a
    # canary only is not the active one.
    from appliance.evalgate import describe_evaluation, slot_evaluation  # noqa: PLC0415

    evaluation = slot_evaluation(slot.path)
    current = app.slots.current()
    active = current is not None and current.id == slot.id
    if as_json:
        emit_json({**slot.to_json(), "active": active, "evaluation": evaluation})
        return
    if evaluation is not None:
        click.echo(describe_evaluation(evaluation), err=True)
    if active:
        click.echo(f"installed {slot.name} {slot.version} into slot {slot.id}; now active")
    else:
        click.echo(
            f"installed {slot.name} {slot.version} into slot {slot.id}; NOT activated: it "
            "failed its evaluation gate and its policy installs it as a canary only "
            f"('appliance canary start {slot.version}', or 'appliance rollback --to "
            f"{slot.version}' to activate it)"
        )


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
    if info.get("evaluation"):  # the active slot's evaluation gate (appliance.evalgate)
        from appliance.evalgate import describe_evaluation  # noqa: PLC0415

        click.echo(describe_evaluation(info["evaluation"]))
    for slot in info["slots"]:
        mark = "*" if active and slot["id"] == active["id"] else " "
        verdict = (slot.get("evaluation") or {}).get("verdict")
        click.echo(
            f"  {mark} {slot['id']}  installed {slot['installed']}  signers {len(slot['signers'])}"
            + (f"  evaluation {verdict}" if verdict else "")
        )


def _status(app: Appliance) -> dict[str, Any]:
    from appliance.evalgate import slot_evaluation  # noqa: PLC0415 - the runtime's modules

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
        "evaluation": slot_evaluation(current.path) if current else None,
        "slots": [{**s.to_json(), "evaluation": slot_evaluation(s.path)} for s in slots],
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
@click.option("--check", is_flag=True, help="Verify the request audit's chain (the only action).")
@click.option(
    "--file",
    "log_file",
    type=click.Path(path_type=Path),
    help="The request log (default: ROOT/requests.jsonl); its rotated files are found beside it.",
)
@pass_appliance
def requests(app: Appliance, check: bool, log_file: Path | None) -> None:
    """Verify the hash-chained request audit of 'serve'; exit 6 if it was tampered with."""
    from appliance.server.requestlog import check_log  # noqa: PLC0415

    if not check:
        raise click.UsageError("say what to do: 'appliance requests --check'")
    path = log_file or app.paths.root / "requests.jsonl"
    if not path.exists() and not log_file:
        raise InputError(f"no request log at {path}: give --file")
    report = check_log(path)
    click.echo(
        f"request log intact: {report.records} records in {report.files} file(s), "
        "hash chain verified"
    )
    if report.first_seq > 1:
        click.echo(
            f"note: the oldest file left starts at record {report.first_seq}: older files were "
            "archived or removed"
        )


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


_LIMIT_OPTIONS: Final = (
    click.option(
        "--scope",
        "scopes",
        multiple=True,
        help="Endpoints the key may use: chat, completions, embeddings, models, openai, ollama, "
        "metrics, health, docs, or a path prefix such as /v1/chat (repeatable or "
        "comma-separated; default: all).",
    ),
    click.option(
        "--model", "models", multiple=True, help="A model id the key may use (repeatable)."
    ),
    click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute at most."),
    click.option(
        "--tokens-per-day",
        type=click.IntRange(min=1),
        help="Prompt + completion tokens per rolling 24 hours at most.",
    ),
)
# --clear NAME -> the KeyLimits field it lifts
_LIMIT_FIELDS: Final = {
    "scope": "scopes",
    "model": "models",
    "rpm": "rpm",
    "tokens-per-day": "tokens_per_day",
}


def _limit_options(command: Any) -> Any:
    for option in reversed(_LIMIT_OPTIONS):
        command = option(command)
    return command


@keys.command("add")
@click.argument("name")
@_limit_options
@pass_appliance
def keys_add(
    app: Appliance,
    name: str,
    scopes: tuple[str, ...],
    models: tuple[str, ...],
    rpm: int | None,
    tokens_per_day: int | None,
) -> None:
    """Make a key called NAME and print it: it is shown this once and never stored.

    Without --scope, --model, --rpm or --tokens-per-day it may use every endpoint and model,
    without limit ('keys limit' changes that later)."""
    from appliance.apikeys import KeyLimits, scope_list  # noqa: PLC0415 - only the keys commands

    limits = KeyLimits(
        scopes=scope_list(scopes),
        models=tuple(dict.fromkeys(models)),
        rpm=rpm,
        tokens_per_day=tokens_per_day,
    )
    key = _key_store(app).add(name, limits)
    click.echo(key)
    click.echo(f"API key {name!r} created; store it now, it cannot be shown again", err=True)


keys.add_command(keys_add, "create")


@keys.command("limit")
@click.argument("name")
@_limit_options
@click.option(
    "--clear",
    "cleared",
    type=click.Choice(list(_LIMIT_FIELDS)),
    multiple=True,
    help="Lift this restriction (repeatable).",
)
@pass_appliance
def keys_limit(
    app: Appliance,
    name: str,
    scopes: tuple[str, ...],
    models: tuple[str, ...],
    rpm: int | None,
    tokens_per_day: int | None,
    cleared: tuple[str, ...],
) -> None:
    """Change the scopes and limits of the key called NAME; the options given replace the
    key's, the others stay. A running server applies them from its next request on."""
    from dataclasses import replace  # noqa: PLC0415 - only this command

    from appliance.apikeys import KeyLimits, scope_list  # noqa: PLC0415 - only the keys commands

    changes: dict[str, Any] = {}
    if scopes:
        changes["scopes"] = scope_list(scopes)
    if models:
        changes["models"] = tuple(dict.fromkeys(models))
    if rpm is not None:
        changes["rpm"] = rpm
    if tokens_per_day is not None:
        changes["tokens_per_day"] = tokens_per_day
    for option in cleared:
        field = _LIMIT_FIELDS[option]
        if field in changes:
            raise InputError(f"--clear {option} and --{option} at once: give one of them")
        changes[field] = KeyLimits.__dataclass_fields__[field].default  # () or None: no limit
    if not changes:
        raise InputError(
            "nothing to change: give --scope, --model, --rpm, --tokens-per-day or --clear"
        )
    key = _key_store(app).update_limits(name, lambda old: replace(old, **changes))
    click.echo(f"API key {name!r}: {_describe_limits(key.limits)}")


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def keys_list(app: Appliance, as_json: bool) -> None:
    """List the keys: names, creation times, scopes and limits (the keys themselves are not
    stored)."""
    stored = _key_store(app).list()
    if as_json:
        emit_json(
            [
                {
                    "name": k.name,
                    "created": k.created,
                    "scopes": list(k.limits.scopes),
                    "models": list(k.limits.models),
                    "rpm": k.limits.rpm,
                    "tokens_per_day": k.limits.tokens_per_day,
                }
                for k in stored
            ]
        )
        return
    for k in stored:
        click.echo(f"{k.name}  created {k.created}  {_describe_limits(k.limits)}")
    if not stored:
        click.echo("no API keys; create one with 'appliance keys add NAME'", err=True)


@keys.command("revoke")
@click.argument("name")
@pass_appliance
def keys_revoke(app: Appliance, name: str) -> None:
    """Revoke the key called NAME; a running server refuses it from its next request on."""
    _key_store(app).revoke(name)
    click.echo(f"API key {name!r} revoked")


@cli.group("self")
def self_group() -> None:
    """The standalone program itself: update it from a signed bundle, go back, test it."""


_HOME_OPTION = click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="APPLIANCE_PROGRAM_HOME",
    default=Path("/opt/appliance"),
    show_default=True,
    help="Where the program's versions live (HOME/current is the one in use).",
)


@self_group.command("update")
@click.option("--slot", "version", help="Take the program from this version's slot.")
@click.option("--allow-downgrade", is_flag=True, help="Replace it with an older or equal one.")
@_HOME_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def self_update(
    app: Appliance, version: str | None, allow_downgrade: bool, home: Path, as_json: bool
) -> None:
    """Switch to the appliance program a signed bundle carried (the active slot's by default):
    checked against the manifest, self-tested against this host, then one atomic rename."""
    from appliance import selfupdate  # noqa: PLC0415

    summary = selfupdate.update_audited(
        app, selfupdate.ProgramHome(home), version=version, allow_downgrade=allow_downgrade
    )
    if as_json:
        emit_json(summary)
    else:
        was = summary["replaced"] or "none"
        click.echo(f"program {summary['program_version']} is now current in {home} (was {was})")


@self_group.command("rollback")
@_HOME_OPTION
@pass_appliance
def self_rollback(app: Appliance, home: Path) -> None:
    """Go back to the program that the last update replaced."""
    from appliance import selfupdate  # noqa: PLC0415

    summary = selfupdate.rollback_audited(app, selfupdate.ProgramHome(home))
    click.echo(f"program {summary['program_version']} is current again in {home}")


@self_group.command("test")
@pass_appliance
def self_test(app: Appliance) -> None:
    """Check that this program reads this host's trust store, audit log and slots (read only)."""
    from appliance import selfupdate  # noqa: PLC0415

    click.echo(selfupdate.self_test(app.paths.root))


@cli.group()
def canary() -> None:
    """Serve a second slot to some API keys beside the active one (docs/operator-guide.md)."""


@canary.command("start")
@click.argument("version")
@click.option(
    "--percent",
    type=click.IntRange(0, 100),
    help="Share of the API keys routed to VERSION (sticky: sha256 of the key name mod 100).",
)
@click.option("--keys", "keys", multiple=True, help="Route this key to VERSION (repeatable).")
@click.option("--max-error-rate", type=click.FloatRange(0, 1), help="Abort above this 5xx share.")
@click.option("--max-p99-ms", type=click.IntRange(min=1), help="Abort above this p99 (ms).")
@click.option("--min-requests", type=click.IntRange(1, 200), help="Judge after this many.")
@click.option(
    "--max-eval-mismatch",
    type=click.FloatRange(0, 1),
    help="Abort above this share of evaluation items the active answers right, the canary not.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def canary_start(
    app: Appliance,
    version: str,
    percent: int | None,
    keys: tuple[str, ...],
    max_error_rate: float | None,
    max_p99_ms: int | None,
    min_requests: int | None,
    max_eval_mismatch: float | None,
    as_json: bool,
) -> None:
    """Make the installed slot of VERSION the canary: 'serve' loads it beside the active one
    (after a memory preflight for both) and routes a share of the keys, or named keys, to it."""
    from appliance import canary as canaries  # noqa: PLC0415 - only the canary commands

    limits = canaries.Thresholds(
        max_error_rate=max_error_rate,
        max_p99_ms=max_p99_ms,
        min_requests=min_requests,
        max_eval_mismatch=max_eval_mismatch,
    )
    known = frozenset(k.name for k in _key_store(app).list())
    state = canaries.start(
        app, version, percent=percent, keys=keys, thresholds=limits, known_keys=known
    )
    if as_json:
        emit_json(state.to_json())
    else:
        click.echo(f"canary {state.name} {state.version} (slot {state.slot}) for {state.share()}")


@canary.command("promote")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def canary_promote(app: Appliance, as_json: bool) -> None:
    """Make the canary slot the active one (the atomic switch of rollback); ends the canary."""
    from appliance import canary as canaries  # noqa: PLC0415

    before, after = canaries.promote(app)
    if as_json:
        emit_json({"from": before.to_json(), "to": after.to_json()})
    else:
        click.echo(f"promoted {after.name} {after.version} (slot {after.id}); was {before.version}")


@canary.command("abort")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def canary_abort(app: Appliance, as_json: bool) -> None:
    """End the canary: the active slot answers every key again."""
    from appliance import canary as canaries  # noqa: PLC0415

    ended = canaries.abort(app, reason="operator")
    if as_json:
        emit_json({"aborted": ended.to_json() if ended else None})
    else:
        click.echo(f"canary {ended.version} aborted" if ended else "damaged canary state cleared")


@canary.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_appliance
def canary_status(app: Appliance, as_json: bool) -> None:
    """Show the canary: its slot, who it answers, its thresholds."""
    from appliance import canary as canaries  # noqa: PLC0415

    info = canaries.status(app)
    if as_json:
        emit_json(info)
    elif info["canary"] is None:
        click.echo("no canary" if info["problem"] is None else f"damaged:  {info['problem']}")
    else:
        state = info["canary"]
        share = (
            f"{state['percent']}% of the keys"
            if state["percent"] is not None
            else ("keys " + ", ".join(state["keys"]))
        )
        click.echo(f"canary:   {state['name']} {state['version']} (slot {state['slot']})")
        click.echo(f"routes:   {share}, since {state['started']}")
        limits = state["thresholds"]
        click.echo(
            "aborts:   " + ", ".join(f"{k}={v}" for k, v in limits.items() if v is not None)
            if any(v is not None for v in limits.values())
            else "aborts:   at serve's thresholds (canary_max_error_rate, canary_max_p99_ms)"
        )
        if info["problem"]:
            click.echo(f"damaged:  {info['problem']}")
    if info["problem"]:
        raise IntegrityError(f"canary state: {info['problem']}")


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
@click.option("--tls-cert", type=click.Path(path_type=Path), help="Serve HTTPS with this PEM.")
@click.option("--tls-key", type=click.Path(path_type=Path), help="Its unencrypted PEM key.")
@click.option("--tls-min-version", type=click.Choice(["1.2", "1.3"]), help="Oldest TLS allowed.")
@pass_appliance
def service_install(
    app: Appliance,
    unit_dir: Path,
    host: str,
    port: int,
    user: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_min_version: str | None,
) -> None:
    """Write a systemd unit that runs 'serve' from the active slot (then: systemctl enable).

    It listens on loopback unless --host says otherwise; see docs/operator-guide.md for the
    firewall rule and TLS before opening it to the network."""
    spec = ServiceSpec(
        root=app.paths.root.resolve(),
        host=host,
        port=port,
        user=user,
        tls_cert=tls_cert.resolve() if tls_cert else None,
        tls_key=tls_key.resolve() if tls_key else None,
        tls_min_version=tls_min_version,
    )
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


def _describe_limits(limits: KeyLimits) -> str:
    """``scopes=chat,embeddings models=any rpm=60 tokens/day=unlimited``."""
    return (
        f"scopes={','.join(limits.scopes) or 'any'} models={','.join(limits.models) or 'any'} "
        f"rpm={limits.rpm or 'unlimited'} tokens/day={limits.tokens_per_day or 'unlimited'}"
    )


def _key_store(app: Appliance) -> KeyStore:
    from appliance.apikeys import KeyStore, key_file  # noqa: PLC0415 - only the keys commands

    return KeyStore(key_file(app.paths.root))


def main() -> NoReturn:
    run_cli(cli, "appliance")
