"""The online loop end to end on the built-in task: presets, run directory, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selfalign.cli import main
from selfalign.config import load_config
from selfalign.loop import RunConfig, run
from tests.conftest import without_timings

ROOT = Path(__file__).resolve().parents[1]
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


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


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


def test_presets_run(tmp_path):
    for method in ("offline_dpo", "xpo"):
        history = run(small(tmp_path / method, f"method={method}", "train.alpha=0.01"), progress=False)
        assert history[-1]["labels_total"] == 144
    assert len(list((tmp_path / "offline_dpo").glob("iter_*"))) == 1  # all prompts labelled up front, one update
    pairs = [json.loads(line) for line in (tmp_path / "xpo" / "iter_000" / "pairs.jsonl").read_text().splitlines()]
    assert all(p["ref_sample_ids"] for p in pairs)


def test_changed_config_refuses_to_resume(tmp_path, capsys):
    run(small(tmp_path / "run", "iterations=1"), progress=False)
    code = main(["run", "quickstart", *SMALL, "iterations=1", f"output_dir={tmp_path / 'run'}", "train.beta=0.5",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "train.beta: 0.1 -> 0.5" in err


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


def _launch(out: Path, label_log: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SELFALIGN_TEST_LABEL_LOG": str(label_log),
           "SELFALIGN_TEST_JUDGE_DELAY": str(delay), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "selfalign", "run", "quickstart", *SMALL, "judge.function=tests.judge_fns:slow_counting_gold",
           f"output_dir={out}", "--no-progress"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    start = time.time()
    while not condition():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - start < timeout
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def labels_paid(log: Path) -> int:
    return sum(int(x) for x in log.read_text().split()) if log.exists() else 0


def test_sigkill_in_each_stage_then_resume_matches_uninterrupted(tmp_path):
    ref_log = tmp_path / "ref_labels.log"
    ref = _launch(tmp_path / "ref", ref_log, 0.0)
    assert ref.wait() == 0, ref.stderr.read().decode()[-2000:]
    expected = (tmp_path / "ref" / "metrics.jsonl").read_text()

    out, log = tmp_path / "run", tmp_path / "labels.log"
    it0 = out / "iter_000"
    # 1. During generation: the slice is written, the responses are not.
    proc = _launch(out, log, 0.5)
    _kill_when(proc, lambda: (it0 / "prompts.jsonl").exists())
    assert not (it0 / "generations.jsonl").exists()
    # 2. During judging: some chunks are journaled (paid), the rest not.
    proc = _launch(out, log, 0.5)
    _kill_when(proc, lambda: (it0 / "judge_journal.jsonl").exists() and (it0 / "judge_journal.jsonl").read_text().count("\n") >= 2)
    assert not (it0 / "generations.jsonl").exists()
    # 3. During training: a mid-update checkpoint exists, the policy does not.
    proc = _launch(out, log, 0.0)
    _kill_when(proc, lambda: (it0 / "train_state" / "update_state.pt").exists())
    assert not (it0 / "policy").exists()
    # Resume to the end.
    proc = _launch(out, log, 0.0)
    assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    assert without_timings((out / "metrics.jsonl").read_text()) == without_timings(expected)
    assert labels_paid(log) == labels_paid(ref_log) == 144


def test_pairwise_ranker_judge_in_the_loop(tmp_path):
    history = run(small(tmp_path / "run", "iterations=1", "judge.kind=pairwise", "generation.num_samples=4",
                        "judge.function=tests.judge_fns:gold_pairwise"), progress=False)
    assert history[0]["labels"] == 24 * 6  # C(4, 2) = 6 comparisons per prompt, not 4 responses
    rows = [json.loads(line) for line in (tmp_path / "run" / "iter_000" / "generations.jsonl").read_text().splitlines()]
    assert all(0.0 <= s <= 1.0 for r in rows for s in r["scores"])
