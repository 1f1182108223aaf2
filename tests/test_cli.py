"""The command line end to end: the demo trains, bad input exits 2 with one line, runs stay intact."""

from __future__ import annotations

import json

import pytest
import yaml

from selfalign.cli import main
from selfalign.tasks.sorting import build_task


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_task(tmp_path_factory.mktemp("task"), n_rows=48)


def run(args, capsys):
    code = main([*args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demo_learns_a_held_out_preference(tmp_path, capsys):
    code, out, err = run(["demo", "--output-dir", str(tmp_path)], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["after"]["eval/rewards/accuracies"] >= 0.8
    assert summary["after"]["eval/logps/accuracies"] > summary["before"]["eval/logps/accuracies"]
    assert (tmp_path / "run" / "policy" / "config.json").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3) and rows[-1]["loss"] < 0.5
    # The saved policy loads through the ordinary Hugging Face path.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")
    AutoTokenizer.from_pretrained(tmp_path / "run" / "policy")
    # A finished run is not overwritten.
    code, _, err = run(["demo", "--output-dir", str(tmp_path)], capsys)
    assert code == 2 and "already exists" in err


def write_recipe(tmp_path, model_dir, data_path, **extra):
    recipe = {"model": str(model_dir), "output_dir": str(tmp_path / "run"), "data": {"path": str(data_path)},
              "train": {"batch_size": 8, "micro_batch_size": 8, "learning_rate": 1e-3}, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_from_recipe(tmp_path, task, capsys):
    model_dir, data_path = task
    code, out, err = run(["train", str(write_recipe(tmp_path, model_dir, data_path))], capsys)
    assert code == 0, err
    assert "policy saved" in out


def test_train_from_python_returns_what_the_command_prints(tmp_path, task, capsys):
    """selfalign.offline.train is the library behind `selfalign train`: it prints nothing, returns the summary
    (the same numbers as RUN/summary.json and metrics.jsonl), and the command prints step_table of it."""
    from selfalign.config import load_config
    from selfalign.offline import TrainRunConfig, step_table, train

    model_dir, data_path = task
    summary = train(load_config(TrainRunConfig, write_recipe(tmp_path, model_dir, data_path),
                                ["data.eval_fraction=0.25"]), progress=False)
    assert capsys.readouterr().out == ""
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary.before == saved["before"] and summary.after == saved["after"]
    assert (summary.train_pairs, summary.heldout_pairs) == (saved["train_pairs"], saved["heldout_pairs"]) == (36, 12)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["loss"] for s in summary.steps] == [s["loss"] for s in steps]
    assert summary.policy == tmp_path / "run" / "policy" and summary.uploaded is None
    table = step_table(summary).splitlines()
    assert table[0].split() == ["step", "loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                                "logps/rejected"]
    assert table[-4] == "held-out pairs            before   after" and table[-3].split()[0] == "eval/rewards/accuracies"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "sort : 1 2", "chosen": "1 2"', r"bad\.jsonl line 2: not valid JSON"),
        ('{"prompt": "sort : 1 2", "chosen": "1 2"}', r"bad\.jsonl line 2: missing field 'rejected'"),
        ('{"prompt": "", "chosen": "1 2", "rejected": "2 1"}', r"bad\.jsonl line 2: field 'prompt' must be non-empty"),
        ('{"prompt": "sort : ' + "1 " * 600 + '", "chosen": "1", "rejected": "2"}',
         r"bad\.jsonl line 2: prompt has \d+ tokens, over max_prompt_tokens=512"),
    ],
)
def test_bad_data_exits_2_with_file_and_line(tmp_path, task, capsys, line, message):
    model_dir, _ = task
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "sort : 2 1", "chosen": "1 2", "rejected": "2 1"}\n' + line + "\n")
    code, out, err = run(["train", str(write_recipe(tmp_path, model_dir, bad))], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lerning_rate=1", "did you mean 'train.learning_rate'"),
        ("train.beta=0", "train.beta: must be > 0"),
        ("train.loss=ppo", "expected one of 'dpo', 'ipo', 'ipo_sum', 'selm', 'xpo'"),
        ("data.eval_fraction=1.5", "data.eval_fraction: must be in [0, 1)"),
    ],
)
def test_bad_config_exits_2(tmp_path, task, capsys, override, message):
    model_dir, data_path = task
    code, _, err = run(["train", str(write_recipe(tmp_path, model_dir, data_path)), override], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_changed_config_on_existing_run_refuses_and_keeps_it(tmp_path, task, capsys):
    model_dir, data_path = task
    recipe = write_recipe(tmp_path, model_dir, data_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A run that stopped before it finished: its config is on disk, no policy yet.
    from selfalign.cli import TrainRunConfig
    from selfalign.config import dump_yaml, load_config

    (run_dir / "config.yaml").write_text(dump_yaml(load_config(TrainRunConfig, recipe)))
    before = (run_dir / "config.yaml").read_text()
    code, _, err = run(["train", str(recipe), "train.beta=0.5"], capsys)
    assert code == 2 and "train.beta: 0.1 -> 0.5" in err
    assert (run_dir / "config.yaml").read_text() == before


def test_config_lists_the_online_keys_by_default_and_the_offline_ones_on_request(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "selfalign run" in out
    for key in ("generate_every", "generation.num_samples", "judge.reward_model", "train.sail.gamma", "eval.reward"):
        assert f"\n{key} " in out, key
    assert main(["config", "train"]) == 0
    out = capsys.readouterr().out
    assert "\ndata.path " in out and "generate_every" not in out


def test_accelerate_config_prints_the_path_of_a_shipped_config(capsys):
    from pathlib import Path

    assert main(["accelerate-config", "fsdp2"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == "fsdp2.yaml" and yaml.safe_load(path.read_text())["fsdp_config"]["fsdp_version"] == 2
    assert main(["accelerate-config"]) == 0
    listing = capsys.readouterr().out
    assert all(f"{name}.yaml" in listing for name in ("ddp", "fsdp2", "zero2", "zero3"))
    assert main(["accelerate-config", "fsdp1"]) == 2
    assert "no shipped accelerate config 'fsdp1'; choose one of ddp, fsdp2, zero2, zero3" in capsys.readouterr().err


def test_trl_spellings_parse_to_the_same_config(tmp_path, capsys):
    """`--config FILE --output_dir X --learning_rate V --key value --flag` (TRL's and transformers' habits) is the
    positional recipe plus key=value overrides: the same config, and the same one-line errors."""
    from selfalign.cli import TrainRunConfig, recipe_path, trl_spellings
    from selfalign.config import load_config
    from selfalign.run_config import RunConfig

    recipe = str(recipe_path("quickstart"))
    ours = load_config(RunConfig, recipe, [f"output_dir={tmp_path}", "train.learning_rate=1e-06", "train.beta=0.2",
                                           "train.gradient_checkpointing=true", "generation.max_new_tokens=8"])
    argv = trl_spellings(["--config", recipe, "--output_dir", str(tmp_path), "--learning_rate=1e-06", "--train.beta",
                          "0.2", "--gradient_checkpointing", "--max-new-tokens", "8", "--no-progress"], "run",
                         {"--no-progress"})
    assert argv[0] == recipe and argv[-1] == "--no-progress"
    assert load_config(RunConfig, argv[0], argv[1:-1]) == ours
    train = trl_spellings(["--config=r.yaml", "--dataset_name", "prefs.jsonl", "--beta", "0.3"], "train", set())
    assert train == ["r.yaml", "data.path=prefs.jsonl", "train.beta=0.3"]
    assert load_config(TrainRunConfig, None, train[1:]).data.path == "prefs.jsonl"
    # Errors are the key=value ones: an unknown name names the nearest key; one line, exit 2.
    assert main(["run", "--config", recipe, "--learnin_rate", "1e-6", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "learnin_rate" in err and "learning_rate" in err, err
    assert main(["run", "--config", recipe, "--config", recipe]) == 2
    assert "--config given twice" in capsys.readouterr().err
