"""The LLM judge against a real OpenAI-compatible server: vLLM's (`python -m vllm.entrypoints.openai.api_server`).

One server per module (start: 40-90 s on 2 cores) serves a tiny random-init Llama built here, with
an API key the judge reads from the environment. A random model answers garbage; vLLM's structured
outputs (extra_body {"structured_outputs": {"choice": [...]} or {"regex": ...}}) make it answer a
parseable verdict, or a fixed unparseable word for the garbage path. The last test kills the server
in the middle of a judge call. Run with `pytest -m vllm` where vllm is installed (CI: .venv-vllm).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from selfalign.judges import JudgeError
from selfalign.judges.llm import LLMJudge, LLMJudgeConfig
from selfalign.judges.pairwise import PairwiseJudge
from tests.conftest import ROOT, kill_when, subprocess_env

pytestmark = pytest.mark.vllm

KEY_ENV, SECRET = "SELFALIGN_TEST_JUDGE_KEY", "sk-test-5ecret-never-on-disk"
SCORE = {"structured_outputs": {"regex": "(10|[1-9])"}}
CHOICE = {"structured_outputs": {"choice": ["A", "B"]}}
GARBAGE = {"structured_outputs": {"choice": ["maybe"]}}
WORDS = ["A", "B", "maybe", *[str(i) for i in range(11)], *[f"w{i}" for i in range(48)]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A vLLM OpenAI-compatible server on a tiny Llama (2 heads of 32 dims: sizes the CPU kernels take)."""
    pytest.importorskip("vllm")
    from selfalign.tasks.tiny import build_model, build_tokenizer, save_tiny

    root = tmp_path_factory.mktemp("judge_server")
    tok = build_tokenizer(WORDS)
    save_tiny(root / "model", build_model(len(tok), hidden_size=64, num_heads=2, num_kv_heads=2, seed=0), tok)
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(root / "model"),
         "--served-model-name", "judge", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "512", "--seed", "0", "--api-key", SECRET],
        env={**subprocess_env(), "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # the engine runs in a child process: the whole group is stopped at the end
    url = f"http://127.0.0.1:{port}"
    start = time.time()
    while True:
        assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
        assert time.time() - start < 400, "the vLLM server did not start in 400 s"
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    yield {"base_url": f"{url}/v1", "url": url, "proc": proc, "log": root / "server.log"}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def config(server, **overrides) -> LLMJudgeConfig:
    base = dict(base_url=server["base_url"], model="judge", api_key_env=KEY_ENV, max_tokens=4, concurrency=4,
                timeout=30.0, max_retries=1)
    return LLMJudgeConfig(**{**base, **overrides})


def journal_keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines()] if path.exists() else []


def served(server) -> float:
    """Requests the server finished, from its Prometheus counters (every finish reason)."""
    text = urllib.request.urlopen(f"{server['url']}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total{"))


PROMPTS = ["sort : 3 1 2", [{"role": "user", "content": "sort : 9 4"}], "sort : 7 7 1"]
CANDIDATES = [["1 2 3", "3 1 2", "2 1 3"], ["4 9", "9 4", "4 4 9"], ["1 7 7", "7 1 7", "7 7 1"]]


def test_pairwise_verdicts_rank_candidates_and_every_answer_is_journaled_once(server, tmp_path):
    """Scores are mean win probabilities: for K = 3 each prompt's scores sum to C(3,2) / (3 - 1) = 1.5."""
    journal = tmp_path / "judge_answers.jsonl"
    llm = LLMJudge(config(server, mode="pairwise", extra_body=CHOICE), journal=journal)
    judge = PairwiseJudge(llm.compare)
    scores = judge.score(PROMPTS, CANDIDATES)
    assert all(s in (0.0, 0.5, 1.0) for row in scores for s in row)
    assert [sum(row) for row in scores] == [1.5, 1.5, 1.5]
    assert judge.labels == llm.requests == 9 and len(set(journal_keys(journal))) == len(journal_keys(journal)) == 9
    # A resumed run reads every answer back: the same scores, no request.
    again = LLMJudge(config(server, mode="pairwise", extra_body=CHOICE), journal=journal)
    assert PairwiseJudge(again.compare).score(PROMPTS, CANDIDATES) == scores and again.requests == 0
    # Both orders: the A-vs-B requests are the journaled ones, only the 9 swapped ones are new.
    both = LLMJudge(config(server, mode="pairwise", extra_body=CHOICE, both_orders=True), journal=journal)
    PairwiseJudge(both.compare).score(PROMPTS, CANDIDATES)
    assert both.requests == 9 and len(journal_keys(journal)) == 18


def test_pointwise_scores_from_a_constrained_answer(server, tmp_path):
    llm = LLMJudge(config(server, extra_body=SCORE, system="You are a strict grader."), journal=tmp_path / "j.jsonl")
    scores = llm.score(PROMPTS, CANDIDATES)
    assert [len(row) for row in scores] == [3, 3, 3]
    assert all(s == int(s) and 1 <= s <= 10 for row in scores for s in row)
    assert llm.labels == 9 and llm.requests == len(journal_keys(tmp_path / "j.jsonl")) <= 9
    rows = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert all(r["usage"]["completion_tokens"] >= 1 for r in rows)  # what each answer cost, kept beside it


def test_garbage_answers_are_retried_then_a_one_line_error_and_stay_journaled(server, tmp_path):
    journal = tmp_path / "j.jsonl"
    llm = LLMJudge(config(server, extra_body=GARBAGE, parse_retries=1), journal=journal)
    with pytest.raises(JudgeError, match=r"9 of 9 answers hold no valid score from 1 to 10 after 2 tries, e.g. ' ?maybe'"):
        llm.score(PROMPTS, CANDIDATES)
    assert llm.requests == 18 and len(journal_keys(journal)) == 18  # both tries were paid, both are kept
    again = LLMJudge(config(server, extra_body=GARBAGE, parse_retries=1), journal=journal)
    with pytest.raises(JudgeError, match="hold no valid score"):
        again.score(PROMPTS, CANDIDATES)
    assert again.requests == 0


