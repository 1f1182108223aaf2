"""Methods as named bundles: a loss, where y_ref comes from, and how the reference is refreshed.

The loop asks a method what it needs through these properties instead of comparing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    """What distinguishes one online preference method from another.

    loss: the TrainConfig.loss it trains with.
    ref_sample: how y_ref is drawn from pi_ref for the optimism term ("greedy" as in SELM's
        official code, "sample" as in XPO), or None when the loss has no such term.
    reference: "previous" (pi_ref becomes the last iterate, as SELM and iterative DPO do) or
        "initial" (pi_ref stays pi_0, as XPO does).
    offline: every prompt is answered by pi_0 and labelled up front, then trained on in one
        pass: offline DPO on self-generated pairs, the baseline with no online feedback.
    """

    name: str
    loss: Literal["dpo", "ipo", "selm", "xpo"]
    ref_sample: Literal["greedy", "sample"] | None
    reference: Literal["previous", "initial"]
    offline: bool = False

    @property
    def needs_ref_sample(self) -> bool:
        return self.ref_sample is not None


METHODS: dict[str, Method] = {
    "offline_dpo": Method("offline_dpo", "dpo", None, "initial", offline=True),
    "iterative_dpo": Method("iterative_dpo", "dpo", None, "previous"),
    "selm": Method("selm", "selm", "greedy", "previous"),
    "xpo": Method("xpo", "xpo", "sample", "initial"),
}
