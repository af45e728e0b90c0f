"""The evaluation set and its policy: parsed strictly, scored by one definition.

Pure: bytes in, typed items out, with every bad line named. The builder checks a recipe's set
here before it packs it (builder.evalset), and the host reads the signed copy with the same
code before the evaluation gate runs it (appliance.evalgate); the format is documented in
docs/recipe.md, ``[evaluation]``, and the decision in docs/adr/0020-evaluation-gate.md.

A set is JSON Lines: one object per line, blank lines ignored::

    {"id": "cap-fr", "prompt": "The capital of France is", "expected": "Paris",
     "check": "contains"}
    {"id": "q7", "messages": [{"role": "user", "content": "2+2? A) 3 B) 4"}],
     "expected": "B", "check": "choice"}

``check`` is one of ``exact`` (the answer, stripped, equals ``expected`` stripped),
``contains`` (``expected`` occurs in the answer), ``regex`` (Python ``re.search`` of the
pattern ``expected`` finds a match in the answer) or ``choice`` (the answer's leading label,
the first run of letters and digits after optional blanks and an opening parenthesis, equals
``expected``, ignoring case: "B", "(b)", "B. four" all answer "B"). Default: ``exact``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from signing.bounded import listing, quote

Check = Literal["exact", "contains", "regex", "choice"]
CHECKS: Final = ("exact", "contains", "regex", "choice")
ROLES: Final = frozenset({"system", "user", "assistant"})
OnFail = Literal["refuse", "canary"]

MAX_SET_BYTES: Final = 16 << 20
MAX_ITEMS: Final = 10_000
MAX_LINE_BYTES: Final = 64 << 10
MAX_EXPECTED: Final = 1000
MAX_MESSAGES: Final = 64
MAX_TOKENS_LIMIT: Final = 1024
_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
_ITEM_KEYS: Final = frozenset({"id", "prompt", "messages", "expected", "check"})
_LABEL: Final = re.compile(r"\s*\(?\s*([A-Za-z0-9]+)")

POLICY_VERSION: Final = 1
EVAL_SET: Final = "eval/set.jsonl"  # the payload paths the builder packs them at
EVAL_POLICY: Final = "eval/policy.json"


class _BadLineError(Exception):
    """One line of a set is bad: the message says why (parse_eval_set names the line)."""


@dataclass(frozen=True)
class EvalItem:
    id: str
    expected: str
    check: Check
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The item as the evaluation child reads it."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "messages": [list(m) for m in self.messages] or None,
        }


@dataclass(frozen=True, kw_only=True)
class EvalPolicy:
    """What the gate allows (docs/recipe.md, ``[evaluation]``)."""

    max_drop_points: float = 5.0
    min_items: int = 20
    latency_p95_ms: float | None = None
    on_fail: OnFail = "refuse"
    max_tokens: int = 32
    require_significance: bool = False
    alpha: float = 0.05

    def __post_init__(self) -> None:
        problems = policy_problems(self)
        if problems:
            raise ValueError(listing(problems))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": POLICY_VERSION,
            "max_drop_points": self.max_drop_points,
            "min_items": self.min_items,
            "latency_p95_ms": self.latency_p95_ms,
            "on_fail": self.on_fail,
            "max_tokens": self.max_tokens,
            "require_significance": self.require_significance,
            "alpha": self.alpha,
        }


def policy_problems(policy: EvalPolicy) -> list[str]:
    problems = []
    if not 0 <= policy.max_drop_points <= 100:
        problems.append(f"max_drop_points must be in [0, 100], not {policy.max_drop_points}")
    if not 1 <= policy.min_items <= MAX_ITEMS:
        problems.append(f"min_items must be in [1, {MAX_ITEMS}], not {policy.min_items}")
    if policy.latency_p95_ms is not None and not 0 < policy.latency_p95_ms <= 3_600_000:
        problems.append(f"latency_p95_ms must be in (0, 3600000], not {policy.latency_p95_ms}")
    if policy.on_fail not in ("refuse", "canary"):
        problems.append(f"on_fail must be 'refuse' or 'canary', not {quote(policy.on_fail)}")
    if not 1 <= policy.max_tokens <= MAX_TOKENS_LIMIT:
        problems.append(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], not {policy.max_tokens}")
    if not 0 < policy.alpha < 1:
        problems.append(f"alpha must be in (0, 1), not {policy.alpha}")
    return problems


def parse_policy(data: bytes) -> EvalPolicy:
    """The policy file the builder wrote (``eval/policy.json``); ValueError names the fault."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("the evaluation policy is not JSON") from None
    if not isinstance(obj, dict) or obj.get("version") != POLICY_VERSION:
        raise ValueError(f"the evaluation policy is not version {POLICY_VERSION}")
    fields = {k: v for k, v in obj.items() if k != "version"}
    unknown = set(fields) - set(EvalPolicy.__dataclass_fields__)
    if unknown:
        raise ValueError(f"the evaluation policy has unknown keys: {listing(sorted(unknown))}")
    types: Mapping[str, tuple[type, ...]] = {
        "max_drop_points": (int, float),
        "min_items": (int,),
        "latency_p95_ms": (int, float, type(None)),
        "on_fail": (str,),
        "max_tokens": (int,),
        "require_significance": (bool,),
        "alpha": (float, int),
    }
    for key, value in fields.items():
        wrong_bool = isinstance(value, bool) and bool not in types[key]
        if wrong_bool or not isinstance(value, types[key]):
            raise ValueError(f"the evaluation policy's {key} has the wrong type")
    return EvalPolicy(**fields)


