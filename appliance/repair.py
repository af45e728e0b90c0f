"""``appliance repair``: bring a damaged host back to a consistent state, on the record.

Damage is what an operator's hand, a disk or an attacker left that no install would: a
``current`` that points at a removed or foreign slot, entries in ``slots/`` that are not slots
(a stray directory, a symlink), an unreadable ``state.json``, a broken audit log. Every other
command refuses such a host before it writes anything and names this command; this command
makes the smallest change that restores the invariants, and says each one in its audit record:

- stray entries leave ``slots/``: symlinks are removed (only the link), anything else moves to
  ``quarantine/`` for inspection; nothing is deleted;
- ``current`` is pointed at the newest valid slot (``rollback --to`` then picks another), or
  removed when there is none;
- ``state.json`` is rebuilt from the slots, which are the ground truth it summarises;
- a broken audit log is only re-anchored when the operator says so
  (``--reanchor-audit-log``): that accepts the damage, so it is never implied. The old log is
  kept beside the new chain, whose first record names its hash (appliance.audit).
"""

from __future__ import annotations

from appliance.host import HostState, host_time
from appliance.installer import Appliance
from appliance.outcome import audited
from signing.errors import IntegrityError


def repair(app: Appliance, *, reanchor_audit_log: bool) -> list[str]:
    """Repair ``app``'s host; return what was done (empty when nothing needed it)."""
    app.paths.ensure()
    with app.locked("repair"):
        state, damage = app.load_state()
        clock = host_time(state, override=None)
        actions: list[str] = []
        try:
            app.audit.check()
        except IntegrityError as exc:
            if not reanchor_audit_log:
                raise IntegrityError(
                    f"{exc.diagnostics()}; nothing was changed: read 'appliance history', keep a "
                    "copy of the log if it is evidence, then run "
                    "'appliance repair --reanchor-audit-log'"
                ) from None
            kept = app.audit.reanchor(time=clock.system, problem=exc.diagnostics())
            actions.append(f"set the damaged audit log aside as {kept} and started a new chain")
        with audited(app.audit, "repair", clock) as record:
            record["actions"] = actions
            actions.extend(f"removed leftover {entry}" for entry in app.slots.recover())
            _, strays = app.slots.scan()
            actions.extend(app.slots.set_aside(entry) for entry, _ in strays)
            problem = app.slots.current_problem()
            if problem is not None:
                slots = app.slots.list()
                if slots:
                    app.slots.activate(slots[-1].path)
                    actions.append(f"{problem}: now points at slots/{slots[-1].id}")
                else:
                    app.slots.deactivate()
                    actions.append(f"{problem}: removed, no valid slot is left")
            rebuilt = _rebuild_state(app, state)
            if damage is not None or rebuilt != state:
                rebuilt.save(app.paths.state)
                why = damage.diagnostics() if damage else "behind the slots"
                actions.append(f"rebuilt state.json from the slots ({why.split(';')[0]})")
            record["actions"] = actions
        return actions


def _rebuild_state(app: Appliance, state: HostState) -> HostState:
    """``state`` with every valid slot accounted for (versions, signing times, numbers)."""
    rebuilt = HostState(
        highest=dict(state.highest),
        time_floor=state.time_floor,
        next_seq=state.next_seq,
        trial=state.trial,
    )
    app.account_for_slots(rebuilt)
    if rebuilt.trial is not None and rebuilt.trial.slot not in {s.id for s in app.slots.list()}:
        rebuilt.trial = None
    return rebuilt
