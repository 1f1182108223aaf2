"""The online loop end to end on the built-in task: presets, run directory, resume, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from selfalign.cli import main
from selfalign.config import ConfigError, load_config
from selfalign.loop import RunConfig, run
from tests.conftest import ROOT, kill_when, labels_paid, subprocess_env, weights, without_timings

SMALL = [
    "iterations=2", "prompts_per_iteration=24", "generation.num_samples=3", "generation.max_new_tokens=10",
    "generation.batch_size=8", "train.batch_size=8", "train.micro_batch_size=8", "train.learning_rate=2e-4",
    "train.checkpoint_every=1", "eval.prompts=16", "eval.samples=2", "judge.chunk_size=6",
]


@pytest.fixture(autouse=True)
def _task(builtin_task):
    return builtin_task


def small(tmp_path: Path, *extra: str) -> RunConfig:
    return load_config(RunConfig, None, [*SMALL, f"output_dir={tmp_path}", *extra])


def test_run_directory_layout_and_metrics(tmp_path):
    history = run(small(tmp_path / "run"), progress=False)
    out = tmp_path / "run"
    assert [h["iteration"] for h in history] == [0, 1]
    for t in range(2):
        it = out / f"iter_{t:03d}"
        for name in ("prompts.jsonl", "responses.jsonl", "generations.jsonl", "pairs.jsonl", "metrics.json", "labels.json"):
            assert (it / name).exists(), name
        assert (it / "policy" / "config.json").exists()
        gens = [json.loads(line) for line in (it / "generations.jsonl").read_text().splitlines()]
        assert len(gens) == 24 and all(len(g["responses"]) == len(g["scores"]) == 3 for g in gens)
        assert json.loads((it / "labels.json").read_text())["judge"] == 72
    assert history[-1]["labels_total"] == 144
    assert {"gold/greedy", "gold/sampled", "win_rate", "tie_rate", "kl_to_pi0"} <= set(history[-1])
    stages = ("generation", "judging", "reference_logprobs", "update", "eval")  # seconds spent in each stage
    assert all(history[-1][f"time/{k}"] >= 0 for k in stages)
    # Disjoint prompt slices.
    p0 = (out / "iter_000" / "prompts.jsonl").read_text().splitlines()
    p1 = (out / "iter_001" / "prompts.jsonl").read_text().splitlines()
    assert not set(p0) & set(p1)
    # A finished run re-run does nothing new and returns the same metrics.
    assert run(small(tmp_path / "run"), progress=False) == history


def test_selm_with_alpha_zero_is_exactly_iterative_dpo(tmp_path):
    a = run(small(tmp_path / "selm", "method=selm", "train.alpha=0"), progress=False)
    b = run(small(tmp_path / "dpo", "method=iterative_dpo", "train.alpha=0"), progress=False)
    assert without_timings(a) == without_timings(b)
    wa, wb = weights(tmp_path / "selm" / "iter_001" / "policy"), weights(tmp_path / "dpo" / "iter_001" / "policy")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_presets_run(tmp_path):
    for method in ("offline_dpo", "xpo_policy_pairs"):
        history = run(small(tmp_path / method, f"method={method}", "train.alpha=0.01"), progress=False)
        assert history[-1]["labels_total"] == 144
    assert len(list((tmp_path / "offline_dpo").glob("iter_*"))) == 1  # all prompts labelled up front, one update
    # The ablation's y_ref is a separate pi_0 sample, beside pairs drawn from the K policy samples.
    gens = rows(tmp_path / "xpo_policy_pairs" / "iter_000" / "responses.jsonl")
    assert all(len(g["response_ids"]) == 3 and g["ref_response_ids"] and "ref_index" not in g for g in gens)
    pairs = rows(tmp_path / "xpo_policy_pairs" / "iter_000" / "pairs.jsonl")
    assert all(p["ref_sample_ids"] for p in pairs)


def _best_worst_by_hand(scores: list[float]) -> tuple[int, int] | None:
    best = scores.index(max(scores))  # the first among equal bests
    worst = scores.index(min(scores))
    return (best, worst) if scores[best] > scores[worst] else None


def test_selm_official_ranks_pi_ref_greedy_answer_with_the_dataset_pair(tmp_path, builtin_task):
    """SELM's official pipeline: candidates {y_ref = pi_ref's greedy answer, dataset chosen, dataset
    rejected}; best -> chosen, worst -> rejected, so y_ref can sit inside the pair."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfalign.data import PreferenceDataConfig, load_preferences
    from selfalign.generation import GenerationConfig
    from selfalign.generation.hf import HFGenerator

    out = tmp_path / "run"
    history = run(small(out, "method=selm_official", "generation.num_samples=1", "iterations=1", "train.alpha=0.01"),
                  progress=False)
    it = out / "iter_000"
    gens, judged, pairs = rows(it / "responses.jsonl"), rows(it / "generations.jsonl"), rows(it / "pairs.jsonl")
    prompts = [r["prompt"] for r in rows(it / "prompts.jsonl")]
    tokenizer = AutoTokenizer.from_pretrained(builtin_task.policy_dir)
    dataset = {json.dumps(r["prompt"]): r for r in rows(builtin_task.train_preferences)}
    examples = {json.dumps(ex.prompt_ids): ex for ex in load_preferences(
        PreferenceDataConfig(path=str(builtin_task.train_preferences)), tokenizer)}
    assert len(gens) == len(prompts) == 24 and history[0]["labels"] == 3 * 24  # three responses judged per prompt
    # y_ref is pi_0's (= pi_ref's at iteration 0) greedy answer.
    pi0 = AutoModelForCausalLM.from_pretrained(builtin_task.policy_dir)
    greedy = GenerationConfig(num_samples=1, temperature=0.0, max_new_tokens=10)
    first_ids = examples[json.dumps(tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False))].prompt_ids
    assert gens[0]["ref_response_ids"] == HFGenerator(pi0, 0, tokenizer.eos_token_id).generate(
        [first_ids], greedy, progress=False)[0][0]
    inside = 0
    by_prompt = {json.dumps(p["prompt_ids"]): p for p in pairs}
    for prompt, g, j in zip(prompts, gens, judged):
        ex = examples[json.dumps(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                               return_dict=False))]
        assert g["ref_index"] == 0
        assert g["response_ids"] == [g["ref_response_ids"], ex.chosen_ids, ex.rejected_ids]
        assert j["responses"][1:] == [dataset[json.dumps(prompt)]["chosen"], dataset[json.dumps(prompt)]["rejected"]]
        expected = _best_worst_by_hand(j["scores"])
        pair = by_prompt.get(json.dumps(ex.prompt_ids))
        if expected is None:
            assert pair is None
            continue
        assert pair["chosen_ids"] == g["response_ids"][expected[0]]
        assert pair["rejected_ids"] == g["response_ids"][expected[1]]
        assert pair["ref_sample_ids"] == g["ref_response_ids"]  # the optimism term's y_ref
        inside += 0 in expected
    assert inside > 0  # y_ref was ranked into some pairs


