"""Judges: function, reward model with its own tokenizer, pairwise ranker, Bradley-Terry noise."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast, Qwen2Config

from selfalign.judges import JudgeError
from selfalign.judges.function import FunctionJudge
from selfalign.judges.noisy import NoisyJudge
from selfalign.judges.pairwise import PairwiseJudge
from selfalign.judges.reward_model import RewardModelJudge, render

PROMPTS = ["sort : 3 1", [{"role": "user", "content": "sort : 2 5"}]]
CANDIDATES = [["1 3", "3 1 3"], ["2 5", "5", "2 5 5 5"]]


def test_function_judge_scores_and_counts_labels():
    judge = FunctionJudge("tests.judge_fns:length")
    assert judge.score(PROMPTS, CANDIDATES) == [[2.0, 3.0], [2.0, 1.0, 4.0]]
    assert judge.labels == 5
    judge.score(PROMPTS[:1], CANDIDATES[:1])
    assert judge.labels == 7


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tests.judge_fns:raises", "reward function 'tests.judge_fns:raises' raised RuntimeError: scorer offline"),
        ("tests.judge_fns:too_few", "returned 4 scores for 5 responses"),
        ("tests.judge_fns:nan", "returned a non-finite score (nan) for response 0"),
        ("tests.judge_fns:missing", "has no function 'missing'"),
        ("no_such_pkg.mod:fn", "cannot import module 'no_such_pkg.mod'"),
        ("just_a_name", "not of the form 'pkg.module:function'"),
    ],
)
def test_function_judge_errors_are_one_line(spec, message):
    with pytest.raises(JudgeError) as info:
        FunctionJudge(spec).score(PROMPTS, CANDIDATES)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_failed_scoring_counts_no_labels():
    judge = FunctionJudge("tests.judge_fns:nan")
    with pytest.raises(JudgeError):
        judge.score(PROMPTS, CANDIDATES)
    assert judge.labels == 0


def _reward_model_dir(tmp_path):
    """A tiny reward model whose tokenizer (vocabulary and chat template) differs from the policy's."""
    words = ["[PAD]", "[UNK]", "[EOS]", "USER:", "BOT:", "sort", ":", *[str(i) for i in range(10)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    fast.chat_template = "{% for m in messages %}{{ 'USER:' if m['role'] == 'user' else 'BOT:' }} {{ m['content'] }} {% endfor %}[EOS]"
    config = Qwen2Config(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    return tmp_path


def test_reward_model_uses_its_own_tokenizer_and_template(tmp_path):
    judge = RewardModelJudge(_reward_model_dir(tmp_path), batch_size=2)
    text = render(judge.tokenizer, "sort : 3 1", "1 3")
    assert text.split() == ["USER:", "sort", ":", "3", "1", "BOT:", "1", "3", "[EOS]"]
    scores = judge.score(PROMPTS, CANDIDATES)
    assert [len(s) for s in scores] == [2, 3] and judge.labels == 5
    # Each score is the model's logit on the reward tokenizer's own ids for that conversation, alone.
    for prompt, cands, row in zip(PROMPTS, CANDIDATES, scores):
        for response, value in zip(cands, row):
            ids = judge.tokenizer(render(judge.tokenizer, prompt, response), return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                assert judge.model(**ids).logits[0, 0].item() == pytest.approx(value, abs=1e-5)
    assert len({v for row in scores for v in row}) > 1


def test_eval_reward_model_loads_with_the_judge_settings(tmp_path):
    """eval.reward_model loads in judge.dtype, batch_size and offload (it once always loaded fp32, batch 16)."""
    from selfalign.judges.gold import eval_reward
    from selfalign.run_config import RunConfig

    cfg = RunConfig()
    cfg.eval.reward_model = str(_reward_model_dir(tmp_path))
    cfg.judge.dtype, cfg.judge.batch_size, cfg.judge.offload = "bf16", 3, True
    judge = eval_reward(cfg, "", None, has_eval_prompts=True)
    assert isinstance(judge, RewardModelJudge)
    assert (judge.model.dtype, judge.batch_size) == (torch.bfloat16, 3)  # offload: a no-op on a CPU
    assert len(judge.score(PROMPTS[:1], CANDIDATES[:1])[0]) == 2


def test_pairwise_ranker_aggregates_win_probabilities():
    from tests import judge_fns

    judge_fns._pairwise_calls.clear()
    judge = PairwiseJudge("tests.judge_fns:longer_wins")
    scores = judge.score(PROMPTS, CANDIDATES)
    # Prompt 2: lengths 3, 1, 7 -> "2 5 5 5" beats both (1.0), "2 5" beats one (0.5), "5" none (0.0).
    assert scores[1] == [0.5, 0.0, 1.0]
    assert judge.labels == 1 + 3  # C(2,2) + C(3,2) comparisons
    assert judge_fns._pairwise_calls == [4]  # one call for the whole batch, not one per pair
    with pytest.raises(JudgeError, match="not a probability"):
        PairwiseJudge(lambda ps, a, b: [2.0] * len(a)).score(PROMPTS, CANDIDATES)


def test_a_per_pair_comparator_gets_a_one_line_error_naming_the_batch_form():
    # Called with lists, the old per-pair form compares the lists' lengths and returns one number.
    with pytest.raises(JudgeError, match=r"returned 0.5 for a batch of 4 pairs; pairwise functions are called on "
                                         r"batches: fn\(prompts, responses_a, responses_b\)"):
        PairwiseJudge("tests.judge_fns:longer_wins_per_pair").score(PROMPTS, CANDIDATES)
    with pytest.raises(JudgeError, match=r"raised AttributeError.*called on batches"):
        PairwiseJudge(lambda p, a, b: a.upper() > b.upper()).score(PROMPTS, CANDIDATES)


def test_noisy_judge_is_bradley_terry():
    """With Gumbel noise of scale T, P(a above b) = sigmoid((s_a - s_b) / T).
    Scores 1.0 vs 0.0 at T = 0.5: sigmoid(2) = 0.8808."""
    inner = FunctionJudge(lambda ps, rs: [1.0 if r == "a" else 0.0 for r in rs])
    judge = NoisyJudge(inner, temperature=0.5, seed=0)
    n = 4000
    rows = judge.score(["x"] * n, [["a", "b"]] * n)
    wins = sum(r[0] > r[1] for r in rows) / n
    assert wins == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.02)
    assert judge.labels == 2 * n
    assert NoisyJudge(inner, temperature=0.0).score(["x"], [["a", "b"]]) == [[1.0, 0.0]]
