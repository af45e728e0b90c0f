"""The evaluation gate: a new slot must answer its bundle's evaluation set about as well as the
active slot does before it is activated (docs/adr/0020-evaluation-gate.md).

Step I7b of docs/bundle-format.md, after the health check and before the new slot is
committed. When the new bundle carries an evaluation set (payload ``eval/set.jsonl``, signed
like every other file, with its policy in ``eval/policy.json``), the new slot and the active
slot answer every item in turn, each in a child process as the health check runs
(appliance.runtime.evalrun), greedily with the same sampler and seed, one sequence at a time
and the same threads. The answers are scored item by item (appliance.evalset) and compared in
pairs with the exact McNemar test (appliance.evalstats).

The rule (the ADR explains it): the new slot **fails** the gate when its accuracy is more
than ``max_drop_points`` below the active slot's (with ``require_significance``: more than
that, *and* significantly worse at ``alpha`` by the one-sided exact test), or when its p95
latency per item is over ``latency_p95_ms``. A failing slot is refused (a
:class:`EvaluationGateError`, exit 4, one line with both scores, the p-value and the worst
items), or, when the policy says ``on_fail = "canary"``, installed without being activated.
The operator overrides with ``--accept-eval-drop`` (the failure is recorded, and the slot
activated) or skips the gate with ``--skip-eval``; both are audited.

With no active slot there is nothing to compare: the new slot is scored alone (latency budget
and all), for ``status``. What the gate found goes into the install's audit record
(``evaluation``) and, item by item with latencies, into the slot's ``evaluation.json``, which
``appliance status`` shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from appliance.evalset import (
    EVAL_POLICY,
    EVAL_SET,
    EvalItem,
    EvalPolicy,
    is_correct,
    parse_eval_set,
    parse_policy,
)
from appliance.evalstats import McNemar, mcnemar_exact, percentile
from appliance.fsutil import atomic_write
from appliance.limits import HOST_LIMITS
from appliance.runtime.loader import run_slot_child
from appliance.slots import SlotInfo, SlotPaths
from signing.bounded import listing, one_line, quote
from signing.canonical import encode_canonical
from signing.errors import IntegrityError, ModelError, PolicyError
from signing.manifest import BundleManifest

__all__ = [  # the payload paths are re-exported for the canary (appliance.server.canary)
    "EVAL_POLICY",
    "EVAL_SET",
    "RESULT_FILE",
    "Answer",
    "EvaluationGateError",
    "GateResult",
    "describe_evaluation",
    "evaluation_gate",
    "judge",
    "slot_evaluation",
]
RESULT_FILE: Final = "evaluation.json"  # in the slot directory, beside slot.json
PER_ITEM_TIMEOUT_S: Final = 30.0
WORST_SHOWN: Final = 5


class EvaluationGateError(PolicyError):
    """The new slot failed its evaluation gate and the policy refuses it (exit 4)."""


@dataclass(frozen=True)
class Answer:
    id: str
    correct: bool
    ms: float
    error: str | None = None


@dataclass(frozen=True)
class GateResult:
    """What the installer needs to know: activate the new slot, or only install it."""

    activate: bool
    summary: dict[str, Any] | None = None


def evaluation_gate(
    slot_dir: Path,
    active: SlotInfo | None,
    *,
    skip: bool,
    accept_drop: bool,
    record: dict[str, Any],
) -> GateResult:
    """Step I7b: run the gate for the staged ``slot_dir`` against ``active``; fill ``record``.

    Returns whether to activate; raises :class:`EvaluationGateError` for a refused slot and
    :class:`~signing.errors.ModelError` for a model that cannot answer.
    """
    if skip:  # the operator's overrides are audited whether or not the bundle has a set
        record["skip_eval"] = True
    if accept_drop:
        record["accept_eval_drop"] = True
    payload = SlotPaths(slot_dir).payload
    set_file, policy_file = payload / EVAL_SET, payload / EVAL_POLICY
    if not set_file.is_file() and not policy_file.is_file():
        return GateResult(activate=True)
    items, policy = _read_set(set_file, policy_file)
    if skip:
        summary: dict[str, Any] = {"verdict": "skipped", "items": len(items)}
        record["evaluation"] = summary
        atomic_write(slot_dir / RESULT_FILE, encode_canonical(summary))
        return GateResult(activate=True, summary=summary)
    threads = _threads(slot_dir)
    record["evaluation"] = {"verdict": "error", "items": len(items)}  # until it has answers
    new = _answers(slot_dir, set_file, items, policy, threads, what="the new slot")
    old = (
        None
        if active is None
        else _answers(active.path, set_file, items, policy, threads, what=f"slot {active.id}")
    )
    summary, line, failed = judge(items, new, old, policy)
    summary = _decimal_strings(summary)
    if active is not None:
        summary["active_slot"] = active.id
    if not failed:
        summary["verdict"] = "pass"
    elif accept_drop:
        summary["verdict"] = "accepted-by-operator"
    elif policy.on_fail == "canary":
        summary["verdict"] = "canary-only"
    else:
        summary["verdict"] = "refused"
    record["evaluation"] = summary
    if summary["verdict"] == "refused":
        raise EvaluationGateError(
            f"{line}; the active slot is unchanged (install with --accept-eval-drop to "
            "activate it anyway, audited)"
        )
    per_item = [
        {
            "id": item.id,
            "new": {"correct": n.correct, "ms": _decimal(n.ms)},
            "active": None if o is None else {"correct": o.correct, "ms": _decimal(o.ms)},
        }
        for item, n, o in zip(items, new, _or_nones(old, len(items)), strict=True)
    ]
    atomic_write(slot_dir / RESULT_FILE, encode_canonical({**summary, "per_item": per_item}))
    return GateResult(activate=summary["verdict"] != "canary-only", summary=summary)


def _or_nones(answers: list[Answer] | None, n: int) -> list[Answer | None]:
    return [None] * n if answers is None else list(answers)


def judge(
    items: list[EvalItem],
    new: list[Answer],
    old: list[Answer] | None,
    policy: EvalPolicy,
) -> tuple[dict[str, Any], str, bool]:
    """The summary for the audit record, the one line for the operator, and whether the new
    slot fails the policy (pure: the rule of docs/adr/0020)."""
    n = len(items)
    summary: dict[str, Any] = {"items": n, "new": _scores(new), "policy": policy.to_json()}
    reasons: list[str] = []
    parts = [f"new {_score_text(new)}"]
    if old is not None:
        summary["active"] = _scores(old)
        improved = sum(1 for a, b in zip(old, new, strict=True) if b.correct and not a.correct)
        regressed = [i.id for i, a, b in zip(items, old, new, strict=True) if a.correct > b.correct]
        test = mcnemar_exact(improved=improved, regressed=len(regressed))
        drop = 100 * (len(regressed) - improved) / n
        summary.update(
            drop_points=round(drop, 3),
            improved=improved,
            regressed=len(regressed),
            p_worse=test.p_worse,
            p_two_sided=test.p_two_sided,
            worst_items=regressed[:WORST_SHOWN],
        )
        parts[0] += f" vs active {_score_text(old)}"
        parts.append(_drop_text(drop, test, policy))
        if _fails_accuracy(drop, test, policy):
            reasons.append("accuracy")
        if regressed:
            more = len(regressed) - WORST_SHOWN
            shown = ", ".join(regressed[:WORST_SHOWN]) + (f" (+{more} more)" if more > 0 else "")
            parts.append(f"worst items: {shown}")
    p95 = summary["new"]["p95_ms"]
    budget = policy.latency_p95_ms
    latency = f"p95 {p95:.0f} ms/item"
    if old is not None:
        latency += f" vs {summary['active']['p95_ms']:.0f} ms"
    if budget is not None:
        latency += f" (budget {budget:g} ms)"
        if p95 > budget:
            reasons.append("latency")
    parts.append(latency)
    summary["failed"] = reasons or None
    verdict = "FAILED" if reasons else "passed"
    line = f"evaluation gate {verdict} on {n} items: " + "; ".join(parts)
    summary["line"] = line
    return summary, line, bool(reasons)


def _decimal(value: float) -> str:
    return f"{value:.6g}"


def _decimal_strings(value: Any) -> Any:
    """``value`` with every float written as a decimal string: audit records and slot files
    are canonical JSON, which has no floats (signing.canonical)."""
    if isinstance(value, float):
        return _decimal(value)
    if isinstance(value, dict):
        return {k: _decimal_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decimal_strings(v) for v in value]
    return value


def _fails_accuracy(drop: float, test: McNemar, policy: EvalPolicy) -> bool:
    beyond = drop > policy.max_drop_points
    if policy.require_significance:
        return beyond and test.p_worse < policy.alpha
    return beyond


def _drop_text(drop: float, test: McNemar, policy: EvalPolicy) -> str:
    sign = "drop" if drop >= 0 else "gain"
    significant = "significant" if test.p_worse < policy.alpha else "not significant"
    return (
        f"{sign} {abs(drop):.1f} points (allowed {policy.max_drop_points:g}), "
        f"exact McNemar p={test.p_worse:.3g} one-sided, {significant} at {policy.alpha:g} "
        f"({test.regressed} worse, {test.improved} better)"
    )


def _scores(answers: list[Answer]) -> dict[str, Any]:
    latencies = [a.ms for a in answers]
    correct = sum(a.correct for a in answers)
    return {
        "correct": correct,
        "accuracy": round(100 * correct / len(answers), 3),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "errors": sum(a.error is not None for a in answers) or None,
    }


def _score_text(answers: list[Answer]) -> str:
    correct = sum(a.correct for a in answers)
    return f"{100 * correct / len(answers):.1f}% ({correct}/{len(answers)})"


def _read_set(set_file: Path, policy_file: Path) -> tuple[list[EvalItem], EvalPolicy]:
    try:
        data, policy_bytes = set_file.read_bytes(), policy_file.read_bytes()
    except OSError as exc:
        raise PolicyError(
            f"the bundle carries {EVAL_SET} and {EVAL_POLICY} only together: "
            f"{quote(exc.filename)} is missing"
        ) from None
    try:
        policy = parse_policy(policy_bytes)
    except ValueError as exc:
        raise PolicyError(f"{EVAL_POLICY}: {exc}") from None
    items, problems = parse_eval_set(data)
    if problems:
        raise PolicyError(f"{EVAL_SET}: {listing(problems)}")
    if len(items) < policy.min_items:
        raise PolicyError(
            f"{EVAL_SET} has {len(items)} items; its policy asks for at least {policy.min_items}"
        )
    return items, policy


def _threads(slot_dir: Path) -> int:
    """The threads both slots answer with: the new manifest's, else each slot's default (0)."""
    try:
        manifest = BundleManifest.from_bytes(SlotPaths(slot_dir).manifest.read_bytes())
    except OSError as exc:
        raise IntegrityError(f"slot {slot_dir.name} has no readable manifest: {exc}") from None
    threads = manifest.runtime.get("threads")
    return threads if isinstance(threads, int) else 0


def _answers(
    slot: Path,
    set_file: Path,
    items: list[EvalItem],
    policy: EvalPolicy,
    threads: int,
    *,
    what: str,
) -> list[Answer]:
    """``slot``'s answers to every item, from an evaluation child (appliance.runtime.evalrun),
    in the set's order."""
    timeout = HOST_LIMITS.health_check_timeout_s + PER_ITEM_TIMEOUT_S * len(items)
    result = run_slot_child(
        slot,
        "appliance.runtime.evalrun",
        str(set_file),
        str(policy.max_tokens),
        str(threads),
        timeout_s=timeout,
    )
    if result is None:
        raise ModelError(
            f"evaluation gate: {what} did not answer the set within {timeout:.0f} s "
            "(install with --skip-eval to skip the gate, audited)"
        )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = one_line(lines[-1]) if lines else f"exit status {result.returncode}"
        raise ModelError(
            f"evaluation gate: {what} could not answer the set: {reason} "
            "(install with --skip-eval to skip the gate, audited)"
        )
    by_id: dict[str, dict[str, Any]] = {}
    for line in result.stdout.splitlines():
        try:
            obj = json.loads(line)
            by_id[str(obj["id"])] = obj
        except (ValueError, KeyError, TypeError):
            continue
    answers = []
    for item in items:
        obj = by_id.get(item.id)
        if obj is None:
            raise ModelError(f"evaluation gate: {what} gave no answer for item {quote(item.id)}")
        answer, error = obj.get("answer"), obj.get("error")
        correct = isinstance(answer, str) and is_correct(item, answer)
        answers.append(Answer(item.id, correct, float(obj.get("ms", 0.0)), error))
    return answers


def slot_evaluation(slot: Path) -> dict[str, Any] | None:
    """The gate's summary for an installed slot (``status``), without the per-item lists;
    None when it had no evaluation set or the file is unreadable."""
    try:
        data = json.loads((slot / RESULT_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    data.pop("per_item", None)
    return data


def describe_evaluation(summary: dict[str, Any]) -> str:
    """One line of ``status`` for a slot's evaluation summary."""
    verdict = summary.get("verdict", "?")
    if verdict == "skipped":
        return f"evaluation: skipped by the operator ({summary.get('items')} items)"
    line = str(summary.get("line", ""))
    return f"evaluation: {verdict}: {line.split(': ', 1)[-1]}"
