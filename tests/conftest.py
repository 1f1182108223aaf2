"""Shared fixtures and helpers: tiny random-init models, preference examples and trainers, all
built offline; child processes for the multi-process and kill-and-resume tests."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: the tests never reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # and `datasets` loads Hub names from its local cache only

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from selfalign.tasks.tiny import build_model
from selfalign.train import PreferenceExample, PreferenceTrainer, TrainConfig, build_schedule

VOCAB = 64
ROOT = Path(__file__).resolve().parents[1]

# adam_epsilon >> |grad| makes the first AdamW step lr/eps * grad: linear in the gradient,
# so comparing parameters after one step compares gradients.
LINEAR_STEP = dict(learning_rate=1e3, adam_epsilon=1e3, warmup_ratio=0.0, max_grad_norm=0.0, lr_scheduler="constant")


def make_model(seed: int = 0, arch: str = "qwen2"):  # no tokenizer saved: qwen2 is fine
    return build_model(VOCAB, arch=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=seed)


def make_examples(n: int, seed: int = 0, with_ref_sample: bool = False) -> list[PreferenceExample]:
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(6, VOCAB) for _ in range(rng.randint(lo, hi))]

    return [
        PreferenceExample(ids(2, 7), ids(1, 6), ids(1, 6), ids(1, 6) if with_ref_sample else None) for _ in range(n)
    ]


def make_trainer(config: TrainConfig, seed: int = 0, arch: str = "qwen2") -> PreferenceTrainer:
    """A trainer on a tiny model; its reference is a frozen copy of pi_0 (the adapter-less policy with LoRA)."""
    policy = make_model(seed, arch)
    reference = None if config.lora.enabled else copy.deepcopy(policy)
    return PreferenceTrainer(policy, config, pad_token_id=0, reference=reference)


def schedule_lrs(config: TrainConfig, total_steps: int) -> list[float]:
    """The learning rate of each of total_steps optimizer steps under config's schedule, read as the
    trainer reads it (get_last_lr() before the optimizer and scheduler step)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate)
    scheduler = build_schedule(optimizer, config, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def params(t: PreferenceTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.policy.named_parameters()}


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved policy directory."""
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test's child process: this checkout importable, one thread each."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as condition() holds (it must still be running then)."""
    start = time.time()
    while not condition():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - start < timeout
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def labels_paid(log: Path) -> int:
    """Labels the counting judge (tests/judge_fns.py) logged as paid for."""
    return sum(int(x) for x in log.read_text().split()) if log.exists() else 0


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def builtin_task(tmp_path_factory):
    """The built-in task (SFT of pi_0, ~35 s) built once per test session in a private cache;
    SELFALIGN_CACHE points there so the loop and subprocesses reuse it."""
    import os

    from selfalign.tasks.builtin import build_task

    cache = tmp_path_factory.mktemp("selfalign_cache")
    old = os.environ.get("SELFALIGN_CACHE")
    os.environ["SELFALIGN_CACHE"] = str(cache)
    yield build_task(progress=False)
    if old is None:
        os.environ.pop("SELFALIGN_CACHE", None)
    else:
        os.environ["SELFALIGN_CACHE"] = old


def without_timings(rows):
    """Metrics rows (dicts, or metrics.jsonl text) less their wall-clock 'time/...' entries, which differ
    from run to run: what a deterministic comparison of two runs compares."""
    import json

    if isinstance(rows, str):
        rows = [json.loads(line) for line in rows.splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
