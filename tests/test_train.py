"""Invariants of the preference update on a tiny random-init model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from selfalign.checkpoint import UpdateCheckpoint
from selfalign.logprobs import collate, sequence_logprobs
from selfalign.records import ReferenceLogps
from selfalign.train import (
    PreferenceTrainer,
    TrainConfig,
    build_schedule,
    policy_rows,
    ref_sample_rows,
    resize_schedule,
)
from tests.conftest import LINEAR_STEP, make_examples, make_model, params, schedule_lrs
from tests.conftest import make_trainer as trainer


def test_accumulation_8x1_equals_1x8():
    examples = make_examples(8)
    a = trainer(TrainConfig(batch_size=8, micro_batch_size=1, **LINEAR_STEP))
    b = trainer(TrainConfig(batch_size=8, micro_batch_size=8, **LINEAR_STEP))
    before = params(a)
    ra = a.update(examples, progress=False)
    rb = b.update(examples, progress=False)
    assert ra.steps[0]["loss"] == pytest.approx(rb.steps[0]["loss"], abs=1e-6)
    pa, pb = params(a), params(b)
    moved = 0.0
    for name in pa:
        torch.testing.assert_close(pa[name] - before[name], pb[name] - before[name], atol=1e-5, rtol=1e-4)
        moved = max(moved, (pa[name] - before[name]).abs().max().item())
    assert moved > 1e-4  # the step did something measurable


def test_every_trainable_parameter_moves_after_a_step():
    t = trainer(TrainConfig(batch_size=4, micro_batch_size=2, learning_rate=1e-3, warmup_ratio=0.0))
    before = params(t)
    # Use every vocabulary id at least once so each embedding row receives a gradient.
    examples = make_examples(4)
    examples[0].chosen_ids = list(range(6, 64))
    t.update(examples, progress=False)
    after = params(t)
    still = [n for n, p in t.policy.named_parameters() if p.requires_grad and torch.equal(before[n], after[n])]
    assert not still, f"parameters that did not move: {still}"


def test_loss_decreases_on_repeated_pairs():
    t = trainer(TrainConfig(batch_size=4, micro_batch_size=2, learning_rate=3e-3, epochs=15, warmup_ratio=0.0))
    result = t.update(make_examples(8), progress=False)
    assert result.steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    assert result.steps[-1]["loss"] < 0.5
    assert result.steps[-1]["rewards/accuracies"] == 1.0


def test_reference_logps_are_computed_once_and_match_reference_model():
    t = trainer(TrainConfig(batch_size=4))
    examples = make_examples(6)
    reference = t.compute_reference_logps(examples, progress=False)
    batch = collate([e.prompt_ids for e in examples], [e.chosen_ids for e in examples], 0)
    expected = sequence_logprobs(t.reference, batch)
    torch.testing.assert_close(torch.tensor([r.chosen for r in reference]), expected.detach(), atol=1e-5, rtol=0)
    # The reference must not be called again inside update(): precomputed values are reused. (Log-probs run
    # the decoder, not the model's own forward: the hook sits there.)
    calls = []
    t.reference.get_decoder().register_forward_pre_hook(lambda *a, **k: calls.append(1))
    t.update(examples, progress=False, reference=reference)
    assert not calls
    t.update(examples, progress=False)
    assert calls  # without them it does call the reference: the hook sees the calls it guards against


def test_reference_logps_are_returned_and_the_examples_left_alone():
    """Values already known are kept and only the rest computed; neither call nor an update writes onto
    the caller's examples, so one list of examples can feed two trainers."""
    t = trainer(TrainConfig(batch_size=4))
    examples = make_examples(4)
    untouched = copy.deepcopy(examples)
    reference = t.compute_reference_logps(examples, progress=False)
    known = [None, reference[1], None, ReferenceLogps(-1.0, -2.0)]
    calls = []
    t.reference.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(len(kwargs["input_ids"])), with_kwargs=True)
    again = t.compute_reference_logps(examples, known, progress=False)
    assert calls == [4]  # one batch: chosen and rejected of the two unknown examples
    assert again[1] is reference[1] and again[3] is known[3]
    # Recomputed in a batch of other rows, a value may differ in its last bits (why the loop keeps known ones).
    for i in (0, 2):
        assert (again[i].chosen, again[i].rejected) == pytest.approx((reference[i].chosen, reference[i].rejected),
                                                                     abs=1e-5)
    t.update(examples, progress=False)
    assert examples == untouched


