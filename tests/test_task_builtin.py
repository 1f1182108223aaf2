"""The built-in sorting task: graded gold reward, reproducible cached build, a pi_0 with room to improve.

pi_0 is built once per test session by the `builtin_task` fixture (conftest.py, ~30 s of SFT);
everything else here takes a few seconds.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from selfalign.evaluate import HIGH_REWARD
from selfalign.tasks import builtin
from selfalign.tasks.builtin import (
    MAX_LEN,
    MIN_LEN,
    NUM_EVAL_PROMPTS,
    NUM_TRAIN_PROMPTS,
    NUMBERS,
    REWARD_FN,
    SFTConfig,
    build_task,
    gold_reward,
    make_prompt,
    policy_stats,
    read_prompts,
)

PROMPT = make_prompt([7, 2, 9, 4])  # the exact sort is "2 4 7 9"


# ---------------------------------------------------------------------------------- gold reward
@pytest.mark.parametrize(
    "response, expected",
    [
        # reward = 0.5 * positions right / max(len answer, len response)
        #        + 0.25 * F1 of the response's words against the answer's numbers (2 * overlap / (4 + len))
        #        + 0.25 * ascending adjacent pairs of prompt numbers / (max(len answer, len response) - 1)
        # 0.5 * 4/4 + 0.25 * 8/8 + 0.25 * 3/3 = 1.0
        ("2 4 7 9", 1.0),
        # last two swapped: positions 2,4 right -> 0.5 * 2/4 + 0.25 * 1 + 0.25 * 2/3 (9 > 7) = 0.6667
        ("2 4 9 7", 0.25 + 0.25 + 0.25 * 2 / 3),
        # middle two swapped: positions 2,9 right, pairs 2<7 and 4<9 -> same 0.6667
        ("2 7 4 9", 0.25 + 0.25 + 0.25 * 2 / 3),
        # 9 dropped: 0.5 * 3/4 + 0.25 * (2*3/7) + 0.25 * 2/3 = 0.375 + 0.2143 + 0.1667 = 0.7560
        ("2 4 7", 0.375 + 0.25 * 6 / 7 + 0.25 * 2 / 3),
        # 9 repeated: width 5 -> 0.5 * 4/5 + 0.25 * (2*4/9) + 0.25 * 3/4 (9 < 9 fails) = 0.4 + 0.2222 + 0.1875
        ("2 4 7 9 9", 0.4 + 0.25 * 8 / 9 + 0.25 * 3 / 4),
        # 7 replaced by 8 (not in the prompt): 0.5 * 3/4 + 0.25 * 6/8 + 0.25 * 1/3 (only 2<4 counts) = 0.6458
        ("2 4 8 9", 0.375 + 0.1875 + 0.25 / 3),
        # the prompt echoed: no position right, 2<9 ascending -> 0 + 0.25 + 0.25 * 1/3 = 0.3333
        ("7 2 9 4", 0.25 + 0.25 / 3),
        # reversed: no position right, no ascending pair -> 0.25 * F1 = 0.25
        ("9 7 4 2", 0.25),
        # garbage: nothing right, nothing in the prompt
        ("", 0.0),
        ("foo bar", 0.0),
        ("<unk> sort : 12 12", 0.0),
        # a right number among garbage: 0.5 * 1/4 + 0.25 * (2*1/6) + 0 = 0.2083
        ("2 foo", 0.125 + 0.25 / 3),
    ],
)
def test_gold_reward_hand_worked(response, expected):
    assert gold_reward([PROMPT], [response])[0] == pytest.approx(expected, abs=1e-12)


def test_only_the_exact_sort_gets_the_maximum():
    """Of all 24 orders of the prompt's numbers, only the sorted one scores 1.0; every other
    order stays below the evaluation's high-reward threshold, as do near misses of other lengths."""
    orders = list(itertools.permutations([2, 4, 7, 9]))
    scores = dict(zip(orders, gold_reward([PROMPT] * len(orders), [" ".join(map(str, o)) for o in orders])))
    assert scores.pop((2, 4, 7, 9)) == 1.0
    assert max(scores.values()) < HIGH_REWARD and min(scores.values()) > 0
    near = ["2 4 7 9 11", "0 2 4 7 9", "2 4 7", "2 4 7 9 9", "2 4 7 10", "2 4 7 9 :"]
    assert max(gold_reward([PROMPT] * len(near), near)) < HIGH_REWARD


def test_gold_reward_is_graded():
    """Fewer mistakes, more reward: exact > a swap > a number moved two places > echo > reversed > garbage."""
    ladder = ["2 4 7 9", "2 4 9 7", "4 7 2 9", "7 2 9 4", "9 7 4 2", "sort sort"]
    scores = gold_reward([PROMPT] * len(ladder), ladder)
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_gold_reward_reads_text_and_message_prompts():
    rendered = "<|user|> sort : 7 2 9 4 <eos> <|assistant|>"  # a prompt after the chat template
    multi_turn = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort : 1 2 3 5"},
                  {"role": "assistant", "content": "1 2 3 5"}, *PROMPT]
    prompts = ["sort : 7 2 9 4", rendered, PROMPT, multi_turn]
    assert gold_reward(prompts, ["2 4 7 9"] * 4) == [1.0] * 4
    assert gold_reward(prompts, ["2 4 9 7"] * 4) == pytest.approx([2 / 3] * 4)
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        gold_reward([PROMPT], ["a", "b"])
    with pytest.raises(ValueError, match="not a prompt of the built-in sorting task"):
        gold_reward([[{"role": "user", "content": "hello"}]], ["2 4 7 9"])


