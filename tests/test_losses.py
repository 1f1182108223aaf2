"""Hand-worked numbers for every loss, and the properties the methods rely on.

Shared hand-worked example (used by most tests below):
    logp(y_w) = -1.0, logp(y_l) = -2.0, ref_logp(y_w) = ref_logp(y_l) = -1.5, beta = 0.5
    h = 0.5 * ((-1.0 + 1.5) - (-2.0 + 1.5)) = 0.5 * (0.5 + 0.5) = 0.5
    F = log sigmoid(0.5) = -log(1 + e^-0.5) = -0.4740770
    -log sigmoid(-0.5) = log(1 + e^0.5) = 0.9740770
    implicit rewards: chosen 0.5 * 0.5 = 0.25, rejected 0.5 * (-0.5) = -0.25
"""

from __future__ import annotations

import pytest
import torch

from selfalign import losses

PC, PR, RC, RR, BETA = -1.0, -2.0, -1.5, -1.5, 0.5
F_HALF = -0.4740770  # log sigmoid(0.5)


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def pair(grad: bool = False):
    return t(PC, grad=grad), t(PR, grad=grad), t(RC), t(RR)


def test_dpo_hand_worked():
    """loss = -F = 0.4740770; rewards 0.25 / -0.25; margin 0.5."""
    out = losses.dpo_loss(*pair(), beta=BETA)
    assert out.loss.item() == pytest.approx(0.4740770, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.25)
    assert out.rejected_rewards.item() == pytest.approx(-0.25)
    assert out.margins.item() == pytest.approx(0.5)


def test_dpo_label_smoothing_hand_worked():
    """eps = 0.1: 0.9 * 0.4740770 + 0.1 * 0.9740770 = 0.4266693 + 0.0974077 = 0.5240770."""
    out = losses.dpo_loss(*pair(), beta=BETA, label_smoothing=0.1)
    assert out.loss.item() == pytest.approx(0.5240770, abs=1e-6)


def test_ipo_hand_worked():
    """IPO on log-probs averaged over each response's tokens (TRL's loss_type=ipo).

    logp(y_w) = -2 over 4 tokens, logp(y_l) = -6 over 3 tokens, ref_logp(y_w) = -4, ref_logp(y_l) = -4.5:
        averaged log-ratios: chosen (-2 + 4) / 4 = 0.5, rejected (-6 + 4.5) / 3 = -0.5, u = 0.5 + 0.5 = 1
        beta = 0.25: 1/(2 beta) = 2 -> loss (1 - 2)^2 = 1; rewards 0.25 * 0.5 = 0.125 and -0.125
        d loss / d logp(y_w) = 2 * (1 - 2) / 4 = -0.5;  d loss / d logp(y_l) = 2 * (1 - 2) * (-1/3) = 2/3
        beta = 0.5: 1/(2 beta) = 1 -> loss 0
    Summed, as ipo_sum_loss takes them, u would be 2 + 1.5 = 3.5 and the loss at beta 0.25 (3.5 - 2)^2 = 2.25.
    """
    pc, pr = t(-2.0, grad=True), t(-6.0, grad=True)
    out = losses.ipo_loss(pc, pr, t(-4.0), t(-4.5), t(4.0), t(3.0), beta=0.25)
    assert out.loss.item() == pytest.approx(1.0)
    assert out.chosen_rewards.item() == pytest.approx(0.125)
    assert out.rejected_rewards.item() == pytest.approx(-0.125)
    out.loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.5)
    assert pr.grad.item() == pytest.approx(2 / 3)
    assert losses.ipo_loss(t(-2.0), t(-6.0), t(-4.0), t(-4.5), t(4.0), t(3.0), beta=0.5).loss.item() == pytest.approx(
        0.0, abs=1e-12)
    assert losses.ipo_sum_loss(t(-2.0), t(-6.0), t(-4.0), t(-4.5), beta=0.25).loss.item() == pytest.approx(2.25)