@pytest.mark.parametrize("schedule, warmup_ratio, multipliers", [
    ("cosine", 0.25, [0.0, 0.5, 1.0, 0.9330127019, 0.75, 0.5, 0.25, 0.0669872981]),
    ("linear", 0.25, [0.0, 0.5, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
    ("constant", 0.25, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("cosine", 0.0, [1.0, 0.9619397663, 0.8535533906, 0.6913417162, 0.5, 0.3086582838, 0.1464466094, 0.03806023374]),
    ("linear", 0.0, [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]),
    ("constant", 0.0, [1.0] * 8),
])
def test_schedule_by_hand(schedule, warmup_ratio, multipliers):
    """The lr of steps 0..7 of an 8-step update, over the peak lr.

    warmup_ratio 0.25: a warmup of ceil(0.25 * 8) = 2 steps from lr 0, s / 2: 0, 1/2 (transformers' and TRL's;
    selfalign's own schedule warmed up over (s + 1) / (w + 1): 1/3, 2/3). Then, at p = (s - 2) / 6,
    cosine 0.5 * (1 + cos(pi * p)): 1, 0.5 * (1 + sqrt(3) / 2) = 0.9330127019, 3/4, 1/2, 1/4,
    0.5 * (1 - sqrt(3) / 2) = 0.0669872981; linear 1 - p = (8 - s) / 6; constant 1.
    warmup_ratio 0: p = s / 8; cosine 0.5 * (1 + cos(pi * s / 8)); linear (8 - s) / 8.
    """
    config = TrainConfig(learning_rate=1e-3, lr_scheduler=schedule, warmup_ratio=warmup_ratio)
    assert schedule_lrs(config, 8) == pytest.approx([1e-3 * m for m in multipliers], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("total", range(1, 40))
def test_schedule_without_warmup_keeps_its_numbers(total):
    """Without warmup the decay is the one selfalign wrote by hand before it used transformers' get_scheduler:
    bit for bit for cosine (and constant); transformers' linear (T - s) / T is one rounding where the old
    1 - s / T was two, so the two differ by at most about an ulp of the peak."""
    cosine = schedule_lrs(TrainConfig(learning_rate=1.0, warmup_ratio=0.0), total)
    assert cosine == [0.5 * (1.0 + math.cos(math.pi * (s / total))) for s in range(total)]
    linear = schedule_lrs(TrainConfig(learning_rate=1.0, warmup_ratio=0.0, lr_scheduler="linear"), total)
    assert linear == pytest.approx([1.0 - s / total for s in range(total)], rel=0, abs=3e-16)


def test_resize_keeps_the_step_count_and_takes_the_new_schedules_lr():
    """Sized for 10 steps (warmup ceil(0.25 * 10) = 3: 0, 1/3, 2/3; step 3 at the peak), then re-sized to
    6 after 3 steps: warmup ceil(0.25 * 6) = 2, cosine over steps 2..5 at p = (s - 2) / 4. Step 3 (p = 1/4)
    runs at 0.5 * (1 + cos(pi / 4)) = 0.8535533906 of the peak, step 4 at 1/2, step 5 at 0.1464466094."""
    config = TrainConfig(learning_rate=1e-3, warmup_ratio=0.25)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
    scheduler = build_schedule(optimizer, config, 10)
    lrs = []
    for _ in range(3):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)
    resize_schedule(scheduler, config, 6)
    assert scheduler.last_epoch == 3
    for _ in range(3):
        assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0]
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [0.0, 1 / 3, 2 / 3, 0.8535533906, 0.5, 0.1464466094]
    assert lrs == pytest.approx([1e-3 * m for m in expected], rel=1e-9, abs=1e-15)


def test_resume_from_mid_update_checkpoint_gives_identical_losses(tmp_path):
    config = TrainConfig(batch_size=2, micro_batch_size=1, learning_rate=1e-3, epochs=2, checkpoint_every=1)
    examples = make_examples(8)
    full = trainer(config).update(examples, progress=False)
    assert len(full.steps) == 8

    first = trainer(config)
    part = first.update(examples, checkpoint_dir=tmp_path, stop_after_steps=3, progress=False)
    assert len(part.steps) == 3 and (tmp_path / "update_state.pt").exists()

    resumed_trainer = trainer(config)  # a fresh process: new model at pi_0, state from disk
    resumed = resumed_trainer.update(examples, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_step == 3
    assert [s["loss"] for s in resumed.steps] == pytest.approx([s["loss"] for s in full.steps], abs=1e-7)
    # The schedule's step count came back from the checkpoint: the resumed steps run at the same lrs, a
    # warmup step (from lr 0) among them.
    assert [s["learning_rate"] for s in resumed.steps] == [s["learning_rate"] for s in full.steps]
    assert full.steps[0]["learning_rate"] == 0.0 < full.steps[3]["learning_rate"]
    assert not (tmp_path / "update_state.pt").exists()  # a finished update leaves no stale state


@pytest.mark.parametrize("every, saved_after", [(1, [1, 2, 3, 4, 5]), (3, [3]), (0, [])])
def test_one_step_rounds_checkpoint_every_n_steps_not_every_round(tmp_path, monkeypatch, every, saved_after):
    """Generation every step must not write a checkpoint (3x the weights) every step."""
    t = trainer(TrainConfig(batch_size=2, micro_batch_size=2, checkpoint_every=every))
    saves = []
    save = UpdateCheckpoint.save_update
    monkeypatch.setattr(UpdateCheckpoint, "save_update",
                        lambda self, state, *a: (saves.append(len(state.history)), save(self, state, *a)))
    t.begin(6, checkpoint_dir=tmp_path)
    for k in range(6):
        t.train_round(make_examples(2, seed=k), last=k == 5, progress=False)
        if k < 5:
            assert (tmp_path / "update_state.pt").exists() == bool(saves)
    assert saves == saved_after
    assert not (tmp_path / "update_state.pt").exists()  # the finished update removed it


def test_resume_refuses_a_checkpoint_of_another_update(tmp_path):
    config = TrainConfig(batch_size=2, micro_batch_size=1, checkpoint_every=1)
    trainer(config).update(make_examples(6), checkpoint_dir=tmp_path, stop_after_steps=1, progress=False)
    with pytest.raises(ValueError, match="different update"):
        trainer(config).update(make_examples(6, seed=1), checkpoint_dir=tmp_path, progress=False)


def test_lora_changes_only_adapters_and_reference_is_adapter_disabled():
    config = TrainConfig(batch_size=4, micro_batch_size=2, learning_rate=1e-2, epochs=2, warmup_ratio=0.0)
    config.lora.enabled = True
    config.lora.r = 4
    t = trainer(config)
    base = make_model(0)  # the same pi_0, never wrapped
    examples = make_examples(4)
    before = params(t)
    t.update(examples, progress=False)
    after = params(t)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == ("lora_" in name), f"{name}: changed={changed}"
    batch = collate([e.prompt_ids for e in examples], [e.rejected_ids for e in examples], 0)
    expected = sequence_logprobs(base, batch).detach()
    reference = t.compute_reference_logps(examples, progress=False)  # after training: still the adapter disabled
    torch.testing.assert_close(torch.tensor([r.rejected for r in reference]), expected, atol=1e-5, rtol=0)
    with torch.no_grad(), t.policy.disable_adapter():
        torch.testing.assert_close(sequence_logprobs(t.policy, batch), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(sequence_logprobs(t.policy, batch).detach(), expected, atol=1e-4)


def test_selm_with_alpha_zero_trains_exactly_like_dpo():
    examples = make_examples(8, with_ref_sample=True)
    common = dict(batch_size=4, micro_batch_size=2, learning_rate=1e-3, epochs=2)
    dpo = trainer(TrainConfig(loss="dpo", **common))
    selm = trainer(TrainConfig(loss="selm", alpha=0.0, **common))
    rd = dpo.update(examples, progress=False)
    rs = selm.update(examples, progress=False)
    assert rs.steps == rd.steps  # every metric, bit for bit
    for (n, a), (_, b) in zip(dpo.policy.named_parameters(), selm.policy.named_parameters()):
        assert torch.equal(a, b), n


def test_selm_term_lowers_logp_of_ref_sample_more_than_dpo():
    examples = make_examples(8, with_ref_sample=True)
    common = dict(batch_size=4, micro_batch_size=4, learning_rate=1e-3, epochs=3, beta=0.1)
    dpo = trainer(TrainConfig(loss="selm", alpha=0.0, **common))
    selm = trainer(TrainConfig(loss="selm", alpha=5.0, **common))
    dpo.update(examples, progress=False)
    selm.update(examples, progress=False)
    batch = collate([e.prompt_ids for e in examples], [e.ref_sample_ids for e in examples], 0)
    with torch.no_grad():
        assert sequence_logprobs(selm.policy, batch).sum() < sequence_logprobs(dpo.policy, batch).sum()


def test_selm_needs_ref_samples():
    with pytest.raises(ValueError, match="needs y_ref"):
        trainer(TrainConfig(loss="selm", alpha=0.001)).update(make_examples(4), progress=False)


def test_no_reference_without_lora_is_an_error():
    with pytest.raises(ValueError, match="no reference model"):
        PreferenceTrainer(make_model(), TrainConfig(), pad_token_id=0)


def hand_gradient(model, reference, examples, per_example_loss,
                  per_token: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean per-example loss and its gradient w.r.t. model's parameters, from the formula a test writes out.

    per_example_loss(u, logp_ref_sample) gets u = (logp(y_w) - ref_logp(y_w)) - (logp(y_l) - ref_logp(y_l))
    [B] (ref: `reference`, constant) and the policy's log-prob of y_ref [B] (None without y_ref).
    per_token: each log-ratio is divided by its response's token count first (IPO's averaging).
    """
    def logps(m, responses):
        return sequence_logprobs(m, collate([e.prompt_ids for e in examples], responses, 0))

    chosen, rejected = [e.chosen_ids for e in examples], [e.rejected_ids for e in examples]
    n_c, n_r = (torch.tensor([float(len(r)) if per_token else 1.0 for r in rs]) for rs in (chosen, rejected))
    with torch.no_grad():
        ref_c, ref_r = logps(reference, chosen), logps(reference, rejected)
    u = (logps(model, chosen) - ref_c) / n_c - (logps(model, rejected) - ref_r) / n_r
    y_ref = logps(model, [e.ref_sample_ids for e in examples]) if examples[0].ref_sample_ids is not None else None
    loss = per_example_loss(u, y_ref).mean()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return loss.item(), {n: torch.zeros_like(p) if g is None else g
                         for (n, p), g in zip(model.named_parameters(), grads) if n in names}


def adam_first_step(grads: dict[str, torch.Tensor], lr: float, eps: float) -> dict[str, torch.Tensor]:
    """AdamW's first step without weight decay: m_hat = g and v_hat = g**2, so delta = -lr * g / (|g| + eps)."""
    return {n: -lr * g / (g.abs() + eps) for n, g in grads.items()}


def assert_step(t: PreferenceTrainer, before: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    after = params(t)
    for name, delta in expected.items():
        torch.testing.assert_close(after[name] - before[name], delta, atol=1e-5, rtol=1e-4, msg=name)
    assert max(d.abs().max().item() for d in expected.values()) > 1e-3  # the step is measurable


@pytest.mark.parametrize("loss_name, per_token", [("ipo", True), ("ipo_sum", False)])
def test_ipo_step_by_hand(loss_name, per_token):
    """IPO: loss = (u - 1/(2 beta))**2 per example, u the difference of log-ratios, each log-ratio divided
    by its response's token count for ipo (TRL's form) and summed for ipo_sum.

    At the first step the policy is pi_0 = pi_ref, so u = 0 for every pair: loss = (1/(2 beta))**2
    = 1.0 at beta = 0.5 (DPO's would be log 2 = 0.693), and d loss / d u = 2 * (0 - 1/(2 beta))
    = -1/beta = -2 per example (DPO's: -beta/2 = -0.25); for ipo, d u / d logp(y_w) = 1/|y_w|, so the
    two losses step differently on the make_examples responses of 1-6 tokens. The parameter step
    is AdamW's first step on that gradient (LINEAR_STEP: delta = -lr * g / (|g| + eps)).
    """
    beta = 0.5
    examples = make_examples(4)
    assert len({len(e.chosen_ids) for e in examples} | {len(e.rejected_ids) for e in examples}) > 1
    t = trainer(TrainConfig(loss=loss_name, beta=beta, batch_size=4, micro_batch_size=2, **LINEAR_STEP))
    before = params(t)
    steps = t.update(examples, progress=False).steps
    assert steps[0]["loss"] == pytest.approx(1.0, abs=1e-5)
    loss, grads = hand_gradient(make_model(0), make_model(0), examples, lambda u, _: (u - 1 / (2 * beta)) ** 2,
                                per_token=per_token)
    assert loss == pytest.approx(1.0, abs=1e-6)
    assert_step(t, before, adam_first_step(grads, LINEAR_STEP["learning_rate"], LINEAR_STEP["adam_epsilon"]))


def test_xpo_step_by_hand():
    """XPO: loss = -log sigmoid(beta * u) + alpha * logp(y_ref) per example.

    At the first step u = 0, so loss = log 2 + alpha * mean(logp_pi0(y_ref)): with alpha = 0.5 and
    y_ref of 1-6 tokens under a near-uniform 64-token model (about -4.2 nats a token) that is
    clearly below log 2. d loss / d u = -beta/2 per example, plus alpha on grad logp(y_ref).
    """
    beta, alpha = 0.1, 0.5
    examples = make_examples(4, with_ref_sample=True)
    t = trainer(TrainConfig(loss="xpo", beta=beta, alpha=alpha, batch_size=4, micro_batch_size=2, **LINEAR_STEP))
    before = params(t)
    steps = t.update(examples, progress=False).steps
    with torch.no_grad():
        y_ref = sequence_logprobs(make_model(0), collate([e.prompt_ids for e in examples],
                                                         [e.ref_sample_ids for e in examples], 0))
    expected_loss = math.log(2) + alpha * y_ref.mean().item()
    assert expected_loss < 0
    assert steps[0]["loss"] == pytest.approx(expected_loss, abs=1e-5)
    loss, grads = hand_gradient(make_model(0), make_model(0), examples,
                                lambda u, lp_ref: -F.logsigmoid(beta * u) + alpha * lp_ref)
    assert loss == pytest.approx(expected_loss, abs=1e-5)
    assert_step(t, before, adam_first_step(grads, LINEAR_STEP["learning_rate"], LINEAR_STEP["adam_epsilon"]))


@pytest.mark.parametrize("loss", ["xpo", "selm"])
def test_y_ref_inside_the_pair_is_scored_once_and_steps_by_hand(loss):
    """XPO's paper pair is (policy sample, y_ref) and SELM's official ranking can put y_ref in the pair: that
    y_ref is not forwarded a second time, yet the step equals the formula's with y_ref scored on its own.

    Examples: y_ref is the rejected (0, 3), the chosen (1), a response of its own (2). The policy forward
    has 2 x 4 + 1 rows; the reference's value of an in-pair y_ref is that member's.
    """
    beta, alpha = 0.1, 0.5
    examples = make_examples(4, with_ref_sample=True)
    for i, member in ((0, "rejected_ids"), (1, "chosen_ids"), (3, "rejected_ids")):
        examples[i].ref_sample_ids = list(getattr(examples[i], member))
    assert [e.ref_sample_slot for e in examples] == [1, 0, 2, 1]
    assert len(policy_rows(examples, True)[1]) == 9 and ref_sample_rows(examples) == [4, 1, 8, 7]
    t = trainer(TrainConfig(loss=loss, beta=beta, alpha=alpha, batch_size=4, micro_batch_size=2, **LINEAR_STEP))
    reference = t.compute_reference_logps(examples)
    assert [r.ref_sample for r in reference[:2]] == [reference[0].rejected, reference[1].chosen]
    before = params(t)
    t.update(examples, reference=reference, progress=False)
    ref_model = make_model(0)
    with torch.no_grad():
        ref_y = sequence_logprobs(ref_model, collate([e.prompt_ids for e in examples],
                                                     [e.ref_sample_ids for e in examples], 0))
    if loss == "xpo":
        def per_example(u, lp_ref):
            return -F.logsigmoid(beta * u) + alpha * lp_ref
    else:
        def per_example(u, lp_ref):
            return -F.logsigmoid(beta * u) + alpha * beta * (lp_ref - ref_y)
    _, grads = hand_gradient(make_model(0), ref_model, examples, per_example)
    assert_step(t, before, adam_first_step(grads, LINEAR_STEP["learning_rate"], LINEAR_STEP["adam_epsilon"]))


def test_rmsprop_steps_by_hand():
    """RMSprop (SAIL's optimizer), no momentum, smoothing a = train.adam_beta2:

        v_1 = (1 - a) g_1**2,  theta_1 = theta_0 - lr * g_1 / (sqrt(v_1) + eps)
        v_2 = a v_1 + (1 - a) g_2**2,  theta_2 = theta_1 - lr * g_2 / (sqrt(v_2) + eps)

    With a = 0.99 the first step moves a parameter whose |g| >> eps by lr / sqrt(0.01) = 10 lr,
    whatever the gradient's size. g_1 and g_2 are DPO's, computed here from the formula
    -log sigmoid(beta * u) at theta_0 and theta_1 (the reference stays pi_0).
    """
    beta, lr, a, eps = 0.1, 1e-3, 0.99, 1e-4
    examples = make_examples(4)
    common = dict(optimizer="rmsprop", beta=beta, learning_rate=lr, adam_beta2=a, adam_epsilon=eps, warmup_ratio=0.0,
                  lr_scheduler="constant", max_grad_norm=0.0, batch_size=4, micro_batch_size=2)
    one, two = trainer(TrainConfig(epochs=1, **common)), trainer(TrainConfig(epochs=2, **common))
    theta0 = params(one)
    one.update(examples, progress=False)
    two.update(examples, progress=False)

    dpo = lambda u, _: -F.logsigmoid(beta * u)  # noqa: E731
    model, reference = make_model(0), make_model(0)
    _, g1 = hand_gradient(model, reference, examples, dpo)
    v1 = {n: (1 - a) * g**2 for n, g in g1.items()}
    step1 = {n: -lr * g1[n] / (v1[n].sqrt() + eps) for n in g1}
    assert_step(one, theta0, step1)
    largest = max(g1, key=lambda n: g1[n].abs().max().item())
    assert step1[largest].abs().max().item() == pytest.approx(10 * lr, rel=0.05)  # lr / sqrt(1 - a)

    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(step1[n])
    _, g2 = hand_gradient(model, reference, examples, dpo)
    v2 = {n: a * v1[n] + (1 - a) * g**2 for n, g in g2.items()}
    theta2 = {n: step1[n] - lr * g2[n] / (v2[n].sqrt() + eps) for n in g2}
    assert_step(two, theta0, theta2)


def test_updates_do_not_keep_old_optimizers_alive():
    """Each update makes its own AdamW; none may outlive its update (an online run makes
    one per iteration, and each holds twice the trainable weights)."""
    import gc

    t = trainer(TrainConfig(batch_size=4))
    for seed in range(3):
        t.update(make_examples(4, seed=seed), progress=False)
    gc.collect()
    assert sum(isinstance(o, torch.optim.Optimizer) for o in gc.get_objects()) == 0


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_update(lora):
    examples = make_examples(4)
    results = []
    for checkpointing in (False, True):
        config = TrainConfig(batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, gradient_checkpointing=checkpointing)
        config.lora.enabled, config.lora.r = lora, 4
        t = trainer(config)
        base = t.policy.get_base_model() if lora else t.policy
        assert base.is_activation_checkpointing == checkpointing
        results.append((t.update(examples, progress=False).steps, params(t)))
    (steps_a, pa), (steps_b, pb) = results
    assert steps_a[0]["loss"] == pytest.approx(steps_b[0]["loss"], abs=1e-6)
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], atol=1e-6, rtol=1e-5)
