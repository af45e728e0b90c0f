"""The canary inside ``serve``: its model beside the active one, who goes to it, and its actor.

:class:`CanaryRoute` is what the request path sees: a second :class:`ModelHolder` and the state
that says which API keys it answers; the engine (``Engine._lease``, the one place a request's slot
is chosen) asks it for a lease first, and every request it answered is judged by its
:class:`~appliance.canary.CanaryWatch`. :class:`CanaryFollower` keeps it in step with
``ROOT/canary.json`` (a thread polls it, as :class:`~appliance.server.serve.SlotFollower` polls
``current``): it loads the canary slot's model after the memory preflight for both slots, swaps it
in, and drops it when the canary ends. It is also the automatic actor: when the watch finds a
threshold exceeded it stops routing at once, then aborts the canary on the host (audited, with the
numbers measured). When the canary's bundle carries an evaluation set (the evaluation gate's,
appliance.evalgate), both models answer it before anything is routed, and a mismatch above the
threshold aborts it the same way. It never promotes (docs/adr/0021-canary.md).

A canary that cannot be served (the model does not load, the two do not fit in memory) is aborted
the same way, with the reason; the active slot goes on answering everyone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Final

from appliance import canary
from appliance.canary import CANARY, Breach, CanaryState, CanaryWatch, Thresholds
from appliance.evalgate import EVAL_POLICY, EVAL_SET
from appliance.evalset import EvalItem, is_correct, parse_eval_set, parse_policy
from appliance.installer import Appliance
from appliance.runtime.base import Backend, ChatMessage, RuntimeSettings, SamplingParams
from appliance.runtime.loader import load_backend, slot_runtime_settings
from appliance.server.holder import Lease, ModelHolder
from appliance.server.poller import Poller
from appliance.server.record import RequestRecord
from appliance.slots import SlotPaths
from signing.errors import AirgapError, HostBusyError, StateError

log = logging.getLogger(__name__)

POLL_S: Final = 2.0
BUSY_RETRY_S: Final = 30.0


class CanaryRoute:
    """The canary's model and routing, as the request path sees them (thread-safe)."""

    def __init__(self, defaults: Thresholds) -> None:
        self.holder = ModelHolder()
        self.watch = CanaryWatch()
        self.defaults = defaults
        self._state: CanaryState | None = None

    @property
    def state(self) -> CanaryState | None:
        """The canary being served, or None."""
        return self._state

    def lease(self, key_name: str | None) -> Lease | None:
        """A lease on the canary's model if it answers ``key_name``, else None (the active)."""
        state = self._state
        if state is None or not state.routes(key_name):
            return None
        try:
            return self.holder.lease()
        except StateError:  # ended between the two reads: the active slot answers
            return None

    def observe(self, record: RequestRecord) -> None:
        """Count a request the canary answered: a 5xx is a failure; a client that left is not."""
        if record.slot == CANARY and record.status is not None:
            latency = time.monotonic() - record.started
            self.watch.add(failed=record.status >= 500, latency_s=latency)

    def limits(self) -> Thresholds:
        state = self._state
        own = state.thresholds if state is not None else Thresholds()
        return own.over(self.defaults)

    def begin(self, state: CanaryState, backend: Backend) -> None:
        self.holder.swap(backend)
        self.watch.reset()
        self._state = state

    def retarget(self, state: CanaryState) -> None:
        """The same slot with another share or other thresholds (a new ``canary start``)."""
        self.watch.reset()
        self._state = state

    def end(self) -> None:
        """Route nothing more to the canary; its model closes when its last request ends."""
        self._state = None
        self.holder.swap(None)
        self.watch.reset()

    def model(self) -> tuple[str, str, float | None] | None:
        """The canary's model id, version and load time, for ``/v1/models``."""
        state, backend = self._state, self.holder.get()
        if state is None or backend is None:
            return None
        return backend.model_id, state.version, self.holder.loaded_at()


