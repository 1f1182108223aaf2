"""Methods as named bundles: a loss, where y_ref comes from, how the reference is refreshed, SAIL's routes.

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
    sail: SAIL's preset routing probabilities and coefficients (r, p, g, rho, pi, gamma);
        train.sail values the user sets win over these.
    """

    name: str
    loss: Literal["dpo", "ipo", "selm", "xpo", "sail"]
    ref_sample: Literal["greedy", "sample"] | None
    reference: Literal["previous", "initial"]
    offline: bool = False
    sail: dict[str, float] | None = None

    @property
    def needs_ref_sample(self) -> bool:
        return self.ref_sample is not None


METHODS: dict[str, Method] = {
    "offline_dpo": Method("offline_dpo", "dpo", None, "initial", offline=True),
    "iterative_dpo": Method("iterative_dpo", "dpo", None, "previous"),
    "selm": Method("selm", "selm", "greedy", "previous"),
    "xpo": Method("xpo", "xpo", "sample", "initial"),
    # SAIL's official code trains once against the fixed SFT model: the reference stays pi_0.
    # Its defaults per variant (ALGORITHMS.md); sail_mix uses all three routes at once, so
    # no example is left to plain offline DPO.
    "sail_dp": Method("sail_dp", "sail", None, "initial", sail=dict(r=0.4, p=0.0, g=0.0, rho=0.2, pi=0.0, gamma=0.0)),
    "sail_pp": Method("sail_pp", "sail", None, "initial", sail=dict(r=0.0, p=0.3, g=0.0, rho=0.0, pi=0.2, gamma=0.0)),
    "sail_pr": Method("sail_pr", "sail", None, "initial", sail=dict(r=0.0, p=0.0, g=0.3, rho=0.0, pi=0.0, gamma=0.3)),
    "sail_mix": Method("sail_mix", "sail", None, "initial",
                       sail=dict(r=0.4, p=0.3, g=0.3, rho=0.2, pi=0.2, gamma=0.3)),
}
