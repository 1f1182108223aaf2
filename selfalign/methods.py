"""Methods as named bundles: a loss, where y_ref comes from, how the reference is refreshed, SAIL's routes.

The loop asks a method what it needs through these properties instead of comparing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .train_config import SailConfig


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
    pairing: what the judge ranks for one prompt, and so where the pair comes from.
        "policy_samples": K policy samples, paired by run.pair_selector (y_ref, if any, is a
            separate draw that only the optimism term sees).
        "policy_vs_ref": one policy sample and one pi_ref sample, which is y_ref: the pair is
            the two, ordered by the judge, so the bonus acts on a member of the pair (XPO's paper).
        "ref_vs_dataset": y_ref and a preference file's chosen and rejected responses; the best
            of the three becomes chosen and the worst rejected, so y_ref may be either, or
            neither (SELM's official pipeline).
    """

    name: str
    loss: Literal["dpo", "ipo", "selm", "xpo", "sail"]
    ref_sample: Literal["greedy", "sample"] | None
    reference: Literal["previous", "initial"]
    offline: bool = False
    sail: SailConfig | None = None
    pairing: Literal["policy_samples", "policy_vs_ref", "ref_vs_dataset"] = "policy_samples"

    @property
    def is_sail(self) -> bool:
        """Whether rows are routed (SAIL's offline, DP, PP and PR) and trained with the sail loss."""
        return self.sail is not None

    @property
    def ranks_ref_sample(self) -> bool:
        """Whether y_ref is one of the ranked candidates: then it is drawn even when alpha = 0."""
        return self.pairing != "policy_samples"

    @property
    def ranks_dataset_pair(self) -> bool:
        """Whether a preference file's chosen and rejected responses are ranked with y_ref."""
        return self.pairing == "ref_vs_dataset"

    def policy_samples(self, k: int) -> int:
        """Responses drawn from the policy per prompt, given generation.num_samples = k."""
        return {"policy_samples": k, "policy_vs_ref": 1, "ref_vs_dataset": 0}[self.pairing]

    def candidates(self, policy: list[list[int]], ref_sample: list[int] | None,
                   dataset_pair: tuple[list[int], list[int]] | None) -> tuple[list[list[int]], int | None]:
        """The responses the judge ranks for one prompt (token ids), and y_ref's index among them (None: unranked)."""
        if self.pairing == "policy_vs_ref":
            return [policy[0], ref_sample], 1
        if self.pairing == "ref_vs_dataset":
            return [ref_sample, *dataset_pair], 0
        return list(policy), None


METHODS: dict[str, Method] = {
    "offline_dpo": Method("offline_dpo", "dpo", None, "initial", offline=True),
    "iterative_dpo": Method("iterative_dpo", "dpo", None, "previous"),
    "selm": Method("selm", "selm", "greedy", "previous"),
    # SELM as its official code runs it: pi_ref's greedy answer ranked with a preference file's pair.
    "selm_official": Method("selm_official", "selm", "greedy", "previous", pairing="ref_vs_dataset"),
    # XPO as published: (policy sample, pi_0 sample) ranked by the judge, the bonus on the pi_0 one.
    "xpo": Method("xpo", "xpo", "sample", "initial", pairing="policy_vs_ref"),
    # selfalign's earlier xpo, kept as an ablation: its pairs are K policy samples, best vs worst, as
    # iterative DPO's and SELM's are, and a separate pi_0 sample carries the bonus, so against
    # iterative DPO only the bonus differs. bench/results before the paper form were measured with it.
    "xpo_policy_pairs": Method("xpo_policy_pairs", "xpo", "sample", "initial"),
    # SAIL's official code trains once against the fixed SFT model: the reference stays pi_0.
    # Its defaults per variant (ALGORITHMS.md); sail_mix uses all three routes at once, so
    # no example is left to plain offline DPO.
    "sail_dp": Method("sail_dp", "sail", None, "initial", sail=SailConfig(r=0.4, p=0.0, g=0.0, rho=0.2, pi=0.0, gamma=0.0)),
    "sail_pp": Method("sail_pp", "sail", None, "initial", sail=SailConfig(r=0.0, p=0.3, g=0.0, rho=0.0, pi=0.2, gamma=0.0)),
    "sail_pr": Method("sail_pr", "sail", None, "initial", sail=SailConfig(r=0.0, p=0.0, g=0.3, rho=0.0, pi=0.0, gamma=0.3)),
    "sail_mix": Method("sail_mix", "sail", None, "initial",
                       sail=SailConfig(r=0.4, p=0.3, g=0.3, rho=0.2, pi=0.2, gamma=0.3)),
}