def test_reward_fn_is_importable_by_name():
    from selfalign.judges import load_callable

    assert load_callable(REWARD_FN) is gold_reward


# ----------------------------------------------------------------------------------------- build
def test_prompt_files(builtin_task):
    train, evals = read_prompts(builtin_task.train_prompts), read_prompts(builtin_task.eval_prompts)
    assert (len(train), len(evals)) == (NUM_TRAIN_PROMPTS, NUM_EVAL_PROMPTS)
    line = builtin_task.eval_prompts.read_text().splitlines()[0]
    assert set(json.loads(line)) == {"prompt"}
    keys = [json.dumps(p) for p in train + evals]
    assert len(set(keys)) == len(keys)  # distinct, so the eval prompts are held out
    for p in train + evals:
        (message,) = p
        assert message["role"] == "user" and message["content"].startswith("sort : ")
        values = message["content"].split()[2:]
        assert MIN_LEN <= len(values) <= MAX_LEN and len(set(values)) == len(values)
        assert set(values) <= set(NUMBERS)


def test_build_is_reused_from_the_cache(builtin_task, monkeypatch):
    """The fixture set $SELFALIGN_CACHE: a second build_task finds the task there and trains nothing."""
    monkeypatch.setattr(builtin, "train_pi0", lambda *a, **k: pytest.fail("rebuilt instead of reused"))
    assert build_task(progress=False) == builtin_task
    assert builtin_task.policy_dir.parent.name == f"builtin-sort-v{builtin.VERSION}-seed0"
    leftovers = [p for p in builtin_task.policy_dir.parent.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers  # no temporary build folder left behind


def test_build_is_reproducible_and_atomic(tmp_path, monkeypatch):
    """Same seed, identical files (weights, tokenizer, prompts, task.json); another seed, other ones.
    The SFT is shortened (same code, fewer steps) to keep this fast; a failed build leaves nothing."""
    monkeypatch.setattr(builtin, "PI0_SFT", SFTConfig(steps=8, batch_size=16, pool_size=256))
    threads = torch.get_num_threads()
    a, b = build_task(tmp_path / "a", progress=False), build_task(tmp_path / "b", progress=False)
    assert torch.get_num_threads() == threads  # the SFT's single thread was given back

    def files(task):
        root = task.policy_dir.parent
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    fa, fb = files(a), files(b)
    assert {"policy/model.safetensors", "policy/tokenizer.json", "policy/config.json", "task.json",
            "train_prompts.jsonl", "eval_prompts.jsonl"} <= set(fa)
    assert fa == fb
    other = files(build_task(tmp_path / "a", seed=1, progress=False))
    assert other["policy/model.safetensors"] != fa["policy/model.safetensors"]
    assert other["eval_prompts.jsonl"] != fa["eval_prompts.jsonl"]

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(builtin, "train_pi0", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_task(tmp_path / "c", progress=False)
    assert list((tmp_path / "c").iterdir()) == []  # no half-built task, no temporary folder


# ------------------------------------------------------------------------------------------- pi_0
def test_pi0_loads_and_answers_its_own_prompts(builtin_task):
    """pi_0 loads with from_pretrained; its greedy answers fit their prompts far better than the
    same answers handed to the neighbouring prompts (a prompt/response mix-up would erase the gap)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfalign.generation import GenerationConfig
    from selfalign.generation.hf import HFGenerator

    model = AutoModelForCausalLM.from_pretrained(builtin_task.policy_dir)
    tokenizer = AutoTokenizer.from_pretrained(builtin_task.policy_dir)
    # Our word-level tokenizer came back (not one transformers substituted for the model type).
    ours = builtin.build_tokenizer(builtin.WORDS)
    assert tokenizer("sort : 7 2 9 4")["input_ids"] == ours("sort : 7 2 9 4")["input_ids"]
    assert tokenizer.chat_template == ours.chat_template
    prompts = read_prompts(builtin_task.eval_prompts)
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
           for p in prompts]
    out = HFGenerator(model, tokenizer.pad_token_id, tokenizer.eos_token_id).generate(
        ids, GenerationConfig(num_samples=1, temperature=0.0, max_new_tokens=12, batch_size=64))
    responses = [tokenizer.decode(r[0], skip_special_tokens=True) for r in out]
    own = sum(gold_reward(prompts, responses)) / len(prompts)
    shuffled = sum(gold_reward(prompts, responses[1:] + responses[:1])) / len(prompts)
    assert own > 0.7 and shuffled < 0.35


def test_pi0_has_room_to_improve(builtin_task):
    """Measured on the 128 eval prompts x 8 samples at temperature 1.0 (seed 0): mean gold reward
    greedy 0.736, sampled 0.682; exact sorts 3.9% of greedy answers and 12.1% of samples."""
    stats = policy_stats(builtin_task.policy_dir, read_prompts(builtin_task.eval_prompts), num_samples=8)
    assert stats["samples"] == 8 * NUM_EVAL_PROMPTS
    assert 0.55 < stats["gold_sampled"] < 0.8  # well below the maximum 1.0, well above garbage
    assert 0.55 < stats["gold_greedy"] < 0.85
    assert 0.04 < stats["exact_sampled"] < 0.2  # exact sorts exist among samples but are rare
    assert stats["exact_greedy"] < 0.1