def test_xpo_pairs_a_policy_sample_with_a_pi0_sample_that_carries_the_bonus(tmp_path):
    """XPO's paper: the pair is (policy sample, pi_ref sample) ordered by the judge, and y_ref, the
    sample the alpha bonus acts on, is that pi_ref member of the pair, drawn afresh each round."""
    out = tmp_path / "run"
    history = run(small(out, "method=xpo", "generation.num_samples=2", "train.alpha=0.01", "generate_every=1"),
                  progress=False)
    assert [h["labels"] for h in history] == [2 * 24, 2 * 24]  # two responses judged per prompt
    refs = []
    for rd in sorted(out.glob("iter_*/round_*")):
        gens, judged = rows(rd / "responses.jsonl"), rows(rd / "generations.jsonl")
        pairs = {json.dumps([p["chosen_ids"], p["rejected_ids"]]): p for p in rows(rd / "pairs.jsonl")}
        for g, j in zip(gens, judged):
            assert len(g["response_ids"]) == 2 and g["ref_index"] == 1 and g["response_ids"][1] == g["ref_response_ids"]
            refs.append(g["ref_response_ids"])
            s_policy, s_ref = j["scores"]
            if s_policy == s_ref:
                continue
            order = g["response_ids"] if s_policy > s_ref else g["response_ids"][::-1]
            pair = pairs[json.dumps(order)]
            assert pair["ref_sample_ids"] == g["ref_response_ids"]  # the bonus is on the pair's pi_0 member
    # 24 prompts, 8 per optimizer step: three rounds per iteration, each drawing its own y_ref.
    assert len(list(out.glob("iter_000/round_*"))) == 3 and len(refs) == 2 * 24


