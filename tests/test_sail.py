"""SAIL in the loop: routing, label sources, the per-step online mode, resume and bad input.

The exact-gradient proofs of SAIL's surrogate terms are in test_sail_gradient.py; these
tests check that the loop and the trainer wire them as ALGORITHMS.md says.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfalign import losses
from selfalign.cli import main, recipe_path
from selfalign.config import load_config
from selfalign.loop import RunConfig, route_rows, run
from selfalign.tasks.builtin import prompt_numbers
from selfalign.train import Logps, PreferenceTrainer, TrainConfig, _sail
from tests.conftest import (
    ROOT,
    kill_when,
    labels_paid,
    make_examples,
    make_model,
    subprocess_env,
    weights,
    without_timings,
)

SMALL = [
    "iterations=1", "prompts_per_iteration=32", "generation.max_new_tokens=10", "generation.batch_size=16",
    "train.batch_size=8", "train.micro_batch_size=8", "train.learning_rate=2e-4", "eval.prompts=8",
    "eval.samples=2", "judge.chunk_size=8",
]


@pytest.fixture(autouse=True)
def _task(builtin_task):
    return builtin_task


def small(tmp_path: Path, recipe: str, *extra: str) -> RunConfig:
    return load_config(RunConfig, recipe_path(recipe), [*SMALL, f"output_dir={tmp_path}", *extra])


# ------------------------------------------------------------------------------ the loss, by hand
def _logps(route: list[str], uniform: list[float]) -> Logps:
    from selfalign.train import ROUTES

    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return Logps(chosen=t([-3.0, -2.0, -4.0, -1.5]).requires_grad_(), rejected=t([-2.5, -3.5, -3.0, -2.0]).requires_grad_(),
                 ref_chosen=t([-3.2, -2.4, -3.5, -1.0]), ref_rejected=t([-2.0, -3.0, -3.3, -2.2]),
                 chosen_tokens=t([3.0, 2.0, 4.0, 2.0]), rejected_tokens=t([3.0, 4.0, 3.0, 2.0]),
                 route=torch.tensor([ROUTES.index(r) for r in route]), uniform=t(uniform))


def test_sail_loss_per_route_by_hand():
    cfg = TrainConfig(loss="sail", beta=0.5)
    cfg.sail.rho, cfg.sail.pi, cfg.sail.gamma = 0.2, 0.3, 0.4
    # Rows: offline, dp (u = 0.9 >= sigmoid(h): swapped), pp, pr.
    lp = _logps(["offline", "dp", "pp", "pr"], [0.0, 0.9, 0.0, 0.0])
    out = _sail(lp, cfg)
    h = [0.5 * ((c - rc) - (r - rr)) for c, r, rc, rr in zip(lp.chosen.tolist(), lp.rejected.tolist(),
                                                             lp.ref_chosen.tolist(), lp.ref_rejected.tolist())]
    assert 1 / (1 + math.exp(-h[1])) <= 0.9  # the DP row's label is redrawn against it
    F = lambda x: -math.log1p(math.exp(-x))  # noqa: E731  log sigmoid
    expected = [
        -F(h[0]),
        -F(-h[1]) - 0.2 * 0.5 * F(-h[1]) ** 2,
        -F(h[2]) - 0.3 * 0.5 * F(h[2]) ** 2 - 0.3 * F(h[2]) * (-4.0 + -3.0),
        -F(h[3]) - 0.4 * F(h[3]) * (-1.5 + -2.0),
    ]
    assert out.loss.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.extras["dp_swapped"].item() == 1 and out.extras["on_policy"].item() == 2


def test_sail_dp_keeps_the_label_when_the_draw_agrees():
    cfg = TrainConfig(loss="sail", beta=0.5)
    cfg.sail.rho = 0.0
    lp = _logps(["dp"] * 4, [0.0] * 4)  # u = 0 < sigmoid(h): never swapped
    out = _sail(lp, cfg)
    ref = losses.dpo_loss(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, 0.5)
    assert torch.equal(out.loss, ref.loss) and out.extras["dp_swapped"].item() == 0


def test_official_response_term_only_when_asked():
    cfg = TrainConfig(loss="sail", beta=0.5)
    cfg.sail.gamma = 0.4
    lp = _logps(["pr"] * 4, [0.0] * 4)
    paper = _sail(lp, cfg).loss
    cfg.sail.official_response_term = True
    official = _sail(lp, cfg).loss
    h = losses.preference_logits(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, 0.5)
    dpo = losses.dpo_loss(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, 0.5).loss
    assert torch.allclose(official, dpo + losses.sail_response_term_official(h, lp.chosen, lp.rejected, 0.4))
    assert not torch.allclose(paper, official)


def test_trainer_refuses_an_unset_coefficient():
    examples = make_examples(4)
    for ex in examples:
        ex.route = "pp"
    trainer = PreferenceTrainer(make_model(), TrainConfig(loss="sail", batch_size=4), 0, reference=make_model())
    with pytest.raises(ValueError, match="train.sail.pi is unset"):
        trainer.update(examples, progress=False)


# ------------------------------------------------------------------------------ routing
def test_routes_follow_the_probabilities_and_stretch():
    cfg = load_config(RunConfig, None, ["method=sail_mix", "generation.num_samples=2", "train.sail.r=0.2",
                                        "train.sail.p=0.2", "train.sail.g=0.1"])
    rows = route_rows(cfg, list(range(4000)), 0)
    share = {r: sum(1 for row in rows if row.route == r) / len(rows) for r in ("dp", "pp", "pr", "offline")}
    assert share == pytest.approx({"dp": 0.2, "pp": 0.2, "pr": 0.1, "offline": 0.5}, abs=0.03)
    stretched = load_config(RunConfig, None, ["method=sail_dp", "generation.num_samples=2", "train.sail.stretch_epochs=true"])
    rows = route_rows(stretched, list(range(30)), 0)
    assert len(rows) == 50 and sorted({row.prompt for row in rows}) == list(range(30))  # 30 / (1 - 0.4)


def test_presets_fill_only_unset_values():
    cfg = load_config(RunConfig, None, ["method=sail_pp", "generation.num_samples=2", "train.sail.pi=0.5"])
    assert (cfg.sail.p, cfg.sail.pi, cfg.sail.r, cfg.sail.g) == (0.3, 0.5, 0.0, 0.0)
    assert load_config(RunConfig, None, ["method=sail_dp", "generation.num_samples=2"]).sail.rho == 0.2


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("variant", ["dp", "pp", "pr", "mix"])
def test_each_sail_recipe_runs_and_records_label_sources(variant, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", f"sail_{variant}_quickstart", *SMALL, f"output_dir={out}", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    labels = json.loads((out / "iter_000" / "labels.json").read_text())
    routes = labels["routes"]
    assert sum(routes.values()) == 32
    metrics = json.loads((out / "iter_000" / "metrics.json").read_text())
    assert metrics["labels_by_source"] == {k: labels[k] for k in ("judge", "policy", "dataset")}
    assert labels["dataset"] == routes["offline"] + routes["dp"]
    assert labels["policy"] == routes["pp"] + routes["dp"]  # one epoch: each DP label drawn once
    assert labels["judge"] == 2 * routes["pr"]  # the judge scores both samples of a PR row, nothing else
    expected_routes = {"dp": ("dp",), "pp": ("pp",), "pr": ("pr",), "mix": ("dp", "pp", "pr")}[variant]
    assert {r for r, n in routes.items() if n} <= {*expected_routes, "offline"}
    assert all(routes[r] > 0 for r in expected_routes)
    if variant in ("dp", "pp"):
        assert labels["judge"] == 0 and not (out / "iter_000" / "round_000" / "judge_journal.jsonl").exists()
    # generate_every 4 x batch 8 = 32 rows: one round here; the table shows the unpaid sources.
    assert "judge labels" in table and ("policy labels" in table) == (variant != "pr")
    assert "gold/sampled" in metrics


def test_sail_with_zero_coefficients_is_exactly_on_policy_dpo(tmp_path):
    """Every row on the PR route with gamma = 0 is DPO on two judged policy samples: iterative DPO
    with K = 2 and the same fixed reference, weight for weight, in the per-step online mode too."""
    common = ["generation.num_samples=2", "generate_every=2", "train.checkpoint_every=1"]
    run(small(tmp_path / "sail", "sail_pr_quickstart", *common, "train.sail.g=1.0", "train.sail.gamma=0.0"),
        progress=False)
    run(small(tmp_path / "dpo", "quickstart", *common, "method=iterative_dpo", "reference=initial",
              "train.epochs=1", "train.alpha=0.0"), progress=False)
    a, b = weights(tmp_path / "sail" / "iter_000" / "policy"), weights(tmp_path / "dpo" / "iter_000" / "policy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "sail" / "iter_000").glob("round_*"))) == 2


def test_online_rounds_share_one_schedule_and_match_pairs_to_their_prompts(tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    run(small(out, "sail_mix_quickstart", "generate_every=1", "prompts_per_iteration=40"), progress=False)
    it = out / "iter_000"
    rounds = sorted(it.glob("round_*"))
    assert len(rounds) == 5  # 40 rows, 8 per optimizer step
    steps = json.loads((it / "train.json").read_text())["steps"]
    assert len(steps) == 5
    lrs = [s["learning_rate"] for s in steps]
    assert lrs[0] < lrs[1] and lrs[1] > lrs[-1]  # one warmup + decay across rounds, not one per round

    tokenizer = AutoTokenizer.from_pretrained(it / "policy")
    prompts = [json.loads(line) for line in (it / "prompts.jsonl").read_text().splitlines()]
    overlap, n = 0.0, 0
    for k, rd in enumerate(rounds):
        rows = prompts[8 * k : 8 * k + 8]
        online = [r for r in rows if r["route"] in ("pp", "pr")]
        responses = [json.loads(line) for line in (rd / "responses.jsonl").read_text().splitlines()]
        assert len(responses) == len(online)
        by_prompt = {tuple(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)): g["response_ids"]
                     for r, g in zip(online, responses)}
        for pair in (json.loads(line) for line in (rd / "pairs.jsonl").read_text().splitlines()):
            if pair["route"] in ("pp", "pr"):
                # The pair's responses were generated for the pair's own prompt.
                generated = by_prompt[tuple(pair["prompt_ids"])]
                assert pair["chosen_ids"] in generated and pair["rejected_ids"] in generated
                numbers = set(prompt_numbers(tokenizer.decode(pair["prompt_ids"], skip_special_tokens=True)))
                words = tokenizer.decode(pair["chosen_ids"], skip_special_tokens=True).split()
                overlap += sum(w.isdigit() and int(w) in numbers for w in words) / max(1, len(words))
                n += 1
    assert n > 0 and overlap / n > 0.8  # the policy answers with its prompt's numbers


def _launch(out: Path, label_log: Path, delay: float, checkpoint_every: int) -> subprocess.Popen:
    env = subprocess_env(SELFALIGN_TEST_LABEL_LOG=str(label_log), SELFALIGN_TEST_JUDGE_DELAY=str(delay))
    cmd = [sys.executable, "-m", "selfalign", "run", "sail_mix_quickstart", *SMALL, "generate_every=1",
           f"train.checkpoint_every={checkpoint_every}", "judge.function=tests.judge_fns:slow_counting_gold",
           "judge.chunk_size=1",
           f"output_dir={out}", "--no-progress"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [1, 0])
def test_sigkill_between_and_inside_rounds_then_resume_matches_uninterrupted(tmp_path, checkpoint_every):
    """checkpoint_every=1 resumes from the round's checkpoint; 0 (no checkpoint) replays the
    iteration's finished rounds from their stored pairs. Either way: the same weights, no label paid twice."""
    ref_log = tmp_path / "ref_labels.log"
    ref = _launch(tmp_path / "ref", ref_log, 0.0, checkpoint_every)
    assert ref.wait() == 0, ref.stderr.read().decode()[-2000:]
    expected = (tmp_path / "ref" / "metrics.jsonl").read_text()

    out, log = tmp_path / "run", tmp_path / "labels.log"
    it0 = out / "iter_000"
    state = it0 / "train_state" / "update_state.pt"
    # 1. Inside round 1's judging: round 0 is trained, round 1 partly paid for.
    proc = _launch(out, log, 0.3, checkpoint_every)
    kill_when(proc, lambda: (it0 / "round_001" / "judge_journal.jsonl").exists())
    assert not (it0 / "round_001" / "pairs.jsonl").exists()
    assert state.exists() == bool(checkpoint_every)
    # 2. Later, after round 2 generated.
    proc = _launch(out, log, 0.0, checkpoint_every)
    kill_when(proc, lambda: (it0 / "round_002" / "responses.jsonl").exists())
    proc = _launch(out, log, 0.0, checkpoint_every)
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    # The call killed in step 1 (its pending line journaled, the judge still pausing) counts as paid: the run
    # cannot tell whether a judge it lost answered, and counts up (labels_repaid, in labels_total): calls of
    # chunk_size 1 left open by the kills, 2 or 4 labels as the kill lands (measured), never more.
    got, ref = without_timings((out / "metrics.jsonl").read_text()), without_timings(expected)
    repaid = got[0].get("labels_repaid", 0)
    assert got[-1]["labels_total"] - repaid == ref[-1]["labels_total"] and repaid <= 2 * 2
    labels = ("labels", "labels_total", "labels_repaid", "labels_by_source", "labels_total_by_source")
    assert [{k: v for k, v in r.items() if k not in labels} for r in got] == \
        [{k: v for k, v in r.items() if k not in labels} for r in ref]
    a, b = weights(out / "iter_000" / "policy"), weights(tmp_path / "ref" / "iter_000" / "policy")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert labels_paid(log) == labels_paid(ref_log) > 0  # the judge itself was paid no label twice


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("override, message", [
    ("generation.num_samples=4", "generation.num_samples: SAIL's PP and PR routes draw 2 responses"),
    ("train.sail.r=0.9", "r + p + g = 1.5 must be <= 1"),
    ("train.sail.g=-0.1", "train.sail.g: must be >= 0"),
    ("train.optimizer=sgd", "train.optimizer"),
    ("train.sail.stretch_epochs=true", "train.sail.stretch_epochs: r + p + g = 1 leaves no offline share"),
])
def test_bad_sail_config_exits_2(tmp_path, capsys, override, message):
    code = main(["run", "sail_mix_quickstart", *SMALL, override, f"output_dir={tmp_path / 'run'}",
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_bad_preference_file_exits_2_and_keeps_the_run(tmp_path, capsys, builtin_task):
    prefs = tmp_path / "prefs.jsonl"
    lines = builtin_task.train_preferences.read_text().splitlines()[:40]
    bad = json.loads(lines[6])
    del bad["rejected"]
    prefs.write_text("\n".join([*lines[:6], json.dumps(bad), *lines[7:]]) + "\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["run", "sail_dp_quickstart", *SMALL, f"preferences={prefs}", f"output_dir={out}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{prefs} line 7" in err and "rejected" in err and len(err.splitlines()) == 1, err
    assert (out / "keep.txt").read_text() == "mine"


def test_response_term_baseline_is_the_running_mean_of_f():
    cfg = TrainConfig(loss="sail", beta=0.5)
    cfg.sail.gamma, cfg.sail.baseline = 0.4, True
    lp = _logps(["pr"] * 4, [0.0] * 4)
    lp.f_baseline = -0.3
    h = losses.preference_logits(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, 0.5)
    dpo = losses.dpo_loss(lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected, 0.5).loss
    expected = dpo - 0.4 * (torch.nn.functional.logsigmoid(h) + 0.3) * (lp.chosen + lp.rejected)
    assert torch.allclose(_sail(lp, cfg).loss, expected)
    # In the trainer: no baseline at the first step, then the running mean of earlier steps' F.
    examples = make_examples(8)
    for ex in examples:
        ex.route = "pr"
    trainer = PreferenceTrainer(make_model(), TrainConfig(loss="sail", batch_size=4, sail=cfg.sail), 0,
                                reference=make_model())
    trainer.update(examples, progress=False)
    assert trainer.state.f_baseline is not None and trainer.state.f_baseline < 0
