"""Held-out evaluation: the KL estimator, saved responses and progress, and `selfalign eval`'s defaults."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

from selfalign.cli import main
from selfalign.config import dump_yaml, load_config
from selfalign.evaluate import evaluate_policy, kl_k3, kl_metrics
from selfalign.loop import RunConfig


def test_k3_kl_is_non_negative_where_the_old_k1_mean_went_negative():
    """Two samples with log pi = -1, -3 and log pi_0 = -0.5, -2: r = log pi_0 - log pi = 0.5, 1.0.
    The old estimate, mean(log pi - log pi_0) = (-0.5 - 1.0) / 2 = -0.75, is an impossible KL.
    k3 = mean(e^r - 1 - r) = ((1.6487213 - 1.5) + (2.7182818 - 2)) / 2 = 0.4335015."""
    logp_policy, logp_ref = torch.tensor([-1.0, -3.0]), torch.tensor([-0.5, -2.0])
    assert (logp_policy - logp_ref).mean().item() == pytest.approx(-0.75)
    assert kl_k3(logp_policy, logp_ref).mean().item() == pytest.approx(0.4335015, abs=1e-7)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10_000, generator=g) * 20, torch.randn(10_000, generator=g) * 20
    assert bool((kl_k3(a, b) >= 0).all()) and kl_k3(a, a).abs().max().item() == 0.0


def test_an_overflowing_k3_is_left_out_not_written_as_inf():
    """One sample that pi_0 finds e^800 times likelier than the policy (a loop the policy unlearned): e^800
    overflows float64, so k3's mean is inf. The metrics keep k1 = mean(log pi - log pi_0) = (-800 + 0) / 2 = -400 and
    count the overflow; nothing non-finite reaches metrics.json, the table or the trackers."""
    logp_policy, logp_ref = torch.tensor([-801.0, -2.0]), torch.tensor([-1.0, -2.0])
    m = kl_metrics(kl_k3(logp_policy, logp_ref), logp_policy.double() - logp_ref.double())
    assert m == {"kl_k1_to_pi0": -400.0, "kl_k3_overflow": 1}
    json.dumps(m, allow_nan=False)
    ok = kl_metrics(kl_k3(torch.tensor([-1.0, -3.0]), torch.tensor([-0.5, -2.0])), torch.tensor([-0.5, -1.0]))
    assert ok["kl_to_pi0"] == pytest.approx(0.4335015, abs=1e-7) and ok["kl_k1_to_pi0"] == -0.75
    from selfalign.loop import summary_line

    assert "KL k3 overflowed on 1 sample(s), k1 -400.000" in summary_line(m) and "inf" not in summary_line(m)


def test_evaluation_saves_its_responses_and_shows_progress(builtin_task, tmp_path, capsys, monkeypatch):
    """Off a terminal (pytest captures stderr) progress comes as plain log lines on stdout, here one per update."""
    from transformers import AutoTokenizer

    from selfalign import logs
    from selfalign.judges.function import FunctionJudge
    from selfalign.loop import load_prompts

    cfg = load_config(RunConfig, None, ["generation.max_new_tokens=8", "eval.samples=2"])
    tokenizer = AutoTokenizer.from_pretrained(builtin_task.policy_dir)
    prompts = load_prompts(str(builtin_task.eval_prompts), "prompt", tokenizer, 512)[:4]
    path = tmp_path / "eval_responses.jsonl"
    monkeypatch.setenv("SELFALIGN_PROGRESS_EVERY", "0")
    logs.setup()
    m = evaluate_policy(builtin_task.policy_dir, builtin_task.policy_dir, prompts, tokenizer,
                        FunctionJudge(builtin_task.reward_fn), cfg, progress=True, responses_path=path)
    out = capsys.readouterr().out
    assert "eval" in out and "generate" in out and "\r" not in out
    # pi_0 against itself: its greedy answers are the baseline's and its KL is 0, neither computed twice.
    assert "KL: policy log-probs" not in out and out.count("generate") == 2
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert sum(r["greedy_reward"] for r in rows) / 4 == pytest.approx(m["gold/greedy"])
    assert sum(sum(r["sampled_rewards"]) for r in rows) / 8 == pytest.approx(m["gold/sampled"])
    assert all(len(r["sampled"]) == len(r["sampled_truncated"]) == len(r["sampled_kl"]) == 2 for r in rows)
    assert all(r["greedy"] == r["baseline"] for r in rows) and m["kl_to_pi0"] == 0.0  # pi_0 against itself


def test_the_baseline_answers_are_cached_by_prompts_and_settings(builtin_task, tmp_path, monkeypatch):
    """The baseline's greedy answers are generated once per (baseline, prompts, max_new_tokens): a second
    evaluation reuses them, other prompts (even as many) or another length regenerate them, and a cache written
    before the key existed is reused by the run only (trust_unkeyed), never by `selfalign eval`."""
    from transformers import AutoTokenizer

    import selfalign.evaluate as evaluate
    from selfalign.judges.function import FunctionJudge
    from selfalign.loop import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(builtin_task.policy_dir)
    every = load_prompts(str(builtin_task.eval_prompts), "prompt", tokenizer, 512)
    first, other = every[:4], every[4:8]
    baseline = tmp_path / "baseline"
    shutil.copytree(builtin_task.policy_dir, baseline)
    calls = []
    original = evaluate._generate
    monkeypatch.setattr(evaluate, "_generate", lambda gen, ids, *a, **k: calls.append(len(ids)) or original(gen, ids,
                                                                                                           *a, **k))

    def baseline_generations(prompts, length=8, **kw):
        calls.clear()
        cfg = load_config(RunConfig, None, [f"generation.max_new_tokens={length}", "eval.samples=1"])
        evaluate_policy(builtin_task.policy_dir, builtin_task.policy_dir, prompts, tokenizer,
                        FunctionJudge(builtin_task.reward_fn), cfg, cache=tmp_path, baseline_path=baseline, **kw)
        return len(calls) - 2  # besides the policy's greedy and sampled answers

    assert baseline_generations(first) == 1
    assert baseline_generations(first) == 0
    assert baseline_generations(other) == 1 and baseline_generations(first, length=6) == 1
    cache = tmp_path / "baseline_greedy.json"
    saved = json.loads(cache.read_text())
    del saved["key"]  # as a run written before the key existed left it
    cache.write_text(json.dumps(saved))
    assert baseline_generations(first, length=6) == 0
    cache.write_text(json.dumps(saved))
    assert baseline_generations(first, length=6, trust_unkeyed=False) == 1


@pytest.fixture
def policy_in_run(builtin_task, tmp_path):
    """A run directory as the loop leaves it: RUN/config.yaml and RUN/iter_000/policy (here pi_0's weights)."""
    run = tmp_path / "run"
    shutil.copytree(builtin_task.policy_dir, run / "iter_000" / "policy")
    (run / "config.yaml").write_text(dump_yaml(load_config(RunConfig, None, [f"output_dir={run}"])))
    return run / "iter_000" / "policy"


def test_eval_of_a_policy_in_a_run_uses_its_pi0_and_takes_overrides_after_options(policy_in_run, builtin_task,
                                                                                   tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(policy_in_run), "--limit", "2", "--no-progress", "--output", str(out),
                 "eval.samples=1", "generation.max_new_tokens=6"]) == 0
    record = json.loads(out.read_text())
    assert record["baseline"] == record["reference"] == str(builtin_task.policy_dir)
    assert record["num_prompts"] == 2 and math.isfinite(record["kl_to_pi0"]) and record["kl_to_pi0"] >= 0
    saved = [json.loads(line) for line in out.with_suffix(".responses.jsonl").read_text().splitlines()]
    assert len(saved) == 2 and all(len(r["sampled"]) == 1 for r in saved)  # eval.samples=1 took effect