def test_changed_config_refuses_to_resume(tmp_path, capsys):
    run(small(tmp_path / "run", "iterations=1"), progress=False)
    code = main(["run", "quickstart", *SMALL, "iterations=1", f"output_dir={tmp_path / 'run'}", "train.beta=0.5",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "train.beta: 0.1 -> 0.5" in err


def test_a_run_from_an_older_version_resumes_with_the_values_it_ran_with(tmp_path, capsys):
    """A config.yaml written before eval.every, eval.benchmark, generation.vllm_dtype, judge.llm (a whole section),
    train.dtype and train.lora.merge existed: the run resumes, the missing keys standing for the old behaviour
    (train.dtype: fp32, train.lora.merge: true, which the current defaults auto and false are not); a value
    that differs from that is still refused."""
    out = tmp_path / "run"
    history = run(small(out, "iterations=1", "eval.prompts=4"), progress=False)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    for section, key in [("eval", "every"), ("eval", "benchmark"), ("generation", "vllm_dtype"), ("judge", "llm"),
                         ("train", "dtype")]:
        del saved[section][key]
    del saved["train"]["lora"]["merge"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))

    cfg = small(out, "iterations=1", "eval.prompts=4")
    assert run(cfg, progress=False) == history
    assert cfg.train.dtype == "fp32" and cfg.train.lora.merge is True and cfg.eval.every == 1

    argv = ["run", "quickstart", *SMALL, "iterations=1", "eval.prompts=4", f"output_dir={out}", "--no-progress"]
    capsys.readouterr()  # the in-process runs above drew transformers' loading bars on stderr
    for change, shown in [("eval.every=2", "eval.every: 1 -> 2"), ("train.dtype=bf16", "train.dtype: 'fp32' -> 'bf16'"),
                          ("generation.vllm_dtype=bfloat16", "generation.vllm_dtype: 'float32' -> 'bfloat16'")]:
        code = main([*argv, change])
        err = capsys.readouterr().err
        assert code == 2 and shown in err and len(err.strip().splitlines()) == 1, err


def test_a_run_saved_with_a_former_default_resumes_with_it(tmp_path):
    """train.alpha's default was 0.0 before it became null (the paper's value for selm and xpo): a run whose
    config.yaml holds 0.0 resumes with 0.0 under its old command, rather than being refused as changed."""
    out = tmp_path / "run"
    history = run(small(out, "method=iterative_dpo", "iterations=1", "eval.prompts=4"), progress=False)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["alpha"] is None
    saved["train"]["alpha"] = 0.0  # as a version before null wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = small(out, "method=iterative_dpo", "iterations=1", "eval.prompts=4")
    assert run(cfg, progress=False) == history and cfg.train.alpha == 0.0
    with pytest.raises(ConfigError, match="train.alpha: 0.0 -> 0.5"):
        run(small(out, "method=iterative_dpo", "iterations=1", "eval.prompts=4", "train.alpha=0.5"), progress=False)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "sort : 1 2"}\n{"prompt": "sort : 3\n', "line 2: not valid JSON"),
        ('{"prompt": "sort : 1 2"}\n{"text": "sort : 3 1"}\n', "line 2: missing field 'prompt'"),
        ('{"prompt": "sort : 1 2"}\n{"prompt": ""}\n', "line 2: field 'prompt' must be non-empty"),
        ('{"prompt": "sort : 1 2"}\n{"prompt": "sort ' + "1 " * 600 + '"}\n', "line 2: prompt has"),
    ],
)
def test_bad_prompt_file_exits_2(tmp_path, capsys, content, message):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(content)
    code = main(["run", "quickstart", *SMALL, f"prompts={bad}", f"output_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and str(bad) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "fn, message",
    [("tests.judge_fns:raises", "raised RuntimeError"), ("tests.judge_fns:too_few", "scores for"),
     ("tests.judge_fns:nan", "non-finite score")],
)
def test_bad_reward_function_exits_2_and_keeps_the_run(tmp_path, capsys, fn, message):
    code = main(["run", "quickstart", *SMALL, f"judge.function={fn}", f"output_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert (tmp_path / "run" / "config.yaml").exists()  # the run directory is intact and resumable
    assert (tmp_path / "run" / "iter_000" / "responses.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ("iteration=3", "did you mean 'iterations'"),
    ("generation.num_samples=1", "generation.num_samples: must be >= 2"),
    ("method=ppo", "expected one of"),
    ("prompts_per_iteration=100000", "prompts, but only"),
])
def test_bad_config_exits_2(tmp_path, capsys, override, message):
    code = main(["run", "quickstart", *SMALL, override, f"output_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_train_loss_ipo_trains_ipo(tmp_path, capsys):
    """`selfalign run quickstart train.loss=ipo train.alpha=0` trains SELM's pipeline with IPO.

    Hand-worked: at the first step the policy is pi_0 = pi_ref, so every pair has
    h = beta * 0 = 0 (the logged rewards are 0) and IPO's loss is (0 - 1/(2 beta))**2 =
    1/(4 beta**2) = 25 at the quickstart's beta 0.1, where DPO's would be log 2 = 0.693.
    """
    out = tmp_path / "run"
    code = main(["run", "quickstart", *SMALL, "iterations=1", "train.loss=ipo", "train.alpha=0", f"output_dir={out}",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    steps = json.loads((out / "iter_000" / "train.json").read_text())["steps"]
    first = steps[0]
    # 0 up to batching round-off: reference log-probs come from differently padded batches.
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    beta = 0.1
    assert first["loss"] == pytest.approx((0.0 / beta - 1 / (2 * beta)) ** 2, abs=1e-4)  # 25.0
    assert all(math.isfinite(s["loss"]) for s in steps) and steps[-1]["loss"] < first["loss"]
    assert "ref_response_ids" not in (out / "iter_000" / "responses.jsonl").read_text()  # IPO needs no y_ref


@pytest.mark.parametrize("overrides, message", [
    (["train.loss=ipo"], "train.alpha: ipo has no optimism term, so alpha=0.001 would be unused"),
    (["method=iterative_dpo", "train.loss=selm"], "train.loss: selm cannot train iterative_dpo"),
    (["train.loss=sail"], "train.loss: sail cannot train selm"),
    (["method=sail_dp", "train.loss=dpo"], "train.loss: sail_dp trains with sail"),
])
def test_train_loss_that_the_method_cannot_train_exits_2(tmp_path, capsys, overrides, message):
    code = main(["run", "quickstart", *SMALL, *overrides, f"output_dir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def _launch(out: Path, label_log: Path, delay: float) -> subprocess.Popen:
    env = subprocess_env(SELFALIGN_TEST_LABEL_LOG=str(label_log), SELFALIGN_TEST_JUDGE_DELAY=str(delay))
    cmd = [sys.executable, "-m", "selfalign", "run", "quickstart", *SMALL, "judge.function=tests.judge_fns:slow_counting_gold",
           f"output_dir={out}", "--no-progress"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_in_each_stage_then_resume_matches_uninterrupted(tmp_path):
    ref_log = tmp_path / "ref_labels.log"
    ref = _launch(tmp_path / "ref", ref_log, 0.0)
    assert ref.wait() == 0, ref.stderr.read().decode()[-2000:]
    expected = (tmp_path / "ref" / "metrics.jsonl").read_text()

    out, log = tmp_path / "run", tmp_path / "labels.log"
    it0 = out / "iter_000"
    # 1. During generation: the slice is written, the responses are not.
    proc = _launch(out, log, 0.5)
    kill_when(proc, lambda: (it0 / "prompts.jsonl").exists())
    assert not (it0 / "generations.jsonl").exists()
    # 2. During judging: some chunks are journaled (paid), the rest not.
    proc = _launch(out, log, 0.5)
    kill_when(proc, lambda: (it0 / "judge_journal.jsonl").exists() and (it0 / "judge_journal.jsonl").read_text().count("\n") >= 2)
    assert not (it0 / "generations.jsonl").exists()
    # 3. During training: a mid-update checkpoint exists, the policy does not.
    proc = _launch(out, log, 0.0)
    kill_when(proc, lambda: (it0 / "train_state" / "update_state.pt").exists())
    assert not (it0 / "policy").exists()
    # Resume to the end.
    proc = _launch(out, log, 0.0)
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    assert labels_paid(log) == labels_paid(ref_log) == 144
    # The call killed in step 2 (its pending line journaled, the judge still pausing) counts as paid: the run
    # cannot tell whether a judge it lost answered, and counts up (labels_repaid, in labels_total).
    got, ref = without_timings((out / "metrics.jsonl").read_text()), without_timings(expected)
    assert got[-1]["labels_total"] - got[0].get("labels_repaid", 0) == ref[-1]["labels_total"] == 144
    assert got[0].get("labels_repaid", 0) in (0, 6 * 3)  # none if the kill fell between two calls
    labels = ("labels", "labels_total", "labels_repaid", "labels_by_source", "labels_total_by_source")
    assert [{k: v for k, v in r.items() if k not in labels} for r in got] == \
        [{k: v for k, v in r.items() if k not in labels} for r in ref]


def test_pairwise_ranker_judge_in_the_loop(tmp_path):
    history = run(small(tmp_path / "run", "iterations=1", "judge.kind=pairwise", "generation.num_samples=4",
                        "judge.function=tests.judge_fns:gold_pairwise"), progress=False)
    assert history[0]["labels"] == 24 * 6  # C(4, 2) = 6 comparisons per prompt, not 4 responses
    rows = [json.loads(line) for line in (tmp_path / "run" / "iter_000" / "generations.jsonl").read_text().splitlines()]
    assert all(0.0 <= s <= 1.0 for r in rows for s in r["scores"])