def test_ipo_sum_hand_worked():
    """IPO on summed log-probs (the shared example): beta = 0.5: h/beta = 1, 1/(2 beta) = 1 -> loss 0.
    beta = 0.25: h = 0.25, h/beta = 1, 1/(2 beta) = 2 -> loss (1 - 2)^2 = 1."""
    assert losses.ipo_sum_loss(*pair(), beta=0.5).loss.item() == pytest.approx(0.0, abs=1e-12)
    assert losses.ipo_sum_loss(*pair(), beta=0.25).loss.item() == pytest.approx(1.0)


def test_ipo_of_one_token_responses_is_ipo_sum():
    """With one token per response the average is the sum: ipo and ipo_sum agree."""
    pc, pr, rc, rr, _, _ = _random_pairs(n=5)
    ones = torch.ones(5, dtype=pc.dtype)
    torch.testing.assert_close(losses.ipo_loss(pc, pr, rc, rr, ones, ones, 0.1).loss,
                               losses.ipo_sum_loss(pc, pr, rc, rr, 0.1).loss)


def test_selm_hand_worked():
    """alpha = 0.1, logp(y_ref) = -3, ref_logp(y_ref) = -2:
    optimism = 0.1 * 0.5 * (-3 + 2) = -0.05 -> loss = 0.4740770 - 0.05 = 0.4240770."""
    out = losses.selm_loss(*pair(), t(-3.0), t(-2.0), beta=BETA, alpha=0.1)
    assert out.loss.item() == pytest.approx(0.4240770, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.25)


def test_xpo_hand_worked():
    """alpha = 0.01, logp(y_ref) = -3: loss = 0.4740770 + 0.01 * (-3) = 0.4440770."""
    out = losses.xpo_loss(*pair(), t(-3.0), beta=BETA, alpha=0.01)
    assert out.loss.item() == pytest.approx(0.4440770, abs=1e-6)


def test_sail_label_term_hand_worked():
    """c = 0.2: -0.2 * 0.5 * (-0.4740770)^2 = -0.1 * 0.2247490 = -0.0224749.
    d/dh = -c * F * sigmoid(-h) = -0.2 * (-0.4740770) * 0.3775407 = 0.0357966."""
    h = t(0.5, grad=True)
    term = losses.sail_label_term(h, coef=0.2)
    assert term.item() == pytest.approx(-0.0224749, abs=1e-6)
    (g,) = torch.autograd.grad(term.sum(), h)
    assert g.item() == pytest.approx(0.0357966, abs=1e-6)


def test_sail_response_term_hand_worked():
    """c = 0.3, logp(y_w) + logp(y_l) = -3:
    no baseline: -0.3 * (-0.4740770) * (-3) = -0.4266693; d/dlogp(y_w) = -0.3 * F = 0.1422231.
    baseline b = -0.4: F - b = -0.0740770 -> -0.3 * (-0.0740770) * (-3) = -0.0666693;
    d/dlogp(y_w) = -0.3 * (F - b) = 0.0222231. F is a constant: no gradient reaches h."""
    pc, pr, rc, rr = pair(grad=True)
    h = losses.preference_logits(pc, pr, rc, rr, BETA)
    term = losses.sail_response_term(h, pc, pr, coef=0.3)
    assert term.item() == pytest.approx(-0.4266693, abs=1e-6)
    gc, gr = torch.autograd.grad(term.sum(), (pc, pr))
    assert gc.item() == pytest.approx(0.1422231, abs=1e-6)
    assert gr.item() == pytest.approx(0.1422231, abs=1e-6)

    pc, pr, rc, rr = pair(grad=True)
    h = losses.preference_logits(pc, pr, rc, rr, BETA)
    term = losses.sail_response_term(h, pc, pr, coef=0.3, baseline=torch.tensor(-0.4, dtype=torch.float64))
    assert term.item() == pytest.approx(-0.0666693, abs=1e-6)
    (gc,) = torch.autograd.grad(term.sum(), pc)
    assert gc.item() == pytest.approx(0.0222231, abs=1e-6)