class CanaryFollower(Poller):
    """Keeps ``route`` serving the canary that ``ROOT/canary.json`` names; aborts it when it
    exceeds its thresholds or cannot be served."""

    def __init__(
        self,
        root: Path,
        route: CanaryRoute,
        *,
        parallel: int,
        threads: int | None = None,
        load: Callable[[RuntimeSettings], Backend] = load_backend,
        interval_s: float = POLL_S,
        active: ModelHolder | None = None,
    ) -> None:
        super().__init__(
            name="appliance-canary", interval_s=interval_s, what="following the canary"
        )
        self._appliance = Appliance(root)
        self._active = active  # the active slot's model, for the evaluation set
        self._route = route
        self._parallel = parallel
        self._threads = threads
        self._load = load
        self._given_up: CanaryState | None = None  # aborted here; the host's abort may be due
        self._pending: tuple[str, dict[str, object] | None] | None = None  # (reason, measured)
        self._retry_at = 0.0  # the host lock was busy: the next abort attempt, not before
        self._damage: str | None = None  # the damage last logged (once, not every poll)

    def check(self) -> None:
        """Judge the canary, then follow the state file (one poll)."""
        self._judge()
        if self._pending is not None:
            self._abort_on_host()
        wanted = self._wanted()
        served = self._route.state
        if wanted is None or wanted == self._given_up:
            if served is not None:
                self._route.end()
                log.info("canary %s ended: the active slot answers everyone", served.version)
            return
        if served is not None and served.slot == wanted.slot:
            if served != wanted:
                self._route.retarget(wanted)
                log.info("canary %s now answers %s", wanted.version, wanted.share())
            return
        self._serve(wanted)

    def _wanted(self) -> CanaryState | None:
        try:
            wanted = CanaryState.load(self._appliance.paths.root)
            current = self._appliance.slots.current()
        except AirgapError as exc:  # damaged state: serve the active slot only, say why once
            if exc.diagnostics() != self._damage:
                self._damage = exc.diagnostics()
                log.error("no canary served: %s", self._damage)  # noqa: TRY400
            return None
        self._damage = None
        if wanted is None or current is None or wanted.slot == current.id:
            return None  # none, or promoted (the switch came before the state write)
        return wanted

    def _serve(self, wanted: CanaryState) -> None:
        slots = {s.id: s for s in self._appliance.slots.list()}
        active = self._appliance.slots.current()
        target = slots.get(wanted.slot)
        try:
            if target is None or active is None:
                raise StateError(f"the canary slot {wanted.slot} is gone")
            canary.require_memory_for_both(self._appliance, active, target)
            settings = slot_runtime_settings(target.path, parallel=self._parallel)
            if self._threads is not None:
                settings = replace(settings, threads=self._threads)
            backend = self._load(settings)
        except AirgapError as exc:
            self._give_up(wanted, f"the canary cannot be served: {exc.diagnostics()}", None)
            return
        breach = self._evaluate(target.path, backend)
        if breach is not None:
            backend.close()
            self._give_up(wanted, breach.reason, breach.measured)
            return
        self._route.begin(wanted, backend)
        log.info("canary %s (slot %s) answers %s", wanted.version, wanted.slot, wanted.share())

    def _evaluate(self, slot: Path, backend: Backend) -> Breach | None:
        """The canary's evaluation set (if its bundle carries one) answered by both models
        before any request is routed: a Breach when the share of items the active model gets
        right and the canary does not is above ``max_eval_mismatch``."""
        limit = self._route.limits().max_eval_mismatch
        if limit is None or self._active is None:
            return None
        payload = SlotPaths(slot).payload
        set_file, policy_file = payload / EVAL_SET, payload / EVAL_POLICY
        if not set_file.is_file() or not policy_file.is_file():
            return None
        try:
            items, problems = parse_eval_set(set_file.read_bytes())
            policy = parse_policy(policy_file.read_bytes())
        except (OSError, ValueError) as exc:
            return Breach(f"the canary's evaluation set is unreadable: {exc}", {})
        if problems or not items:
            return Breach(f"the canary's evaluation set is damaged: {problems[:1]}", {})
        lease = self._active.lease()
        try:
            active = [_answers_right(lease.backend, item, policy.max_tokens) for item in items]
        finally:
            lease.release()
        canary_right = [_answers_right(backend, item, policy.max_tokens) for item in items]
        regressions = sum(1 for a, c in zip(active, canary_right, strict=True) if a and not c)
        mismatch = regressions / len(items)
        measured = {
            "eval_items": len(items),
            "eval_active_correct": sum(active),
            "eval_canary_correct": sum(canary_right),
            "eval_regressions": regressions,
            "eval_mismatch": f"{mismatch:.4f}",
        }
        log.info("canary evaluation: %s", measured)
        if mismatch > limit:
            return Breach(
                f"evaluation mismatch {mismatch:.1%}: {regressions} of {len(items)} items the "
                f"active slot answers right, the canary does not (above {limit:.1%})",
                measured,
            )
        return None

    def _judge(self) -> None:
        state = self._route.state
        if state is None:
            return
        breach = self._route.watch.verdict(self._route.limits())
        if breach is not None:
            self._route.end()  # stop routing first: the host's record may have to wait
            self._give_up(state, breach.reason, breach.measured)

    def _give_up(self, state: CanaryState, reason: str, measured: dict[str, object] | None) -> None:
        log.error("aborting canary %s: %s", state.version, reason)
        self._given_up = state
        self._pending = (reason, measured)
        self._abort_on_host()

    def _abort_on_host(self) -> None:
        if self._pending is None or self._given_up is None:
            return
        if time.monotonic() < self._retry_at:
            return
        reason, measured = self._pending
        try:
            canary.abort(
                self._appliance,
                reason=reason,
                automatic=True,
                measured=measured,
                only=self._given_up.slot,
            )
        except HostBusyError:
            # An install or a command holds the lock (its refusal is audited): routing has
            # stopped already; try again in a while, not at every poll.
            self._retry_at = time.monotonic() + BUSY_RETRY_S
            return
        except AirgapError as exc:  # the operator changed the canary meanwhile: theirs wins
            log.warning("canary abort not recorded: %s", exc.diagnostics())
        self._pending = None


def _answers_right(backend: Backend, item: EvalItem, max_tokens: int) -> bool:
    """``item`` answered greedily, as the evaluation gate's child does (appliance.runtime.evalrun);
    an item the model refuses (too long for its context) is answered wrong."""
    try:
        prompt = item.prompt
        if prompt is None:
            prompt = backend.format_chat([ChatMessage(r, c) for r, c in item.messages])
        generation = backend.generate(
            prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0)
        )
        return is_correct(item, "".join(chunk.text for chunk in generation.chunks))
    except AirgapError:
        return False