def test_a_model_the_server_does_not_serve_is_named_with_what_it_serves(server, tmp_path):
    llm = LLMJudge(config(server, model="no-such-judge", extra_body=SCORE), journal=tmp_path / "j.jsonl")
    with pytest.raises(JudgeError, match=r"has no model 'no-such-judge' \(404: .*set judge.llm.model to one it "
                                         r"serves \(it serves: judge\)"):
        llm.score(PROMPTS[:1], CANDIDATES[:1])
    assert journal_keys(tmp_path / "j.jsonl") == []


def test_a_wrong_api_key_names_the_variable(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "not-the-key")
    with pytest.raises(JudgeError, match=rf"refused the API key \(401.*put the key in \${KEY_ENV}"):
        LLMJudge(config(server, extra_body=SCORE), journal=None).score(PROMPTS[:1], CANDIDATES[:1])


def test_the_loop_with_an_llm_judge_resumes_after_a_kill_without_paying_twice(server, tmp_path, builtin_task):
    """An online run judged by the server, SIGKILLed while judging, then resumed: every answer is in the
    journal once, the server answered no request twice (save the one in flight at the kill), and the
    API key is nowhere in the run directory."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "selfalign", "run", "quickstart", "iterations=1", "prompts_per_iteration=8",
            "generation.num_samples=2", "generation.max_new_tokens=6", "train.batch_size=8",
            "train.micro_batch_size=8", "eval.prompts=4", "eval.samples=1", "judge.kind=llm", "judge.chunk_size=4",
            f"judge.llm.base_url={server['base_url']}", "judge.llm.model=judge", f"judge.llm.api_key_env={KEY_ENV}",
            "judge.llm.concurrency=1", "judge.llm.extra_body={structured_outputs: {regex: '(10|[1-9])'}}",
            f"output_dir={out}", "--no-progress"]
    env = subprocess_env(**{KEY_ENV: SECRET})
    before = served(server)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_when(proc, lambda: len(journal_keys(out / "judge_answers.jsonl")) >= 5)
    paid_before_kill = len(journal_keys(out / "judge_answers.jsonl"))
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    keys = journal_keys(out / "judge_answers.jsonl")
    assert len(keys) == len(set(keys)) and paid_before_kill <= len(keys) <= 16  # 8 prompts x 2 samples
    assert served(server) - before <= len(keys) + 1  # at most the request in flight at the kill is paid twice
    gens = [json.loads(line) for line in (out / "iter_000" / "generations.jsonl").read_text().splitlines()]
    assert all(1 <= s <= 10 for g in gens for s in g["scores"])
    assert json.loads((out / "iter_000" / "labels.json").read_text())["judge"] == 16
    # What judging cost: the server's token counts of every paid answer, summed into the iteration's metrics.
    metrics = json.loads((out / "iter_000" / "metrics.json").read_text())
    lines = [json.loads(line) for line in (out / "judge_answers.jsonl").read_text().splitlines()]
    assert metrics["judge_tokens_total"] == sum(sum(r["usage"].values()) for r in lines) > 0
    assert "judge tokens" in done.stdout
    assert (out / "iter_000" / "policy" / "README.md").exists()
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == [] and KEY_ENV in (out / "config.yaml").read_text()  # the variable's name only


def test_a_server_killed_mid_call_is_a_clean_error_and_nothing_paid_is_asked_again(server, tmp_path):
    """Runs last: it stops the module's server while a judge call is in flight."""
    journal = tmp_path / "j.jsonl"
    prompts = [f"sort : {i} {i + 1}" for i in range(40)]
    candidates = [[f"{i + 1} {i}", f"{i} {i + 1}"] for i in range(40)]
    cfg = config(server, extra_body=SCORE, concurrency=2, max_retries=1, timeout=5.0)
    result: dict[str, BaseException] = {}

    def judge_all() -> None:
        try:
            LLMJudge(cfg, journal=journal).score(prompts, candidates)
        except BaseException as e:  # noqa: B036 - handed to the test thread
            result["error"] = e

    worker = threading.Thread(target=judge_all)
    worker.start()
    start = time.time()
    while len(journal_keys(journal)) < 6:
        assert worker.is_alive() and time.time() - start < 120
        time.sleep(0.01)
    os.killpg(server["proc"].pid, signal.SIGKILL)
    server["proc"].wait()
    worker.join(120)
    assert not worker.is_alive()
    error = result.get("error")
    assert isinstance(error, JudgeError), error
    assert "run the same command again to resume" in str(error) and len(str(error).splitlines()) == 1
    paid = journal_keys(journal)
    assert 6 <= len(paid) < 80 and len(set(paid)) == len(paid)
    # Every journaled answer is read back with the server gone: not one request.
    again = LLMJudge(cfg, journal=journal)
    answered = [(p, c) for p, cands in zip(prompts, candidates) for c in cands]
    keys = [again._key(again._messages(again_template(), prompt=p, response=c, score_min=1.0, score_max=10.0), 0)
            for p, c in answered]
    known = [(p, c) for (p, c), k in zip(answered, keys) if k in set(paid)]
    assert len(known) == len(paid)
    scores = again.score([p for p, _ in known], [[c] for _, c in known])
    assert again.requests == 0 and all(1 <= s[0] <= 10 for s in scores)


def again_template() -> str:
    from selfalign.judges.llm import POINTWISE_TEMPLATE

    return POINTWISE_TEMPLATE
