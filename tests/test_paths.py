"""Path settings as a user writes them: a reward function in a file, `~` and $VARS, an empty output_dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfalign.config import ConfigError, load_config
from selfalign.judges import JudgeError, load_callable
from selfalign.judges.function import FunctionJudge
from selfalign.run_config import RunConfig

REWARD = "def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n"


def test_judge_function_from_a_file_path(tmp_path, monkeypatch):
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "rmtask.py").write_text(REWARD)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    judge = FunctionJudge(f"{tmp_path / 'task' / 'rmtask.py'}:score")
    assert judge.score(["p"], [["ab", "abc"]]) == [[2.0, 3.0]]
    assert load_callable("../task/rmtask.py:score")(["p"], ["abcd"]) == [4.0]  # relative to the working directory
    monkeypatch.setenv("TASKDIR", str(tmp_path / "task"))
    assert load_callable("$TASKDIR/rmtask.py:score")(["p"], ["a"]) == [1.0]
    with pytest.raises(JudgeError, match="no file .*missing.py"):
        load_callable("../task/missing.py:score")


def test_bare_module_beside_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "rmtask_here.py").write_text(REWARD)
    monkeypatch.chdir(tmp_path)
    assert load_callable("rmtask_here:score")(["p"], ["xyz"]) == [3.0]
    with pytest.raises(JudgeError, match="name a file instead"):
        load_callable("no_such_module_here:score")


def test_tilde_and_variables_in_path_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DATA", "/data/x")
    cfg = load_config(RunConfig, None, ["model=~/models/pi0", "prompts=$DATA/p.jsonl", "output_dir=~/runs/a",
                                        "judge.kind=reward_model", "judge.reward_model=~/rm"])
    assert cfg.model == str(tmp_path / "models" / "pi0") and cfg.prompts == "/data/x/p.jsonl"
    assert Path(cfg.output_dir) == tmp_path / "runs" / "a" and cfg.judge.reward_model == str(tmp_path / "rm")
    assert load_config(RunConfig, None, ["model=HuggingFaceTB/SmolLM2-135M-Instruct", "prompts=p.jsonl",
                                             "judge.function=m:f"]).model == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_empty_output_dir_is_refused():
    with pytest.raises(ConfigError, match="output_dir"):
        load_config(RunConfig, None, ["output_dir="])
