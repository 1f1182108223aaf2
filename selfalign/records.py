"""Types shared by the data, the loop and the trainer: SAIL routes, training pairs and their reference log-probs,
the loop's rows and label counts.

Nothing here imports torch or the trainer, so `data.py` and `methods.py` can use these
without pulling in the training code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Route(enum.StrEnum):
    """Where a SAIL example's pair and its label come from (Ding et al., arXiv 2406.15567).

    A str enum: it is written to pairs.jsonl and the update fingerprint as its plain value
    ("offline", "dp", "pp", "pr"), so files written before it existed read back the same.
    The definition order is the index the loss sees (Logps.route).
    """

    OFFLINE = "offline"  # the dataset pair, trained with plain DPO
    DP = "dp"  # the dataset pair, relabelled from the policy's own preference every step
    PP = "pp"  # two policy samples, labelled by the policy when generated
    PR = "pr"  # two policy samples, labelled by the judge

    @property
    def generated(self) -> bool:
        """Whether the pair is sampled from the current policy (else it is the dataset's)."""
        return self in (Route.PP, Route.PR)

    @property
    def judged(self) -> bool:
        """Whether the judge labels the pair (and is paid for it)."""
        return self is Route.PR

    @property
    def label_source(self) -> str:
        """'dataset', 'policy' or 'judge': the label_source column of pairs.jsonl."""
        return {Route.OFFLINE: "dataset", Route.DP: "dataset", Route.PP: "policy", Route.PR: "judge"}[self]

    @property
    def index(self) -> int:
        return list(Route).index(self)

    @staticmethod
    def parse(value: str | Route | None) -> Route | None:
        """A route read from a file (its plain value) or set by a caller; None stays None (not SAIL)."""
        return None if value is None else Route(value)


@dataclass
class PreferenceExample:
    """One training pair in token ids.

    prompt_ids, chosen_ids, rejected_ids: token ids (the response ids exclude the prompt).
    ref_sample_ids: y_ref, a response drawn from pi_ref (needed by selm and xpo).
    route: the SAIL route (a Route, or its plain value); None trains it with the plain loss.
    Its reference log-probs are values of their own (ReferenceLogps), returned by the trainer.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_sample_ids: list[int] | None = None
    route: Route | str | None = None

    @property
    def ref_sample_slot(self) -> int | None:
        """Where y_ref's log-probs come from: 0 it is the chosen response, 1 the rejected one (XPO's pair and
        SELM's official ranking put y_ref in the pair: it is not scored twice), 2 a row of its own; None
        without y_ref."""
        if self.ref_sample_ids is None:
            return None
        if self.ref_sample_ids == self.chosen_ids:
            return 0
        return 1 if self.ref_sample_ids == self.rejected_ids else 2

    @property
    def num_tokens(self) -> int:
        extra = len(self.prompt_ids) + len(self.ref_sample_ids) if self.ref_sample_slot == 2 else 0
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids) + extra


@dataclass(frozen=True)
class ReferenceLogps:
    """Reference log-probs of one example's chosen, rejected and y_ref (None when y_ref is not scored)."""

    chosen: float
    rejected: float
    ref_sample: float | None = None

    def swapped(self) -> ReferenceLogps:
        """The values of the example with chosen and rejected exchanged."""
        return ReferenceLogps(self.rejected, self.chosen, self.ref_sample)


@dataclass(frozen=True)
class Row:
    """One row of an iteration: a prompt (index into the run's prompts) and its SAIL route (None outside SAIL).

    With train.sail.stretch_epochs a prompt may appear in several rows, each routed afresh.
    """

    prompt: int
    route: Route | None = None

    @property
    def generated(self) -> bool:
        """Whether the row's candidates are generated: every row outside SAIL, SAIL's PP and PR."""
        return self.route is None or self.route.generated

    @property
    def judged(self) -> bool:
        """Whether the judge labels the row's candidates: every row outside SAIL, SAIL's PR."""
        return self.route is None or self.route.judged

    @property
    def label_source(self) -> str:
        return "judge" if self.route is None else self.route.label_source


LABEL_COUNT_KEYS = ("judge", "judge_repaid", "judged_prompts", "policy", "dataset", "pairs", "ties", "responses",
                    "truncated", "truncation_dropped")


@dataclass
class LabelCounts:
    """What one round (or iteration) paid for and kept: RUN/iter[/round]/labels.json.

    judge: labels the judge was paid for (one per response scored, one per comparison for a ranker);
    judge_repaid: those of them paid a second time, for calls whose answers a kill lost before they were journaled;
    judged_prompts: prompts whose candidates the judge scored; policy: labels drawn from the
    policy itself (SAIL-PP once, SAIL-DP once per epoch); dataset: dataset pairs trained on;
    pairs, ties: examples kept and rows lost to a judge tie; responses, truncated: policy
    samples and those that hit max_new_tokens; truncation_dropped: rows that lost their pair to
    generation.truncated=drop; routes: rows per SAIL route ({} outside SAIL).
    """

    judge: int = 0
    judge_repaid: int = 0
    judged_prompts: int = 0
    policy: int = 0
    dataset: int = 0
    pairs: int = 0
    ties: int = 0
    responses: int = 0
    truncated: int = 0
    truncation_dropped: int = 0
    routes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**{key: getattr(self, key) for key in LABEL_COUNT_KEYS}, "routes": dict(self.routes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelCounts:
        """labels.json as written (a file from before a count existed reads it as 0)."""
        return cls(**{key: d.get(key, 0) for key in LABEL_COUNT_KEYS}, routes=dict(d.get("routes", {})))

    @classmethod
    def total(cls, counts: list[LabelCounts]) -> LabelCounts:
        """The sum over rounds; routes keyed as the first round's."""
        out = cls(**{key: sum(getattr(c, key) for c in counts) for key in LABEL_COUNT_KEYS})
        out.routes = {r: sum(c.routes.get(r, 0) for c in counts) for r in counts[0].routes} if counts else {}
        return out
