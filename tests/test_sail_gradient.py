"""SAIL's surrogate losses have the exact gradient of the bilevel objective (arXiv 2406.15567).

A toy policy: a softmax over 4 responses, pi_theta = softmax(theta), against a fixed pi_ref.
The SAIL objective

    J(theta) = E_{y1, y2 ~ pi_theta, label ~ P} [ log sigmoid(h(y_w, y_l)) ]

is computed by enumerating every (y1, y2, label), and its gradient taken with autograd. The
expected gradient of selfalign's surrogate (the DPO loss plus SAIL's extra terms with
coefficient 1, expectation also by enumeration, the sampling weights held constant as a
sampler would) must be exactly -grad J. This pins down the signs that the official code's
hook form gets wrong (checked below too).
"""

from __future__ import annotations

import itertools

import torch

from selfalign import losses

BETA = 0.5
REWARD = torch.tensor([0.3, -1.0, 1.2, 0.1], dtype=torch.float64)  # the oracle's reward per response


def setup():
    theta = torch.tensor([0.2, -0.4, 0.1, 0.6], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.3, -0.2, 0.1], dtype=torch.float64), 0)
    return theta, ref


def h_of(logp, ref, w: int, lo: int) -> torch.Tensor:
    return losses.preference_logits(logp[w : w + 1], logp[lo : lo + 1], ref[w : w + 1], ref[lo : lo + 1], BETA)


def objective(theta, ref, policy_labels: bool) -> torch.Tensor:
    logp = torch.log_softmax(theta, 0)
    pi = logp.exp()
    total = torch.zeros((), dtype=torch.float64)
    for y1, y2 in itertools.product(range(4), repeat=2):
        p1 = torch.sigmoid(h_of(logp, ref, y1, y2))[0] if policy_labels else torch.sigmoid(REWARD[y1] - REWARD[y2])
        for (w, lo), p_label in (((y1, y2), p1), ((y2, y1), 1 - p1)):
            total = total + pi[y1] * pi[y2] * p_label * torch.nn.functional.logsigmoid(h_of(logp, ref, w, lo))[0]
    return total


def expected_surrogate(theta, ref, policy_labels: bool, response_term=losses.sail_response_term) -> torch.Tensor:
    logp = torch.log_softmax(theta, 0)
    pi = logp.exp().detach()  # sampling weights: a sampler does not differentiate through them
    total = torch.zeros((), dtype=torch.float64)
    for y1, y2 in itertools.product(range(4), repeat=2):
        if policy_labels:
            p1 = torch.sigmoid(h_of(logp, ref, y1, y2))[0].detach()
        else:
            p1 = torch.sigmoid(REWARD[y1] - REWARD[y2])
        for (w, lo), p_label in (((y1, y2), p1), ((y2, y1), 1 - p1)):
            h = h_of(logp, ref, w, lo)
            loss = losses.dpo_loss(logp[w : w + 1], logp[lo : lo + 1], ref[w : w + 1], ref[lo : lo + 1], BETA).loss
            loss = loss + response_term(h, logp[w : w + 1], logp[lo : lo + 1], 1.0)  # PP and PR: responses from pi
            if policy_labels:
                loss = loss + losses.sail_label_term(h, 1.0)  # PP: labels from the policy
            total = total + pi[y1] * pi[y2] * p_label * loss[0]
    return total


def grads(theta, ref, policy_labels: bool, **kw):
    (g_true,) = torch.autograd.grad(objective(theta, ref, policy_labels), theta)
    (g_sur,) = torch.autograd.grad(expected_surrogate(theta, ref, policy_labels, **kw), theta)
    return g_true, g_sur


def test_sail_pr_surrogate_gradient_is_exact_with_oracle_labels():
    g_true, g_sur = grads(*setup(), policy_labels=False)
    assert g_true.abs().max() > 1e-3  # a non-trivial gradient
    torch.testing.assert_close(g_sur, -g_true, atol=1e-12, rtol=1e-10)


def test_sail_pp_surrogate_gradient_is_exact_with_policy_labels():
    g_true, g_sur = grads(*setup(), policy_labels=True)
    assert g_true.abs().max() > 1e-3
    torch.testing.assert_close(g_sur, -g_true, atol=1e-12, rtol=1e-10)


def test_dpo_alone_misses_the_sampling_term():
    """Plain on-policy DPO (the first term only) is not the gradient of J: the response term matters."""
    theta, ref = setup()
    g_true, g_dpo = grads(theta, ref, policy_labels=False, response_term=lambda h, pc, pr, c: 0 * pc)
    assert (g_dpo + g_true).abs().max() > 1e-3


def test_official_hook_form_is_not_the_gradient():
    theta, ref = setup()
    g_true, g_official = grads(theta, ref, policy_labels=False, response_term=losses.sail_response_term_official)
    assert (g_official + g_true).abs().max() > 1e-3
