"""The online loop's bookkeeping on the built-in task (issue 16): memory across iterations, the
learning-rate schedule's length, the SELM/XPO alpha presets, truncated samples."""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path

import pytest

from selfalign import evaluate, loop
from selfalign.cli import iteration_table
from selfalign.config import load_config
from selfalign.loop import RunConfig, run
from selfalign.pairs import Pair, best_worst
from selfalign.train import PreferenceTrainer, TrainConfig
from selfalign.truncation import finished, is_truncated, penalized_scores
from tests.conftest import schedule_lrs

TINY = [
    "prompts_per_iteration=16", "generation.num_samples=3", "generation.max_new_tokens=10",
    "generation.batch_size=16", "train.batch_size=4", "train.micro_batch_size=4", "train.learning_rate=2e-4",
    "eval.prompts=4", "eval.samples=2", "judge.chunk_size=16",
]


@pytest.fixture(autouse=True)
def _task(builtin_task):
    return builtin_task


def tiny(out: Path, *extra: str) -> RunConfig:
    return load_config(RunConfig, None, [*TINY, f"output_dir={out}", *extra])


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def live_models() -> int:
    """Causal LMs still reachable (after a collection), whoever holds them; their inner base models
    (also PreTrainedModels) are not counted twice."""
    from transformers import GenerationMixin

    gc.collect()
    return sum(isinstance(o, GenerationMixin) for o in gc.get_objects())


def test_memory_stays_flat_across_iterations(tmp_path, monkeypatch):
    """Each iteration trains with exactly its policy and reference alive and evaluates with at most
    two models: the run-wide accelerator used to keep every iteration's policy (t + 1 at iteration t)."""
    at_begin, at_eval, at_load = [], [], []
    begin, stage_eval, load = PreferenceTrainer.begin, loop.stage_eval, evaluate._load

    def counting_begin(self, *args, **kwargs):
        at_begin.append(live_models())
        return begin(self, *args, **kwargs)

    def counting_eval(*args, **kwargs):
        at_eval.append(live_models())
        return stage_eval(*args, **kwargs)

    def counting_load(path):
        at_load.append(live_models())
        return load(path)

    monkeypatch.setattr(PreferenceTrainer, "begin", counting_begin)
    monkeypatch.setattr(loop, "stage_eval", counting_eval)
    monkeypatch.setattr(evaluate, "_load", counting_load)
    run(tiny(tmp_path / "run", "iterations=3", "method=iterative_dpo", "prompts_per_iteration=8"), progress=False)
    assert at_begin == [2, 2, 2]  # the policy and its reference, nothing left from earlier iterations
    assert at_eval == [0, 0, 0]
    # pi_0's evaluation loads pi_0 once (its own baseline and KL reference); each of the 3 policies loads with
    # pi_0: never a third model alive.
    assert len(at_load) == 1 + 2 * 3 and max(at_load) <= 1


