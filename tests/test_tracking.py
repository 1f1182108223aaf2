"""Experiment tracking and logs: per-step metrics in RUN/steps.jsonl as training runs (and after a resume the
same file as an uninterrupted run's), TensorBoard event files read back, timestamped lines without carriage
returns when the output is piped, and one-line errors for a tracker that is unknown or not installed."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from accelerate import Accelerator

from selfalign.cli import main
from selfalign.tracking import STEPS_FILE, RunTracker, flatten
from tests.conftest import ROOT, subprocess_env

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d selfalign: ")


def test_piped_run_has_timestamped_lines_per_stage_and_tensorboard_reads_back_every_step(tmp_path, builtin_task):
    """A quickstart-sized run from a Parquet prompt file and a save_to_disk held-out split, piped:
    every line but the final table is timestamped, no carriage return anywhere (progress lines forced on
    with SELFALIGN_PROGRESS_EVERY=0), a line per stage of each iteration and a run ETA; the TensorBoard
    event file holds each optimizer step's metrics at its global step, equal to RUN/steps.jsonl and
    train.json, each iteration's evaluation, and the resolved config as hyper-parameters."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    rows = [json.loads(line) for line in builtin_task.train_prompts.read_text().splitlines()[:16]]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "prompts.parquet"))
    held = [json.loads(line) for line in builtin_task.eval_prompts.read_text().splitlines()[:8]]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(held)}
                         ).save_to_disk(str(tmp_path / "heldout"))
    out = tmp_path / "run"
    argv = ["run", "quickstart", "iterations=2", "prompts_per_iteration=8", "generation.num_samples=2",
            "generation.max_new_tokens=6", "train.batch_size=4", "train.micro_batch_size=4", "eval.prompts=4",
            "eval.samples=1", f"prompts={tmp_path / 'prompts.parquet'}", f"eval_prompts={tmp_path / 'heldout'}",
            "eval_prompts_split=test", "report_to=tensorboard", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "selfalign", *argv], cwd=ROOT, capture_output=True, timeout=600,
                          env=subprocess_env(SELFALIGN_PROGRESS_EVERY="0"))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    print(proc.stdout.decode())
    text = proc.stdout.decode() + proc.stderr.decode()
    assert "\r" not in text
    lines = proc.stdout.decode().splitlines()
    table = lines.index(next(line for line in lines if line.lstrip().startswith("iteration")))
    assert table > 10 and all(STAMP.match(line) for line in lines[:table]), lines[:table]
    assert proc.stderr.decode().strip() == ""
    for it in ("iter_000", "iter_001"):
        for stage in ("generation", "judging", "reference log-probs", "update", "eval"):
            assert any(f"{it}: {stage} " in line and line.endswith(" s") for line in lines), (it, stage)
    assert any("iter_000 done in" in line and "1 iteration(s) left, ETA" in line for line in lines)
    assert any(re.search(r"selm update: \d+/\d+ \(\d+%\)", line) for line in lines)  # a plain progress line
    assert any("pi_0: gold greedy" in line for line in lines)

    steps = [json.loads(line) for line in (out / STEPS_FILE).read_text().splitlines()]
    trained = [json.loads((out / it / "train.json").read_text())["steps"] for it in ("iter_000", "iter_001")]
    n0, n1 = len(trained[0]), len(trained[1])
    assert n0 >= 1 and n1 >= 1
    assert [(s["iteration"], s["step"], s["global_step"]) for s in steps] == \
        [(0, j, j) for j in range(1, n0 + 1)] + [(1, j, n0 + j) for j in range(1, n1 + 1)]
    assert [{k: v for k, v in s.items() if k not in ("iteration", "step", "global_step")} for s in steps] == \
        trained[0] + trained[1]

    (events,) = (out / "tensorboard" / "selfalign").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"):
        got = [(e.step, e.value) for e in acc.Scalars(f"train/{name}")]
        assert got == [(s["global_step"], pytest.approx(s[name], rel=1e-6, abs=1e-9)) for s in steps], name
    metrics = [json.loads((out / it / "metrics.json").read_text()) for it in ("iter_000", "iter_001")]
    pi0 = json.loads((out / "pi0_metrics.json").read_text())
    assert [(e.step, e.value) for e in acc.Scalars("iteration/gold/greedy")] == \
        [(0, pytest.approx(pi0["gold/greedy"])), (n0, pytest.approx(metrics[0]["gold/greedy"])),
         (n0 + n1, pytest.approx(metrics[1]["gold/greedy"]))]
    assert [e.value for e in acc.Scalars("iteration/labels_total")] == [m["labels_total"] for m in metrics]
    assert len(acc.Scalars("iteration/time/update")) == 2
    (hp_events,) = (out / "tensorboard" / "selfalign").glob("*/events.out.tfevents.*")
    hp = EventAccumulator(str(hp_events))
    hp.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        hp.summary_metadata["_hparams_/session_start_info"].plugin_data.content).session_start_info.hparams
    assert start["train.beta"].number_value == pytest.approx(0.1)
    assert start["method"].string_value == "selm" and start["eval_prompts_split"].string_value == "test"