def test_sail_response_term_official_hook_form():
    """Official hook: d/dlogp(y) = -c * F / logp(y). c = 0.3:
    y_w: -0.3 * (-0.4740770) / (-1) = -0.1422231;  y_l: -0.3 * (-0.4740770) / (-2) = -0.0711116.
    Opposite sign to the paper's 0.1422231, and divided by the sequence log-prob."""
    pc, pr, rc, rr = pair(grad=True)
    h = losses.preference_logits(pc, pr, rc, rr, BETA)
    term = losses.sail_response_term_official(h, pc, pr, coef=0.3)
    gc, gr = torch.autograd.grad(term.sum(), (pc, pr))
    assert gc.item() == pytest.approx(-0.1422231, abs=1e-6)
    assert gr.item() == pytest.approx(-0.0711116, abs=1e-6)


def _random_pairs(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(6)]


def test_selm_alpha_zero_is_dpo_exactly():
    pc, pr, rc, rr, ps, rs = _random_pairs()
    dpo = losses.dpo_loss(pc, pr, rc, rr, beta=0.01)
    selm = losses.selm_loss(pc, pr, rc, rr, ps, rs, beta=0.01, alpha=0.0)
    xpo = losses.xpo_loss(pc, pr, rc, rr, ps, beta=0.01, alpha=0.0)
    assert torch.equal(selm.loss, dpo.loss)
    assert torch.equal(xpo.loss, dpo.loss)


def test_selm_term_gradient_lowers_logp_of_ref_sample():
    pc, pr, rc, rr, ps, rs = _random_pairs()
    ps.requires_grad_(True)
    loss = losses.selm_loss(pc, pr, rc, rr, ps, rs, beta=0.01, alpha=0.001).loss.sum()
    (g,) = torch.autograd.grad(loss, ps)
    # d loss / d logp(y_ref) = alpha * beta > 0, so a descent step lowers logp(y_ref).
    assert torch.allclose(g, torch.full_like(g, 0.001 * 0.01))


def test_preferring_chosen_lowers_dpo_loss():
    pc, pr, rc, rr, _, _ = _random_pairs()
    base = losses.dpo_loss(pc, pr, rc, rr, beta=0.1).loss
    assert (losses.dpo_loss(pc + 0.5, pr, rc, rr, beta=0.1).loss < base).all()
    assert (losses.dpo_loss(pc, pr - 0.5, rc, rr, beta=0.1).loss < base).all()
    assert (losses.dpo_loss(pc - 0.5, pr, rc, rr, beta=0.1).loss > base).all()


def test_sail_terms_with_zero_coefficients_leave_dpo_unchanged():
    pc, pr, rc, rr, _, _ = _random_pairs()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    h = losses.preference_logits(pc, pr, rc, rr, 0.1)
    dpo = losses.dpo_loss(pc, pr, rc, rr, beta=0.1).loss
    total = dpo + losses.sail_label_term(h, 0.0) + losses.sail_response_term(h, pc, pr, 0.0, baseline=-0.3)
    assert torch.equal(total, dpo)
    g_total = torch.autograd.grad(total.sum(), (pc, pr), retain_graph=True)
    g_dpo = torch.autograd.grad(dpo.sum(), (pc, pr))
    assert all(torch.equal(a, b) for a, b in zip(g_total, g_dpo))


def test_losses_are_per_example():
    pc, pr, rc, rr, ps, rs = _random_pairs(n=5)
    assert losses.dpo_loss(pc, pr, rc, rr, 0.1).loss.shape == (5,)
    assert losses.ipo_loss(pc, pr, rc, rr, torch.full((5,), 3.0), torch.full((5,), 2.0), 0.1).loss.shape == (5,)
    assert losses.ipo_sum_loss(pc, pr, rc, rr, 0.1).loss.shape == (5,)
    assert losses.selm_loss(pc, pr, rc, rr, ps, rs, 0.1, 0.01).loss.shape == (5,)
    h = losses.preference_logits(pc, pr, rc, rr, 0.1)
    assert losses.sail_response_term(h, pc, pr, 0.2).shape == (5,)
