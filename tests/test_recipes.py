"""The paper recipes load, validate, and run their loading path on local directories."""

from __future__ import annotations

import json

import pytest

from selfalign.cli import RECIPES, main, recipe_path
from selfalign.config import load_config
from selfalign.loop import RunConfig
from tests.test_judges import _reward_model_dir

PAPER = sorted(p.stem for p in RECIPES.glob("selm_*.yaml"))


def test_bundled_recipes_validate():
    assert PAPER == ["selm_llama3_8b", "selm_phi3_mini", "selm_zephyr_7b"]
    for name in [*PAPER, "quickstart"]:
        cfg = load_config(RunConfig, recipe_path(name))
        assert cfg.method == "selm" and cfg.train.beta in (0.1, 0.01)
    llama = load_config(RunConfig, recipe_path("selm_llama3_8b"))
    assert (llama.train.alpha, llama.iteration_learning_rates) == (1e-4, [5e-7, 3e-7, 1e-7])


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_runs_on_local_directories(name, tmp_path, capsys, builtin_task):
    """The hub names replaced by local directories (pi_0 of the built-in task, a tiny reward model
    with its own tokenizer), everything else as in the recipe but sized down."""
    task = builtin_task
    rm = _reward_model_dir(tmp_path / "rm")
    code = main(["run", name, f"model={task.policy_dir}", f"prompts={task.train_prompts}",
                 f"eval_prompts={task.eval_prompts}", f"judge.reward_model={rm}", f"output_dir={tmp_path / 'run'}",
                 "iterations=1", "iteration_learning_rates=[1e-4]", "prompts_per_iteration=8",
                 "generation.num_samples=2", "generation.max_new_tokens=8", "train.batch_size=8",
                 "train.micro_batch_size=4", "train.mixed_precision=no", "eval.prompts=4",
                 "eval.reward=selfalign.tasks.builtin:gold_reward", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "iter_000" / "metrics.json").read_text())
    assert metrics["labels"] == 16 and metrics["pairs"] + metrics["ties"] == 8


SAIL_PAPER = sorted(p.stem for p in RECIPES.glob("sail_*.yaml") if not p.stem.endswith("_quickstart"))


def test_sail_paper_recipes_validate():
    assert SAIL_PAPER == ["sail_llama3_8b", "sail_phi3_mini", "sail_qwen15_0p5b"]
    for name in SAIL_PAPER:
        cfg = load_config(RunConfig, recipe_path(name))
        t = cfg.train
        assert (cfg.method, t.beta, t.optimizer, t.learning_rate, t.lora.enabled, t.lora.r, t.lora.alpha) == (
            "sail_pp", 0.1, "rmsprop", 1e-5, True, 64, 16)
        assert (cfg.generation.num_samples, cfg.generation.temperature, cfg.sail.p, cfg.sail.pi) == (2, 0.9, 0.3, 0.2)
        assert t.sail.stretch_epochs and cfg.generate_every == 1


@pytest.mark.parametrize("name", SAIL_PAPER)
@pytest.mark.parametrize("method", ["sail_pp", "sail_pr"])
def test_sail_paper_recipe_runs_on_local_directories(name, method, tmp_path, capsys, builtin_task):
    """LoRA r 64 and RMSprop on pi_0 of the built-in task, with its preference dataset and a tiny
    reward model with its own tokenizer for the PR route; sizes cut down."""
    task = builtin_task
    rm = _reward_model_dir(tmp_path / "rm")
    code = main(["run", name, f"method={method}", f"model={task.policy_dir}", f"preferences={task.train_preferences}",
                 f"eval_prompts={task.eval_prompts}", f"judge.reward_model={rm}", f"output_dir={tmp_path / 'run'}",
                 "prompts_per_iteration=16", "generation.max_new_tokens=8", "train.batch_size=8",
                 "train.micro_batch_size=4", "train.mixed_precision=no", "train.gradient_checkpointing=false",
                 "eval.prompts=4", "eval.reward=selfalign.tasks.builtin:gold_reward", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    it = tmp_path / "run" / "iter_000"
    labels = json.loads((it / "labels.json").read_text())
    assert sum(labels["routes"].values()) == 23  # 16 rows stretched by 1 / (1 - 0.3)
    assert labels["judge"] == (2 * labels["routes"]["pr"] if method == "sail_pr" else 0)
    assert len(list(it.glob("round_*"))) == 3  # a generation round per optimizer step