def test_steps_file_after_a_resume_equals_the_uninterrupted_one(tmp_path):
    """Steps 1-4 of iteration 0 written, then a new process resumes from a checkpoint at step 2 and redoes
    steps 3-4 (the same numbers: training is deterministic): the file ends as it was, a partial line a kill
    left behind included. Iteration 1's lines follow on."""
    acc = Accelerator(cpu=True)
    first = RunTracker(tmp_path, acc, {})
    first.begin_iteration(0)
    for j in range(1, 5):
        first.on_step(j, {"loss": 1.0 / j})
    whole = (tmp_path / STEPS_FILE).read_text()
    with open(tmp_path / STEPS_FILE, "a") as f:
        f.write('{"iteration": 0, "step": 5, "glo')  # killed mid-line
    resumed = RunTracker(tmp_path, acc, {})
    resumed.begin_iteration(0)
    for j in (3, 4):
        resumed.on_step(j, {"loss": 1.0 / j})
    assert (tmp_path / STEPS_FILE).read_text() == whole
    (tmp_path / "iter_000").mkdir()
    (tmp_path / "iter_000" / "train.json").write_text(json.dumps({"steps": [{}] * 4}))
    resumed.begin_iteration(1)
    resumed.on_step(1, {"loss": 0.5})
    last = json.loads((tmp_path / STEPS_FILE).read_text().splitlines()[-1])
    assert (last["iteration"], last["step"], last["global_step"]) == (1, 1, 5)


def test_flattened_config_holds_only_scalars_and_text():
    flat = flatten({"train": {"beta": 0.1, "lora": {"target_modules": ["q_proj"]}}, "reward": None, "n": 3})
    assert flat == {"train.beta": 0.1, "train.lora.target_modules": '["q_proj"]', "reward": "null", "n": 3}


def _missing_tracker() -> str | None:
    from accelerate.tracking import get_available_trackers

    available = {str(t.value) for t in get_available_trackers()}
    return next((t for t in ("wandb", "trackio", "aim", "dvclive", "swanlab") if t not in available), None)


