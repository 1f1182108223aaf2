"""`selfalign eval`, `report` and `compare` on runs of the quickstart and SAIL recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from selfalign.cli import main

SMALL = [
    "iterations=2", "prompts_per_iteration=24", "generation.max_new_tokens=10", "generation.batch_size=16",
    "train.batch_size=8", "train.micro_batch_size=8", "train.learning_rate=2e-4", "eval.prompts=12",
    "eval.samples=2",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, builtin_task) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for recipe, extra in (("quickstart", ["generation.num_samples=2"]), ("sail_pr_quickstart", [])):
        out[recipe] = root / recipe
        assert main(["run", recipe, *SMALL, *extra, f"output_dir={out[recipe]}", "--no-progress"]) == 0
    return out


def _image_ok(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
        # Not a blank canvas: a plot has many distinct colours (lines, text, legend).
        assert len(set(im.convert("RGB").getdata())) > 50


@pytest.mark.parametrize("recipe", ["quickstart", "sail_pr_quickstart"])
def test_report_writes_markdown_and_plots(runs, recipe, capsys):
    run = runs[recipe]
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    metrics = [json.loads((run / f"iter_{t:03d}" / "metrics.json").read_text()) for t in range(2)]
    assert f"| iter 1 | {metrics[1]['labelled_pairs_total']} |" in text
    assert f"{metrics[1]['gold/sampled']:.3f}" in text
    for name in ("reward_vs_labels", "win_rate", "kl", "reward_hist"):
        assert f"(plots/{name}.png)" in text
        _image_ok(run / "plots" / f"{name}.png")
    if recipe == "sail_pr_quickstart":
        assert "## Labels by source" in text and "pr " in text


def test_labelled_pairs_count_judged_prompts_and_dataset_pairs(runs):
    m = json.loads((runs["sail_pr_quickstart"] / "iter_000" / "metrics.json").read_text())
    labels = json.loads((runs["sail_pr_quickstart"] / "iter_000" / "labels.json").read_text())
    assert m["labelled_pairs"] == labels["routes"]["pr"] + labels["routes"]["offline"] == 24
    q = json.loads((runs["quickstart"] / "iter_001" / "metrics.json").read_text())
    assert q["labelled_pairs_total"] == 48 and q["labels_total"] == 96  # K = 2 judge labels per prompt


def test_compare_puts_runs_side_by_side(runs, tmp_path, capsys):
    assert main(["compare", str(runs["quickstart"]), str(runs["sail_pr_quickstart"]), "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "quickstart (selm)" in out and "sail_pr_quickstart (sail_pr)" in out and "| pi_0 |" in out
    _image_ok(tmp_path / "compare.png")
    assert "compare.png" in (tmp_path / "compare.md").read_text()


def test_eval_a_run_and_a_policy_directory(runs, tmp_path, capsys):
    run = runs["sail_pr_quickstart"]
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--limit", "8", "--pairs", str(run / "iter_001" / "pairs.jsonl"),
                 "--output", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["policy"] == str(run / "iter_001" / "policy") and record["num_prompts"] == 8
    for key in ("gold/greedy", "gold/sampled", "gold/high_reward_fraction", "win_rate", "tie_rate", "kl_to_pi0",
                "implicit/gap", "implicit/accuracy"):
        assert key in record
    assert 0 <= record["win_rate"] + record["tie_rate"] <= 1 and 0 <= record["implicit/accuracy"] <= 1
    # A policy against itself: every answer ties, KL 0, no implicit gap.
    policy = run / "iter_001" / "policy"
    assert main(["eval", str(policy), "--baseline", str(policy), "--reference", str(policy), "--limit", "8",
                 "--pairs", str(run / "iter_001" / "pairs.jsonl"), "--output", str(out), "--no-progress"]) == 0
    same = json.loads(out.read_text())
    assert (same["win_rate"], same["tie_rate"], same["implicit/gap"]) == (0.0, 1.0, 0.0)
    assert abs(same["kl_to_pi0"]) < 1e-6


@pytest.mark.parametrize("argv, message", [
    (["report", "{tmp}"], "not a run directory"),
    (["eval", "{tmp}"], "neither a policy directory"),
    (["compare", "{tmp}"], "not a run directory"),
])
def test_bad_targets_exit_2(tmp_path, capsys, argv, message):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
