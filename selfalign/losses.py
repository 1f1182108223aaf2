"""Preference losses as pure functions of per-sequence log-probabilities.

Every function takes summed response log-probs (one value per sequence, shape [B]) and
returns per-example values; the caller reduces. ipo_loss also takes each response's token
count, because it averages over tokens (as TRL's IPO does). Notation follows ALGORITHMS.md:

    h = beta * ((logp(y_w) - ref_logp(y_w)) - (logp(y_l) - ref_logp(y_l)))
    F = log sigmoid(h)

A new loss is a new function here, never a new branch inside an old one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F_

Tensor = torch.Tensor


@dataclass
class PairLoss:
    """Per-example outputs of a pairwise preference loss.

    loss:             [B] value to minimise (the caller takes the mean).
    chosen_rewards:   [B] implicit reward beta * (logp(y_w) - ref_logp(y_w)), detached.
    rejected_rewards: [B] implicit reward beta * (logp(y_l) - ref_logp(y_l)), detached.
    extras: named sums over the batch (detached) that a loss reports beside the rewards.
    """

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    extras: dict[str, Tensor] | None = None

    @property
    def margins(self) -> Tensor:
        """[B] chosen_rewards - rejected_rewards (h, detached)."""
        return self.chosen_rewards - self.rejected_rewards


def preference_logits(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """h = beta * ((logp(y_w) - ref_logp(y_w)) - (logp(y_l) - ref_logp(y_l))), shape [B], with gradient."""
    return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))


def _rewards(policy: Tensor, ref: Tensor, beta: float) -> Tensor:
    return (beta * (policy - ref)).detach()


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """DPO, sigmoid form (Rafailov et al. 2023, arXiv 2305.18290).

        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

    eps = label_smoothing is the probability that a label is flipped (conservative DPO,
    Mitchell 2023); eps = 0 is the paper's loss, -F.
    """
    h = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    loss = -(1.0 - label_smoothing) * F_.logsigmoid(h) - label_smoothing * F_.logsigmoid(-h)
    return PairLoss(loss, _rewards(policy_chosen, ref_chosen, beta), _rewards(policy_rejected, ref_rejected, beta))


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float,
) -> PairLoss:
    """IPO (Azar et al. 2023, arXiv 2310.12036) on length-averaged log-probs, as TRL runs it.

        u    = (logp(y_w) - ref_logp(y_w)) / |y_w| - (logp(y_l) - ref_logp(y_l)) / |y_l|
        loss = (u - 1 / (2 * beta))**2

    |y| is the response's token count (chosen_tokens, rejected_tokens: [B]); beta plays the
    role of the paper's tau. The paper's loss (its eq. 17) is stated for whole-sequence
    probabilities; TRL's DPOTrainer (and the trl 0.8.6 that SELM's code pins) divides each
    summed log-prob by its completion length when loss_type is ipo, and that is the IPO that
    published fine-tuning results use, so it is this function. The implicit rewards are
    beta times the averaged log-ratios, as TRL logs them. ipo_sum_loss keeps the summed form.
    """
    # A response of no tokens has log-prob 0; counting it as one token keeps 0 instead of 0/0.
    n_w, n_l = chosen_tokens.clamp(min=1), rejected_tokens.clamp(min=1)
    chosen, rejected = policy_chosen / n_w, policy_rejected / n_l
    ref_w, ref_l = ref_chosen / n_w, ref_rejected / n_l
    h = preference_logits(chosen, rejected, ref_w, ref_l, beta)
    loss = (h / beta - 1.0 / (2.0 * beta)) ** 2
    return PairLoss(loss, _rewards(chosen, ref_w, beta), _rewards(rejected, ref_l, beta))


def ipo_sum_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> PairLoss:
    """IPO on summed log-probs: loss = (h / beta - 1 / (2 * beta))**2, h as everywhere in this module.

    This was selfalign's `ipo` until that became TRL's length-averaged form (ipo_loss); it is
    kept as train.loss=ipo_sum to reproduce runs made with it. It drives the summed log-ratio
    difference to 1/(2 beta), so at the same beta the per-token margin it aims for is |y|
    times smaller than ipo_loss's, while its loss and gradient are far larger on responses
    of many tokens: the same beta does not mean the same thing in the two.
    """
    h = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    loss = (h / beta - 1.0 / (2.0 * beta)) ** 2
    return PairLoss(loss, _rewards(policy_chosen, ref_chosen, beta), _rewards(policy_rejected, ref_rejected, beta))


def selm_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    policy_ref_sample: Tensor,
    ref_ref_sample: Tensor,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """SELM (Zhang et al. 2024, arXiv 2405.19332): DPO plus an optimism term on y_ref.

        loss = -F + alpha * beta * (logp(y_ref) - ref_logp(y_ref))

    y_ref is a response generated by pi_ref for the same prompt (greedy in the official
    code). ref_logp(y_ref) is a constant; the term's gradient lowers logp(y_ref), moving
    mass away from the reference's own typical answer. alpha = 0 is exactly DPO.
    Official values: beta = 0.01, alpha in {0.005, 0.001, 0.0005, 0.0001}.
    """
    dpo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    optimism = alpha * beta * (policy_ref_sample - ref_ref_sample)
    return PairLoss(dpo.loss + optimism, dpo.chosen_rewards, dpo.rejected_rewards)


def xpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    policy_ref_sample: Tensor,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """XPO (Xie et al. 2024, arXiv 2405.21046): loss = -F + alpha * logp(y_ref).

    y_ref is sampled from a FIXED pi_ref, fresh every step. Same gradient direction as
    SELM, but alpha is not multiplied by beta. Defaults in the paper: alpha = 1e-5, beta = 0.1.
    """
    dpo = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    return PairLoss(dpo.loss + alpha * policy_ref_sample, dpo.chosen_rewards, dpo.rejected_rewards)


def sail_label_term(h: Tensor, coef: float) -> Tensor:
    """SAIL label term (Ding et al. 2024, arXiv 2406.15567), per example: -coef * F**2 / 2.

    When labels are drawn from the policy's own preference P(y_w > y_l) = sigmoid(h), the
    gradient of E_label[F] has an extra score-function part E[F * grad log sigmoid(h)] =
    E[grad F**2 / 2]; this surrogate's gradient is minus that, times coef (rho for SAIL-DP,
    pi for SAIL-PP). h comes from preference_logits (with gradient).
    """
    f = F_.logsigmoid(h)
    return -coef * 0.5 * f**2


def sail_response_term(
    h: Tensor,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    coef: float,
    baseline: Tensor | float | None = None,
) -> Tensor:
    """SAIL response term (arXiv 2406.15567), per example: -coef * sg(F - b) * (logp(y_w) + logp(y_l)).

    When y_w, y_l are sampled from pi_theta, the objective's sampling distribution moves
    with theta; the score-function estimator of that part of the gradient is
    E[F * (grad logp(y_w) + grad logp(y_l))]. This surrogate's gradient is minus that, times
    coef (pi for SAIL-PP, gamma for SAIL-PR). b is an optional variance-reducing baseline
    (e.g. the batch mean of F); it leaves the expected gradient unchanged.

    This is the paper's form. The official code's gradient-hook form is
    sail_response_term_official; it is not equivalent (see its docstring).
    """
    f = F_.logsigmoid(h).detach()
    if baseline is not None:
        f = f - (baseline.detach() if isinstance(baseline, Tensor) else baseline)
    return -coef * f * (policy_chosen + policy_rejected)


def sail_response_term_official(
    h: Tensor, policy_chosen: Tensor, policy_rejected: Tensor, coef: float
) -> Tensor:
    """The official SAIL code's response term, for reproducing its published numbers only.

    The official code adds, through a gradient hook on each sequence log-prob, the gradient
    -coef * sg(F) / sg(logp(y)) to logp(y), for y in (y_w, y_l). This surrogate has exactly
    that gradient with respect to each log-prob. It departs from the paper in three ways:
    the score-function term has the opposite sign, it is divided by the sequence
    log-prob, and the hook adds it per sequence outside the batch mean (to reproduce that,
    sum these values over the batch instead of averaging them). Not the default anywhere.
    """
    f = F_.logsigmoid(h).detach()
    return -coef * ((f / policy_chosen.detach()) * policy_chosen + (f / policy_rejected.detach()) * policy_rejected)