def parse_eval_set(data: bytes) -> tuple[list[EvalItem], list[str]]:
    """The items of a set and one problem per bad line (``line N: why``); a set with problems
    must be refused whole. Bounded: the size, the line length and the item count."""
    if len(data) > MAX_SET_BYTES:
        return [], [f"the set has {len(data)} bytes; at most {MAX_SET_BYTES}"]
    items: list[EvalItem] = []
    problems: list[str] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(items) + len(problems) >= MAX_ITEMS:
            problems.append(f"line {number}: more than {MAX_ITEMS} items")
            break
        try:
            item = _item(raw, number)
        except _BadLineError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        if item.id in seen:
            problems.append(f"line {number}: id {quote(item.id)} is used twice")
            continue
        seen.add(item.id)
        items.append(item)
    if not items and not problems:
        problems.append("the set has no items")
    return items, problems


def _item(raw: bytes, number: int) -> EvalItem:
    if len(raw) > MAX_LINE_BYTES:
        raise _BadLineError(f"{len(raw)} bytes; a line has at most {MAX_LINE_BYTES}")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _BadLineError("not UTF-8") from None
    except ValueError as exc:
        raise _BadLineError(f"not JSON ({exc.args[0].split(':')[0]})") from None
    if not isinstance(obj, dict):
        raise _BadLineError("not a JSON object")
    unknown = set(obj) - _ITEM_KEYS
    if unknown:
        raise _BadLineError(f"unknown key {quote(sorted(unknown)[0])}")
    item_id = obj.get("id", f"line-{number}")
    if not isinstance(item_id, str) or not _ID.fullmatch(item_id):
        raise _BadLineError(f"id {quote(item_id)} is not [A-Za-z0-9][A-Za-z0-9._:/-]{{0,63}}")
    expected = obj.get("expected")
    if not isinstance(expected, str) or not expected.strip() or len(expected) > MAX_EXPECTED:
        raise _BadLineError(f"'expected' must be a non-blank string of <= {MAX_EXPECTED} chars")
    check = obj.get("check", "exact")
    if check not in CHECKS:
        raise _BadLineError(f"'check' must be one of {', '.join(CHECKS)}, not {quote(check)}")
    if check == "regex":
        try:
            re.compile(expected)
        except re.error as exc:
            raise _BadLineError(f"'expected' is not a regular expression: {exc}") from None
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise _BadLineError("give exactly one of 'prompt' or 'messages'")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise _BadLineError("'prompt' must be a non-empty string")
        return EvalItem(id=item_id, expected=expected, check=check, prompt=prompt)
    return EvalItem(id=item_id, expected=expected, check=check, messages=_messages(messages))


def _messages(messages: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise _BadLineError(f"'messages' must be a list of 1 to {MAX_MESSAGES} messages")
    out = []
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or set(message) != {"role", "content"}
            or message["role"] not in ROLES
            or not isinstance(message["content"], str)
        ):
            raise _BadLineError(
                f'messages[{i}] must be {{"role": system|user|assistant, "content": text}}'
            )
        out.append((message["role"], message["content"]))
    return tuple(out)


def is_correct(item: EvalItem, answer: str) -> bool:
    """Whether ``answer`` passes ``item``'s check (the module docstring defines each)."""
    if item.check == "exact":
        return answer.strip() == item.expected.strip()
    if item.check == "contains":
        return item.expected in answer
    if item.check == "regex":
        return re.search(item.expected, answer) is not None
    match = _LABEL.match(answer)
    return match is not None and match.group(1).casefold() == item.expected.strip().casefold()
