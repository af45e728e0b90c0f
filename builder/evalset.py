"""A recipe's ``[evaluation]``: the evaluation set and policy the install gate runs.

The set (JSON Lines, relative to the recipe) is checked strictly here, with the host's own
parser (appliance.evalset), so a bad line is found on the builder, named with its line number,
and never reaches a host. The set's exact bytes and the policy, as canonical-looking JSON, go
into the payload as ``eval/set.jsonl`` and ``eval/policy.json``: ordinary payload files,
hashed and signed like every other (docs/adr/0020-evaluation-gate.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from appliance.evalset import (
    EVAL_POLICY,
    EVAL_SET,
    MAX_ITEMS,
    MAX_TOKENS_LIMIT,
    EvalPolicy,
    parse_eval_set,
)
from builder.pack import PayloadFile
from signing.bounded import listing
from signing.errors import RecipeError


class EvaluationSection(BaseModel):
    """``[evaluation]`` of a recipe (docs/recipe.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    set: str = Field(min_length=1)
    max_drop_points: float = Field(default=5.0, ge=0, le=100)
    min_items: int = Field(default=20, ge=1, le=MAX_ITEMS)
    latency_p95_ms: float | None = Field(default=None, gt=0, le=3_600_000)
    on_fail: Literal["refuse", "canary"] = "refuse"
    max_tokens: int = Field(default=32, ge=1, le=MAX_TOKENS_LIMIT)
    require_significance: bool = False
    alpha: float = Field(default=0.05, gt=0, lt=1)

    _anchored: bool = PrivateAttr(default=False)

    def anchored(self, recipe_path: Path) -> Self:
        """This section with ``set`` resolved against the recipe's directory (once)."""
        if self._anchored:
            return self
        section = self.model_copy(update={"set": str(recipe_path.parent / self.set)})
        section._anchored = True
        return section

    def policy(self) -> EvalPolicy:
        return EvalPolicy(
            max_drop_points=float(self.max_drop_points),
            min_items=self.min_items,
            latency_p95_ms=None if self.latency_p95_ms is None else float(self.latency_p95_ms),
            on_fail=self.on_fail,
            max_tokens=self.max_tokens,
            require_significance=self.require_significance,
            alpha=float(self.alpha),
        )


def evaluation_payload(section: EvaluationSection | None, *, work: Path) -> list[PayloadFile]:
    """The payload files of ``section`` (none without one), after checking the set strictly:
    every bad line is named (the first ten in the message), and a set smaller than
    ``min_items`` is refused."""
    if section is None:
        return []
    source = Path(section.set)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise RecipeError(f"evaluation set {source}: cannot read it: {exc.strerror}") from None
    items, problems = parse_eval_set(data)
    if problems:
        raise RecipeError(
            f"evaluation set {source}: {len(problems)} bad line(s): {listing(problems)}"
        )
    policy = section.policy()
    if len(items) < policy.min_items:
        raise RecipeError(
            f"evaluation set {source} has {len(items)} items; min_items is {policy.min_items}"
        )
    policy_file = work / "eval-policy.json"
    text = json.dumps(policy.to_json(), sort_keys=True, separators=(",", ":"))
    policy_file.write_text(text + "\n", encoding="utf-8")
    return [
        PayloadFile(EVAL_SET, source, "file"),
        PayloadFile(EVAL_POLICY, policy_file, "file"),
    ]
