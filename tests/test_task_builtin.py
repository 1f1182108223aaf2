"""The built-in sorting task: a graded gold reward, and a reproducible pi_0 with room to improve."""

from __future__ import annotations

import pytest

from selfalign.tasks.builtin import build_task, gold_reward, make_prompt, policy_stats, read_prompts

PROMPT = make_prompt([7, 2, 9, 4])  # the exact sort is "2 4 7 9"


@pytest.mark.parametrize(
    "response, expected",
    [
        # 0.5 * 4/4 positions + 0.25 * F1 (2*4/8) + 0.25 * 3/3 ascending pairs = 1.0
        ("2 4 7 9", 1.0),
        # 0.5 * 2/4 + 0.25 * 1 + 0.25 * 2/3 (9 > 7 breaks one pair) = 0.25 + 0.25 + 0.1667 = 0.6667
        ("2 4 9 7", 0.25 + 0.25 + 0.25 * 2 / 3),
        # 0.5 * 3/4 + 0.25 * (2*3/7) + 0.25 * 2/3 = 0.375 + 0.2143 + 0.1667 = 0.7560
        ("2 4 7", 0.375 + 0.25 * 6 / 7 + 0.25 * 2 / 3),
        ("", 0.0),
        ("foo", 0.0),
    ],
)
def test_gold_reward_hand_worked(response, expected):
    assert gold_reward([PROMPT], [response])[0] == pytest.approx(expected, abs=1e-9)


def test_gold_reward_reads_text_and_message_prompts():
    assert gold_reward(["sort : 7 2 9 4", PROMPT], ["2 4 7 9", "2 4 7 9"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        gold_reward([PROMPT], ["a", "b"])


def test_build_is_reproducible_and_pi0_has_room(tmp_path, builtin_task):
    a = builtin_task
    assert build_task(progress=False) == a  # reused from the cache
    b = build_task(tmp_path / "b", progress=False)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (a.policy_dir / name).read_bytes() == (b.policy_dir / name).read_bytes()
    assert a.train_prompts.read_text() == b.train_prompts.read_text()
    train = {str(p) for p in read_prompts(a.train_prompts)}
    assert not train & {str(p) for p in read_prompts(a.eval_prompts)}
    stats = policy_stats(a.policy_dir, read_prompts(a.eval_prompts)[:64], num_samples=4)
    # Measured on all 128 eval prompts x 8 samples: greedy 0.763, sampled 0.718, exact sorts 21.6% of samples.
    assert 0.55 < stats["gold_sampled"] < 0.85
    assert 0.05 < stats["exact_sampled"] < 0.35
    assert stats["gold_greedy"] < 0.9