def test_eval_of_a_trained_policy_defaults_to_the_model_it_was_trained_from(builtin_task, tmp_path):
    """`selfalign train` leaves RUN/config.yaml (model, reference) and RUN/policy: pi_0 is that model."""
    run = tmp_path / "train_run"
    shutil.copytree(builtin_task.policy_dir, run / "policy")
    base = tmp_path / "base"
    shutil.copytree(builtin_task.policy_dir, base)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(base), "reference": "", "output_dir": str(run)}))
    out = tmp_path / "eval.json"
    assert main(["eval", str(run / "policy"), "--limit", "2", "--no-progress", "--output", str(out),
                 "eval.samples=1", "generation.max_new_tokens=6"]) == 0
    assert json.loads(out.read_text())["baseline"] == str(base)


def test_eval_of_a_policy_outside_a_run_needs_a_baseline(builtin_task, tmp_path, capsys):
    """No silent default to the built-in toy model: one line naming the flag, exit status 2."""
    policy = tmp_path / "policy"
    shutil.copytree(builtin_task.policy_dir, policy)
    assert main(["eval", str(policy), "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pass --baseline DIR" in err and len(err.splitlines()) == 1


def test_eval_refuses_a_baseline_with_another_tokenizer_before_generating(builtin_task, tmp_path, capsys):
    """The issue's IndexError: the policy's token ids fed to a model with a smaller vocabulary."""
    from selfalign.tasks.sorting import build_task

    other, _ = build_task(tmp_path / "sorting", n_rows=4)
    policy = tmp_path / "policy"
    shutil.copytree(builtin_task.policy_dir, policy)
    assert main(["eval", str(policy), "--baseline", str(other), "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--baseline {other}: its vocabulary" in err and len(err.splitlines()) == 1


def test_eval_accepts_a_lora_iterate_whose_vocabulary_is_its_base_models(builtin_task, tmp_path):
    """A LoRA run's iterates are adapter directories (no config.json): the tokenizer check reads the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfalign.cli import UsageError, _check_tokenizer

    base = AutoModelForCausalLM.from_pretrained(builtin_task.policy_dir)
    adapter = tmp_path / "iter_000" / "policy"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(builtin_task.policy_dir).save_pretrained(adapter)
    assert not (adapter / "config.json").exists()
    _check_tokenizer(adapter, builtin_task.policy_dir, "--baseline")  # no error
    # The next iterate's adapter names the previous iterate (an adapter itself) as its base.
    later = tmp_path / "iter_001" / "policy"
    shutil.copytree(adapter, later)
    config = json.loads((later / "adapter_config.json").read_text())
    (later / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(adapter)}))
    _check_tokenizer(later, builtin_task.policy_dir, "--baseline")
    other = tmp_path / "other"
    base.config.vocab_size = 8
    base.config.save_pretrained(other)
    with pytest.raises(UsageError, match="vocabulary"):
        _check_tokenizer(adapter, other, "--baseline")