@pytest.mark.parametrize("value, message", [
    ("tensorbord", "report_to: unknown tracker 'tensorbord' (one or more of tensorboard, wandb"),
    ("MISSING", "is not installed (pip install"),
])
def test_bad_report_to_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, builtin_task, value, message):
    if value == "MISSING":
        value = _missing_tracker()
        if value is None:
            pytest.skip("every tracker is installed here")
        message = f"report_to: {value} {message}"
    out = tmp_path / "run"
    code = main(["run", "quickstart", "iterations=1", f"report_to={value}", f"output_dir={out}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_progress_is_plain_lines_off_a_terminal(capsys, monkeypatch):
    from selfalign import logs

    monkeypatch.setenv("SELFALIGN_PROGRESS_EVERY", "0")
    logs.setup()
    assert not logs.is_terminal()  # pytest captures stderr
    for _ in logs.progress_bar(range(4), desc="judge"):
        pass
    out = capsys.readouterr().out.splitlines()
    assert [line.split("selfalign: ")[1].split(",")[0] for line in out] == \
        [f"[RANK 0] judge: {n}/4 ({25 * n}%)" for n in range(1, 5)]
    assert all(STAMP.match(line) for line in out)
    assert logs.duration(42.06) == "42.1 s" and logs.duration(185) == "3 min 05 s" and logs.duration(7440) == "2 h 04 min"


def test_steps_reach_disk_while_the_iteration_trains(tmp_path, capsys, monkeypatch, builtin_task):
    """A run stopped inside its first update (a NaN injected at optimizer step 3) has steps 1 and 2 in
    RUN/steps.jsonl already, with the trainer's numbers, though the iteration never finished (no train.json)."""
    out = tmp_path / "run"
    monkeypatch.setenv("SELFALIGN_NAN_AT_STEP", "3")
    code = main(["run", "quickstart", "iterations=1", "prompts_per_iteration=16", "generation.num_samples=2",
                 "generation.max_new_tokens=6", "train.batch_size=4", "train.micro_batch_size=4", "eval.prompts=0",
                 "judge.noise=0", f"output_dir={out}", "--no-progress"])
    assert code == 2, capsys.readouterr().err
    assert not (out / "iter_000" / "train.json").exists()
    steps = [json.loads(line) for line in (out / STEPS_FILE).read_text().splitlines()]
    assert [(s["iteration"], s["step"], s["global_step"]) for s in steps] == [(0, 1, 1), (0, 2, 2)]
    assert all(s["loss"] > 0 and "rewards/margins" in s for s in steps)
    assert steps[0]["learning_rate"] == 0.0 < steps[1]["learning_rate"]  # the quickstart's warmup starts at lr 0


def test_offline_train_reports_to_tensorboard(tmp_path, capsys):
    """`selfalign train report_to=tensorboard`: the event file holds every step of RUN/steps.jsonl, the held-out
    accuracy before (step 0) and after (the last step) as in summary.json, and the resolved config."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from selfalign.tasks.sorting import build_task

    model_dir, pairs = build_task(tmp_path / "task", n_rows=24)
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": str(model_dir), "data": {"path": str(pairs), "eval_fraction": 0.25}}))
    argv = ["train", str(recipe), "train.batch_size=6", "train.micro_batch_size=6", "report_to=tensorboard",
            f"output_dir={out}", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    steps = [json.loads(line) for line in (out / STEPS_FILE).read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(steps) == 3

    (events,) = (out / "tensorboard" / "selfalign").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    for name in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "learning_rate"):
        got = [(e.step, e.value) for e in acc.Scalars(f"train/{name}")]
        assert got == [(s["global_step"], pytest.approx(s[name], rel=1e-6, abs=1e-9)) for s in steps], name
    got = [(e.step, e.value) for e in acc.Scalars("iteration/eval/rewards/accuracies")]
    assert got == [(0, pytest.approx(summary["before"]["eval/rewards/accuracies"])),
                   (3, pytest.approx(summary["after"]["eval/rewards/accuracies"]))]
    (hp_events,) = (out / "tensorboard" / "selfalign").glob("*/events.out.tfevents.*")
    hp = EventAccumulator(str(hp_events))
    hp.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        hp.summary_metadata["_hparams_/session_start_info"].plugin_data.content).session_start_info.hparams
    assert start["train.batch_size"].number_value == 6 and start["model"].string_value == str(model_dir)


def test_offline_train_refuses_an_unknown_tracker_in_one_line(tmp_path, capsys):
    out, recipe = tmp_path / "run", tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": "x", "data": {"path": "y"}}))
    assert main(["train", str(recipe), "report_to=tensorbord", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("selfalign: error: report_to: unknown tracker 'tensorbord' (one or more of "
                   "tensorboard, wandb, trackio, aim, comet_ml, mlflow, clearml, dvclive, swanlab, all, "
                   "comma-separated, or none)") and not out.exists()