def test_schedule_is_sized_from_the_pairs_left_after_ties(tmp_path):
    """About half the prompts tie under the judge: the cosine still runs its whole course over the steps
    actually trained (it was sized from the prompt count, so it ended half-way, undecayed)."""
    out = tmp_path / "run"
    cfg = tiny(out, "iterations=1", "judge.function=tests.judge_fns:ties_on_half", "train.warmup_ratio=0.25",
               "eval.prompts=0", "train.batch_size=2", "train.micro_batch_size=2")
    run(cfg, progress=False)
    labels = json.loads((out / "iter_000" / "labels.json").read_text())
    steps = json.loads((out / "iter_000" / "train.json").read_text())["steps"]
    assert labels["ties"] >= 4 and 3 <= len(steps) == -(-labels["pairs"] // 2) < 16 // 2
    expected = schedule_lrs(TrainConfig(learning_rate=2e-4, warmup_ratio=0.25), len(steps))
    assert [s["learning_rate"] for s in steps] == pytest.approx(expected, rel=1e-12)
    # SELM without train.alpha trains with the paper's alpha, so every pair carries y_ref.
    assert cfg.method == "selm" and cfg.alpha == 1e-3
    assert all(p["ref_sample_ids"] for p in rows(out / "iter_000" / "pairs.jsonl"))


def test_schedule_over_generation_rounds_ends_decayed(tmp_path):
    """With a round every 2 steps the later rounds' sizes are estimated; the last round fixes the total,
    so the final step's rate is the cosine's last value over the steps that ran."""
    out = tmp_path / "run"
    run(tiny(out, "iterations=1", "generate_every=2", "judge.function=tests.judge_fns:ties_on_half",
             "eval.prompts=0", "method=iterative_dpo"), progress=False)
    steps = json.loads((out / "iter_000" / "train.json").read_text())["steps"]
    total = len(steps)
    assert total < 16 // 4
    last = schedule_lrs(TrainConfig(learning_rate=2e-4), total)[-1]
    assert steps[-1]["learning_rate"] == pytest.approx(last, rel=1e-12)


def test_later_round_steps_by_hand():
    """The steps the later rounds of an iteration are expected to take, worked by hand.

    Rounds of rows [0, 8), [8, 16), [16, 21); batch_size 4, 2 epochs, one process.
    Round 0 kept 6 examples of its 8 rows (two ties): a share of 6/8.
      round 1: 8 rows x 6/8 = 6 examples -> batches [4, 2] a pass -> 2 x 2 epochs = 4 steps
      round 2: 5 rows x 6/8 = 3.75 -> 4 examples -> [4]            -> 1 x 2 epochs = 2 steps
      after round 0: 4 + 2 = 6
    Round 1 kept 3 of its 8: round 2 gets 5 x 3/8 = 1.875 -> 2 examples -> [2] -> 2 steps.
    After the last round: 0.
    Round 0 kept 5 of 8: round 1 gets 8 x 5/8 = 5 examples -> [4, 1] -> 4 steps, round 2 gets
    5 x 5/8 = 3.125 -> 3 -> [3] -> 2 steps: 6. On two processes the step of 1 is dropped (each process
    needs a row): round 1 takes 1 x 2 epochs = 2 steps, and the total is 4.
    Python's round sends halves to the even number: rows [0, 2), [2, 7), 1 kept of 2 -> 5 x 1/2 = 2.5 -> 2
    examples; with batch_size 2 and one epoch that is [2], 1 step (3 examples would be [2, 1], 2 steps).
    """
    from selfalign.loop import later_round_steps
    from selfalign.train import TrainConfig, plan_steps

    cfg = TrainConfig(batch_size=4, micro_batch_size=4, epochs=2)

    def steps(processes):
        return lambda n: len(plan_steps(cfg, n, 0, processes))

    rounds = [(0, 8), (8, 16), (16, 21)]
    assert later_round_steps(rounds, 0, 6, steps(1)) == 6
    assert later_round_steps(rounds, 1, 3, steps(1)) == 2
    assert later_round_steps(rounds, 2, 5, steps(1)) == 0
    assert later_round_steps(rounds, 0, 5, steps(1)) == 6
    assert later_round_steps(rounds, 0, 5, steps(2)) == 4
    halves = TrainConfig(batch_size=2, micro_batch_size=2, epochs=1)
    assert later_round_steps([(0, 2), (2, 7)], 0, 1, lambda n: len(plan_steps(halves, n, 0, 1))) == 1


@pytest.mark.parametrize("method, alpha", [("selm", 1e-3), ("xpo", 1e-5), ("iterative_dpo", 0.0)])
def test_alpha_presets(method, alpha):
    assert load_config(RunConfig, None, [f"method={method}"]).alpha == alpha
    assert load_config(RunConfig, None, [f"method={method}", "train.alpha=0"]).alpha == 0.0


@pytest.mark.parametrize("mode", ["keep", "penalize", "drop"])
def test_truncated_samples_are_recorded_and_handled(tmp_path, mode):
    """The built-in task's answers (a sorted list, then EOS) take 5-7 tokens: max_new_tokens=6 cuts some short."""
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    history = run(tiny(out, "iterations=1", "method=iterative_dpo", "generation.max_new_tokens=6",
                       f"generation.truncated={mode}"), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(loop.resolve_task(tiny(out), progress=False).policy)
    eos = tokenizer.eos_token_id
    it = out / "iter_000"
    responses = rows(it / "responses.jsonl")
    flags = [f for r in responses for f in r["truncated"]]
    for r in responses:
        assert r["truncated"] == [len(y) == 6 and y[-1] != eos for y in r["response_ids"]]
    assert 0 < sum(flags) < len(flags)
    assert [g["truncated"] for g in rows(it / "generations.jsonl")] == [r["truncated"] for r in responses]
    m = history[-1]
    assert m["truncated"] == sum(flags) and m["truncated_share"] == pytest.approx(sum(flags) / len(flags))
    table = iteration_table(out, history).splitlines()
    # The printed table's cut column is the held-out samples' (pi_0 has one too); training's is in metrics.json.
    assert table[0].endswith("cut (sampled)") and table[-1].split()[-1] == f"{m['eval/truncated_share']:.2f}"
    truncated_ids = {tuple(y) for r in responses for y, t in zip(r["response_ids"], r["truncated"]) if t}
    pairs = rows(it / "pairs.jsonl")
    chosen_cut = sum(tuple(p["chosen_ids"]) in truncated_ids for p in pairs)
    rejected_cut = sum(tuple(p["rejected_ids"]) in truncated_ids for p in pairs)
    if mode == "drop":
        assert chosen_cut == rejected_cut == 0 and m["truncation_dropped"] > 0
        assert m["pairs"] + m["ties"] + m["truncation_dropped"] == 16
    elif mode == "penalize":  # a truncated answer scores below the round's lowest: it loses to every finished one
        all_cut = sum(all(r["truncated"]) for r in responses)
        assert chosen_cut == 0 and all_cut > 0 and m["ties"] >= all_cut  # all cut: all penalized alike, no pair
    else:
        assert chosen_cut > 0
    ev = rows(it / "eval_responses.jsonl")
    assert len(ev) == 4 and all(len(e["sampled"]) == len(e["sampled_rewards"]) == 2 for e in ev)
    assert m["eval/truncated_share"] == pytest.approx(sum(map(sum, (e["sampled_truncated"] for e in ev))) / 8)


def test_truncated_drop_never_pays_the_judge_for_a_dropped_answer(tmp_path, monkeypatch):
    """With truncated=drop the judge is asked about exactly the finished answers of the rows that keep two or
    more of them (a row with fewer is dropped unjudged); keep asks about every answer. labels counts what the
    judge saw, in both modes."""
    from collections import Counter

    seen = {}
    for mode in ("keep", "drop"):
        log = tmp_path / f"{mode}.judged"
        monkeypatch.setenv("SELFALIGN_TEST_JUDGED", str(log))
        out = tmp_path / mode
        history = run(tiny(out, "iterations=1", "method=iterative_dpo", "generation.max_new_tokens=6", "eval.prompts=0",
                           f"generation.truncated={mode}", "judge.function=tests.judge_fns:logging_gold"),
                      progress=False)
        judged = Counter(tuple(json.dumps(x) for x in json.loads(line)) for line in log.read_text().splitlines())
        gens = rows(out / "iter_000" / "generations.jsonl")
        expected = Counter((json.dumps(g["prompt"]), json.dumps(r)) for g in gens
                           for r, cut in zip(g["responses"], g["truncated"])
                           if mode == "keep" or (not cut and len(finished(g["truncated"])) >= 2))
        assert judged == expected
        assert history[-1]["labels"] == sum(judged.values())
        assert all((s is None) == (mode == "drop" and (cut or len(finished(g["truncated"])) < 2))
                   for g in gens for s, cut in zip(g["scores"], g["truncated"]))
        seen[mode] = history[-1]
    cut = seen["keep"]["truncated"]
    assert cut > 0 and seen["drop"]["truncated"] == cut  # same samples: same seed, same policy
    assert seen["drop"]["labels"] <= seen["keep"]["labels"] - cut == 16 * 3 - cut
    assert seen["drop"]["labelled_pairs"] == 16 - seen["drop"]["truncation_dropped"]


def test_truncation_rule_and_penalty():
    """A response is truncated when it fills max_new_tokens without ending on an end token; penalize ranks
    it below every finished response (default: 1 below the lowest score) or gives it the set score."""
    assert is_truncated([5, 6, 7], 3, {2}) and not is_truncated([5, 6, 2], 3, {2}) and not is_truncated([5, 2], 3, {2})
    scores, cut = [[0.9, 0.2, 0.5], [0.4, 0.3]], [[True, False, False], [True, True]]
    assert penalized_scores(scores, cut, None) == [[-0.8, 0.2, 0.5], [-0.8, -0.8]]
    assert penalized_scores(scores, cut, 0.25) == [[0.25, 0.2, 0.5], [0.25, 0.25]]
    rng = random.Random(0)
    assert best_worst(penalized_scores(scores, cut, None)[0], rng) == Pair(2, 0)  # was Pair(0, 1): the cut one won
    assert best_worst(penalized_scores(scores, cut, None)[1], rng) is None
    assert finished([True, False, False]) == [1, 2]
