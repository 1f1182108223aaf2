"""A kill after every durable write, in every stage, resumes to the same files as an uninterrupted run.

SELFALIGN_KILL_AFTER_WRITE=N makes the process SIGKILL itself right after its Nth durable write
(selfalign.faults); with SELFALIGN_KILL_BEFORE_RENAME it dies with write N's temporary complete
but not yet renamed. Each run is a forked child of the test process (torch and transformers are
already imported, so a run costs its own work only); the resume is a fresh forked child.
Compared: every file of the run directory, byte for byte. Nothing is excluded: no file the
online loop or `selfalign train` writes holds a timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import traceback
from pathlib import Path

import pytest

from selfalign.cli import main

TINY = [
    "iterations=2", "prompts_per_iteration=8", "generation.num_samples=2", "generation.max_new_tokens=6",
    "generation.batch_size=8", "train.batch_size=4", "train.micro_batch_size=4", "train.learning_rate=2e-4",
    "train.checkpoint_every=1", "generate_every=1", "eval.prompts=4", "eval.samples=1", "judge.chunk_size=4",
]


def forked(argv: list[str], env: dict[str, str] | None = None, count_to: Path | None = None) -> int:
    """Run selfalign.cli.main(argv) in a forked child; its exit code, or -signal if it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 70
        try:
            os.environ.update(env or {})
            code = main([*argv, "--no-progress"])
            if count_to is not None:
                from selfalign import faults

                count_to.write_text(str(faults.writes_so_far()))
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def sweep(tmp_path: Path, argv_for, points: list[int] | None = None, before_rename: bool = False,
          finished_code: int = 0) -> tuple[int, int]:
    """Kill after write N for each N (all of them by default), resume, compare with the uninterrupted run.

    Every run uses the same directory (config.yaml records it), removed in between. A kill after
    the last write leaves a finished run, which the re-run meets with `finished_code`. Returns
    (writes of the uninterrupted run, runs killed)."""
    out, count = tmp_path / "run", tmp_path / "count"
    assert forked(argv_for(out), count_to=count) == 0
    expected, writes = snapshot(out), int(count.read_text())
    assert writes > 5 and "config.yaml" in expected and not any(k.endswith(".tmp") or k == "run.lock" for k in expected)
    killed = 0
    for n in points or range(1, writes + 1):
        shutil.rmtree(out)
        env = {"SELFALIGN_KILL_AFTER_WRITE": str(n), **({"SELFALIGN_KILL_BEFORE_RENAME": "1"} if before_rename else {})}
        code = forked(argv_for(out), env)
        assert code == -signal.SIGKILL, f"write {n}: the run ended with {code} instead of being killed"
        killed += 1
        assert (out / "run.lock").exists()  # the killed owner's lock: stale, taken over by the resume
        if before_rename:
            assert any(out.rglob("*.tmp")), f"write {n}: no temporary left behind"
        assert forked(argv_for(out)) == (0 if n < writes else finished_code), f"resume after write {n} failed"
        got = snapshot(out)
        diff = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        assert not diff, f"kill after write {n}: files differ from the uninterrupted run: {diff}"
    return writes, killed


@pytest.fixture
def task(builtin_task):
    return builtin_task


def loop_argv(out: Path) -> list[str]:
    return ["run", "quickstart", *TINY, f"output_dir={out}"]


@pytest.mark.slow
def test_kill_after_every_write_of_the_online_loop_resumes_to_identical_files(tmp_path, task):
    # Two iterations of two generation rounds each, a checkpoint after every optimizer step.
    writes, killed = sweep(tmp_path, loop_argv)
    assert killed == writes
    assert (tmp_path / "run" / "iter_001" / "round_001" / "pairs.jsonl").exists()


@pytest.mark.slow
def test_kill_with_a_temporary_half_renamed_resumes_to_identical_files(tmp_path, task):
    # Every third write (the sweep above covers every write after its rename).
    sweep(tmp_path, loop_argv, points=list(range(1, 40, 3)), before_rename=True)


@pytest.fixture(scope="module")
def sorting(tmp_path_factory):
    from selfalign.tasks.sorting import build_task

    return build_task(tmp_path_factory.mktemp("sorting"), n_rows=40)


def test_kill_after_every_write_of_selfalign_train_resumes_to_identical_files(tmp_path, sorting):
    model_dir, data_path = sorting
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model_dir}\ndata:\n  path: {data_path}\n  eval_fraction: 0.2\n")

    def argv(out: Path) -> list[str]:
        return ["train", str(recipe), f"output_dir={out}", "train.batch_size=8", "train.micro_batch_size=8",
                "train.checkpoint_every=1"]

    # A finished `selfalign train` run is not trained again: the re-run after the last write exits 2.
    writes, killed = sweep(tmp_path, argv, finished_code=2)
    assert killed == writes and json.loads((tmp_path / "run" / "summary.json").read_text())["train_pairs"] == 32
