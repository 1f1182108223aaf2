"""Preference (DPO) training throughput and memory: selfalign's PreferenceTrainer vs TRL's DPOTrainer.

What is measured
----------------
Each configuration trains one epoch of sigmoid DPO (beta 0.1) on the same list of random,
variable-length preference pairs, from the same random-init Qwen2-shaped policy, against a
separate frozen reference model with the same weights:

    trl-default      TRL DPOTrainer with its defaults (gradient checkpointing on, reference
                     forward on every micro-batch), fp32 on CPU (bf16=False).
    trl-precompute   the same with precompute_ref_log_probs=True.
    selfalign        selfalign.train.PreferenceTrainer with default settings (reference
                     log-probs computed once at the start of update(), no checkpointing).
    selfalign-gc     the same with gradient_checkpointing=True.

Both sides get the same hyperparameters: AdamW at the same learning rate, betas (0.9, 0.999),
eps 1e-8, no weight decay, no warmup, linear decay, gradient clipping at 1.0, the same global
batch and micro-batch (gradient accumulation = batch / micro-batch). TRL gets the pairs as
text from a word-level tokenizer whose token "w<i>" has id i, so it sees exactly the token
ids selfalign gets; every response already ends in the EOS token (so TRL adds none) and the
worker asserts that TRL's tokenized prompt/chosen/rejected ids equal selfalign's.

Time is the wall time of trainer construction plus training: DPOTrainer(...) + .train()
(TRL tokenizes the dataset and, with precompute_ref_log_probs, runs the reference pass in its
constructor) and PreferenceTrainer(...) + .update() (which computes the reference log-probs
first). Model construction is excluded. Tokens are the real (non-padding) tokens of the
chosen and rejected sequences, prompt included, over the epoch: the same number for every
configuration; tokens/s = tokens / time. The table also shows the time of the training call
alone and TRL's dataset preparation time.

Memory: each run is a fresh subprocess (this script re-invoked with --worker NAME, reporting
one JSON line). On CPU the peak RSS is VmHWM, reset (/proc/self/clear_refs) after both models
are built, so it is the peak during training; "overhead" is that peak minus the RSS after model
construction. On CUDA it is torch.cuda.max_memory_allocated, and the overhead is measured from
memory_allocated after the models were moved to the GPU. Repeats are interleaved (a, b, c, d,
a, b, ...) and the table reports medians.

On CUDA the table also reports model FLOP utilisation, 6 * n_params * tokens / time / peak_flops,
where n_params counts the parameters that take part in matmuls (the input embedding is left out
unless it is tied to the LM head). This is the usual training-FLOP estimate: the reference
forward (2 * n_params per token) and attention FLOPs are not counted as useful work.

CPU defaults: model cpu-small (Qwen2-shaped, vocab 32768, hidden 256, 4 layers, 4 heads, 2 KV
heads, intermediate 1024), 32 pairs with prompts of 16..128 and responses of 8..128 tokens
(--seq-len 256), global batch 8, micro-batch 2, so 4 optimizer steps; 3 repeats, 2 threads. The
whole run takes about 6-7 minutes on 2 cores; with --seq-len 512 one TRL run alone takes ~160 s.

Running
-------
    python bench/train_step.py                 # CPU benchmark, writes bench/results/train_step_cpu.{json,md}
    python bench/train_step.py --quick         # smoke test, well under a minute
    python bench/train_step.py --profile       # one selfalign update with a per-phase time breakdown
    python bench/train_step.py --device cuda --dtype bf16 --model-size qwen2-0.5b --seq-len 1024
                                               # GPU (bf16 autocast, fp32 master weights); reports MFU
    ... --weights bf16                         # both libraries' models loaded in bf16 (selfalign's train.dtype)

The models' dtypes are those selfalign's `train.dtype` (--weights) loads, given to both libraries:
auto is an fp32 policy and a bf16 reference on a GPU, fp32 on CPU. The GPU run of 2026-11-27 (fp32
models on both sides) had selfalign at 2.11x TRL's peak memory; TRL's default turns gradient
checkpointing on and selfalign's does not, so compare selfalign-gc with trl-default for memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "
MIB = 2**20

PAD_ID, EOS_ID, FIRST_WORD_ID = 0, 3, 10  # selfalign.tasks.tiny: <pad> = 0, <eos> = 3

# Qwen2-shaped model sizes. tie: the LM head shares the input embedding (as real Qwen2-0.5B does).
MODEL_SIZES: dict[str, dict[str, Any]] = {
    "cpu-small": dict(vocab_size=32768, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                      intermediate_size=1024, tie=False),
    "cpu-tiny": dict(vocab_size=32768, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=512, tie=False),
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                       intermediate_size=4864, tie=True),
}

# name -> (library, options)
CONFIGS: dict[str, tuple[str, dict[str, bool]]] = {
    "trl-default": ("trl", {"precompute": False}),
    "trl-precompute": ("trl", {"precompute": True}),
    "selfalign": ("selfalign", {"gradient_checkpointing": False}),
    "selfalign-gc": ("selfalign", {"gradient_checkpointing": True}),
}


# --------------------------------------------------------------------------- data and models
def make_pairs(n: int, seq_len: int, vocab_size: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """n (prompt, chosen, rejected) id lists; prompt+response never exceeds seq_len.

    Prompt lengths are uniform in [seq_len/16, seq_len/2], response lengths (EOS included) in
    [seq_len/32, seq_len/2]; ids are uniform in [FIRST_WORD_ID, vocab_size).
    """
    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(FIRST_WORD_ID, vocab_size) for _ in range(rng.randint(lo, hi))]

    half = seq_len // 2
    return [
        (ids(seq_len // 16, half), ids(seq_len // 32 - 1, half - 1) + [EOS_ID], ids(seq_len // 32 - 1, half - 1) + [EOS_ID])
        for _ in range(n)
    ]


def count_tokens(pairs: list[tuple[list[int], list[int], list[int]]]) -> int:
    """Real tokens of the chosen and rejected sequences (prompt + response each)."""
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in pairs)


def build_policy(size: str, seq_len: int, seed: int):
    """A random-init Qwen2-shaped causal LM in float32; the same seed gives the same weights."""
    spec = dict(MODEL_SIZES[size])
    tie = spec.pop("tie")
    if not tie:
        from selfalign.tasks.tiny import build_model

        return build_model(arch="qwen2", max_positions=max(512, seq_len), seed=seed, **spec)
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=spec["vocab_size"], hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"],
        intermediate_size=spec["intermediate_size"], max_position_embeddings=max(512, seq_len),
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        pad_token_id=PAD_ID, bos_token_id=2, eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all of them but an input embedding not tied to the LM head."""
    total = sum(p.numel() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if embed is head else total - embed.numel()


def word_tokenizer(vocab_size: int):
    """Word-level tokenizer in which token 'w<i>' has id i (ids below FIRST_WORD_ID are the specials)."""
    from selfalign.tasks.tiny import SPECIAL_TOKENS, build_tokenizer

    return build_tokenizer([f"w{i}" for i in range(len(SPECIAL_TOKENS), vocab_size)])


# --------------------------------------------------------------------------- memory
class MemoryMeter:
    """Peak memory of this process from `start()` on: RSS on CPU, allocated tensor memory on CUDA."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.base_mib = 0.0

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mib = torch.cuda.memory_allocated() / MIB
            return
        self.base_mib = self._status_kib("VmRSS") / 1024
        try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak RSS) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # VmHWM then also covers model construction

    def peak_mib(self) -> float:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MIB
        try:
            return self._status_kib("VmHWM") / 1024
        except (OSError, KeyError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    @staticmethod
    def _status_kib(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
        raise KeyError(key)


# --------------------------------------------------------------------------- one training run
def selfalign_inputs(pairs, vocab_size: int) -> list:
    """The pairs as PreferenceExamples (vocab_size is unused; the signature matches trl_inputs)."""
    from selfalign.train import PreferenceExample

    return [PreferenceExample(list(p), list(c), list(r)) for p, c, r in pairs]


def train_selfalign(args, examples, policy, reference, gradient_checkpointing: bool) -> dict[str, Any]:
    from selfalign.train import PreferenceTrainer, TrainConfig

    config = TrainConfig(
        loss="dpo", beta=args.beta, learning_rate=args.lr, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, epochs=1, warmup_ratio=0.0, lr_scheduler="linear",
        mixed_precision="bf16" if args.dtype == "bf16" else "no", gradient_checkpointing=gradient_checkpointing,
        seed=args.seed, dtype=args.weights,
    )
    sync = device_sync(args.device)
    sync()
    t0 = time.perf_counter()
    trainer = PreferenceTrainer(policy, config, pad_token_id=PAD_ID, reference=reference)
    t1 = time.perf_counter()
    result = trainer.update(examples, progress=False)
    sync()
    t2 = time.perf_counter()
    return {
        "time_s": t2 - t0, "train_call_s": t2 - t1, "prep_s": 0.0,
        "losses": [s["loss"] for s in result.steps],
        "tokens_seen": int(sum(s["num_tokens"] for s in result.steps)),
    }


def trl_inputs(pairs, vocab_size: int) -> tuple[Any, Any, list]:
    """(tokenizer, text dataset, pairs): the pairs as text whose tokens are exactly the pairs' ids."""
    from datasets import Dataset
    from trl import DPOTrainer  # noqa: F401  (imported here, before the memory baseline)

    tokenizer = word_tokenizer(vocab_size)
    words = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))

    def text(ids: list[int]) -> str:
        return " ".join(words[i] for i in ids)

    dataset = Dataset.from_dict({
        "prompt": [text(p) for p, _, _ in pairs],
        "chosen": [" " + text(c) for _, c, _ in pairs],  # each response ends in <eos>, so TRL adds none
        "rejected": [" " + text(r) for _, _, r in pairs],
    })
    return tokenizer, dataset, pairs


def train_trl(args, inputs, policy, reference, precompute: bool) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    tokenizer, dataset, pairs = inputs
    # Time TRL's dataset preparation (tokenization) inside the constructor, to show it separately.
    prep = {"s": 0.0}
    original_prepare = DPOTrainer._prepare_dataset

    def timed_prepare(self, *a, **k):
        t = time.perf_counter()
        try:
            return original_prepare(self, *a, **k)
        finally:
            prep["s"] += time.perf_counter() - t

    sync = device_sync(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as out_dir:
        config = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.batch_size // args.micro_batch_size, num_train_epochs=1,
            learning_rate=args.lr, beta=args.beta, warmup_steps=0, lr_scheduler_type="linear", max_length=None,
            precompute_ref_log_probs=precompute, bf16=args.dtype == "bf16", fp16=False,
            use_cpu=args.device == "cpu", report_to="none", save_strategy="no", logging_strategy="steps",
            logging_steps=1, disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
        )
        DPOTrainer._prepare_dataset = timed_prepare
        sync()
        t0 = time.perf_counter()
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                             processing_class=tokenizer)
        t1 = time.perf_counter()
        trainer.train()
        sync()
        t2 = time.perf_counter()
        DPOTrainer._prepare_dataset = original_prepare

    seen = trainer.train_dataset
    same_ids = (
        list(seen["prompt_ids"]) == [p for p, _, _ in pairs]
        and list(seen["chosen_ids"]) == [c for _, c, _ in pairs]
        and list(seen["rejected_ids"]) == [r for _, _, r in pairs]
    )
    if not same_ids:
        raise RuntimeError("TRL tokenized the pairs into different token ids than selfalign gets")
    return {
        "time_s": t2 - t0, "train_call_s": t2 - t1, "prep_s": prep["s"],
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "tokens_seen": int(trainer._total_train_tokens),
    }


def device_sync(device: str) -> Callable[[], None]:
    if device == "cuda":
        import torch

        return torch.cuda.synchronize
    return lambda: None


def run_worker(args) -> dict[str, Any]:
    """Build data and models, reset the memory peak, train one configuration; returns its measurements."""
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    library, options = CONFIGS[args.worker]
    vocab_size = MODEL_SIZES[args.model_size]["vocab_size"]
    pairs = make_pairs(args.pairs, args.seq_len, vocab_size, args.seed)
    make_inputs, train = (trl_inputs, train_trl) if library == "trl" else (selfalign_inputs, train_selfalign)
    inputs = make_inputs(pairs, vocab_size)

    # Both libraries get the models selfalign's train.dtype would load (selfalign.iterates): like with like.
    from selfalign.iterates import frozen_dtype, policy_dtype
    from selfalign.train import TrainConfig

    weights = TrainConfig(dtype=args.weights)
    policy = build_policy(args.model_size, args.seq_len, args.seed).to(args.device, policy_dtype(weights))
    reference = build_policy(args.model_size, args.seq_len, args.seed).to(args.device, frozen_dtype(weights))
    if args.device == "cuda":
        warm_up_cuda(policy)
    meter = MemoryMeter(args.device)
    meter.start()
    result = train(args, inputs, policy, reference, **options)
    peak = meter.peak_mib()
    result.update(
        config=args.worker, tokens=count_tokens(pairs), base_mib=meter.base_mib, peak_mib=peak,
        overhead_mib=peak - meter.base_mib, matmul_params=matmul_params(policy),
    )
    return result


def warm_up_cuda(model) -> None:
    """One small forward/backward so CUDA context and cuBLAS set-up are not timed (grads are dropped)."""
    import torch

    ids = torch.randint(FIRST_WORD_ID, model.config.vocab_size, (2, 64), device="cuda")
    model(input_ids=ids).logits.float().mean().backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()


# --------------------------------------------------------------------------- the parent: repeats and table
def worker_command(args, name: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    for key in ("device", "dtype", "weights", "model_size", "seq_len", "pairs", "batch_size", "micro_batch_size",
                "lr", "beta", "seed", "threads"):
        cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return cmd


def run_one(args, name: str) -> dict[str, Any]:
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(worker_command(args, name), cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"worker {name} failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def summarize(args, runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    by_config: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_config[r["config"]].append(r)
    summary = {}
    for name, rs in by_config.items():
        med = {k: statistics.median(r[k] for r in rs) for k in
               ("time_s", "train_call_s", "prep_s", "peak_mib", "base_mib", "overhead_mib")}
        med["tokens"] = rs[0]["tokens"]
        med["tokens_per_s"] = statistics.median(r["tokens"] / r["time_s"] for r in rs)
        med["first_loss"] = rs[0]["losses"][0]
        med["final_loss"] = statistics.median(r["losses"][-1] for r in rs)
        med["steps"] = len(rs[0]["losses"])
        if args.device == "cuda":
            med["mfu"] = 6 * rs[0]["matmul_params"] * med["tokens_per_s"] / args.peak_flops
        summary[name] = med
    return summary


def ratios(summary: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    for ours in ("selfalign", "selfalign-gc"):
        for theirs in ("trl-default", "trl-precompute"):
            if ours in summary and theirs in summary:
                a, b = summary[ours], summary[theirs]
                rows.append({
                    "selfalign": ours, "trl": theirs,
                    "speed": a["tokens_per_s"] / b["tokens_per_s"],
                    "peak_memory": a["peak_mib"] / b["peak_mib"],
                    "overhead_memory": a["overhead_mib"] / b["overhead_mib"] if b["overhead_mib"] > 0 else float("nan"),
                })
    return rows


def render_table(args, summary, ratio_rows, n_params: int) -> str:
    mem = "GPU alloc" if args.device == "cuda" else "RSS"
    spec = MODEL_SIZES[args.model_size]
    lines = [
        f"Model {args.model_size} (hidden {spec['hidden_size']}, {spec['num_layers']} layers, vocab "
        f"{spec['vocab_size']}, {n_params / 1e6:.1f}M matmul params), {args.device} {args.dtype} (weights: {args.weights}); "
        f"{args.pairs} pairs, seq-len <= {args.seq_len}, batch {args.batch_size} / micro {args.micro_batch_size}, "
        f"{args.repeats} repeat(s), medians.",
        "",
        f"| config | tokens/s | time s | train call s | TRL data prep s | peak {mem} MiB | overhead MiB "
        f"| first loss | final loss |" + (" MFU |" if args.device == "cuda" else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.device == "cuda" else ""),
    ]
    for name, s in summary.items():
        row = (f"| {name} | {s['tokens_per_s']:.0f} | {s['time_s']:.2f} | {s['train_call_s']:.2f} | {s['prep_s']:.2f} "
               f"| {s['peak_mib']:.0f} | {s['overhead_mib']:.0f} | {s['first_loss']:.4f} | {s['final_loss']:.4f} |")
        if args.device == "cuda":
            row += f" {100 * s['mfu']:.1f}% |"
        lines.append(row)
    first = next(iter(summary.values()))
    lines += ["", f"Tokens per epoch (chosen + rejected, prompt included, no padding): {first['tokens']}; "
              f"{first['steps']} optimizer steps."]
    if ratio_rows:
        lines += ["", "| selfalign / TRL | speed (higher is better) | peak memory (lower is better) "
                  "| training overhead memory |", "|---|---:|---:|---:|"]
        for r in ratio_rows:
            lines.append(f"| {r['selfalign']} / {r['trl']} | {r['speed']:.2f}x | {r['peak_memory']:.2f}x "
                         f"| {r['overhead_memory']:.2f}x |")
    return "\n".join(lines)


def run_benchmark(args) -> None:
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    runs = []
    start = time.perf_counter()
    for rep in range(args.repeats):
        for name in names:
            r = run_one(args, name)
            r["repeat"] = rep
            runs.append(r)
            print(f"[{time.perf_counter() - start:6.0f}s] repeat {rep + 1}/{args.repeats} {name:15s} "
                  f"{r['time_s']:7.2f} s  {r['tokens'] / r['time_s']:8.0f} tok/s  peak {r['peak_mib']:7.0f} MiB  "
                  f"losses {' '.join(f'{x:.4f}' for x in r['losses'])}", flush=True)
    for r in runs:
        if r["tokens_seen"] != r["tokens"]:
            print(f"warning: {r['config']} reports {r['tokens_seen']} tokens trained, expected {r['tokens']}")
    summary = summarize(args, runs)
    ratio_rows = ratios(summary)
    table = render_table(args, summary, ratio_rows, runs[0]["matmul_params"])
    print("\n" + table)

    prefix = Path(args.out_prefix or ROOT / "bench" / "results" / f"train_step_{args.device}{'_quick' if args.quick else ''}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    record = {"settings": vars(args), "environment": environment(), "summary": summary, "ratios": ratio_rows,
              "runs": runs}
    prefix.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(f"# Preference training step: selfalign vs TRL DPOTrainer\n\n{table}\n")
    print(f"\nwrote {prefix.with_suffix('.json')} and {prefix.with_suffix('.md')}")


def environment() -> dict[str, Any]:
    import accelerate
    import torch
    import transformers
    import trl

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__, "accelerate": accelerate.__version__, "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# --------------------------------------------------------------------------- --profile
class PhaseTimer:
    """Exclusive wall time per named section; nested sections are subtracted from their parent."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list] = []  # [name, start, child time]

    def inside(self, name: str) -> bool:
        return any(entry[0] == name for entry in self.stack)

    def label(self, name: str) -> str:
        return f"reference: {name}" if self.inside("reference log-probs") else name

    def start(self, name: str) -> None:
        self.sync()
        self.stack.append([self.label(name), time.perf_counter(), 0.0])

    def stop(self) -> None:
        self.sync()
        name, t0, child = self.stack.pop()
        elapsed = time.perf_counter() - t0
        self.exclusive[name] += elapsed - child
        self.calls[name] += 1
        if self.stack:
            self.stack[-1][2] += elapsed

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        from torch.profiler import record_function

        self.start(name)
        try:
            with record_function(name):
                yield
        finally:
            self.stop()

    def wrap(self, owner: Any, attr: str, name: str, static: bool = False) -> None:
        original = getattr(owner, attr)

        def wrapper(*a, **k):
            with self.section(name):
                return original(*a, **k)

        setattr(owner, attr, staticmethod(wrapper) if static else wrapper)

    def time_module(self, module, name: str) -> None:
        module.register_forward_pre_hook(lambda *_: self.start(name))
        module.register_forward_hook(lambda *_: self.stop())


def run_profile(args) -> None:
    """One selfalign update with timers around each phase, then torch.profiler's top operators."""
    import torch
    from accelerate.optimizer import AcceleratedOptimizer
    from torch.profiler import ProfilerActivity, profile

    import selfalign.logprobs as logprobs
    import selfalign.scoring as scoring
    import selfalign.train as train
    from selfalign.train import PreferenceTrainer, TrainConfig

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    pairs = make_pairs(args.pairs, args.seq_len, MODEL_SIZES[args.model_size]["vocab_size"], args.seed)
    # Both libraries get the models selfalign's train.dtype would load (selfalign.iterates): like with like.
    from selfalign.iterates import frozen_dtype, policy_dtype

    weights = TrainConfig(dtype=args.weights)
    policy = build_policy(args.model_size, args.seq_len, args.seed).to(args.device, policy_dtype(weights))
    reference = build_policy(args.model_size, args.seq_len, args.seed).to(args.device, frozen_dtype(weights))
    if args.device == "cuda":
        warm_up_cuda(policy)
    config = TrainConfig(
        loss="dpo", beta=args.beta, learning_rate=args.lr, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, epochs=1, warmup_ratio=0.0, lr_scheduler="linear",
        mixed_precision="bf16" if args.dtype == "bf16" else "no", seed=args.seed,
        gradient_checkpointing=args.profile_gc,
    )
    trainer = PreferenceTrainer(policy, config, pad_token_id=PAD_ID, reference=reference)
    timer = PhaseTimer(device_sync(args.device))
    timer.wrap(trainer, "compute_reference_logps", "reference log-probs")
    timer.wrap(train, "fingerprint", "update fingerprint (sha256 of the examples)")
    timer.wrap(trainer, "_step", "step: loss, metrics, scheduler, zero_grad")
    padding: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # phase -> [real tokens, computed positions]
    original_collate = train.collate

    def counting_collate(*a, **k):
        with timer.section("collate (pad to batch)"):
            batch = original_collate(*a, **k)
        phase = "reference pass" if timer.inside("reference log-probs") else "policy micro-batches"
        padding[phase][0] += batch.num_tokens
        padding[phase][1] += batch.input_ids.numel()
        return batch

    train.collate = scoring.collate = counting_collate  # the policy's micro-batches and the reference pass
    timer.time_module(policy.get_decoder(), "decoder forward")
    timer.time_module(reference.get_decoder(), "decoder forward")
    timer.wrap(logprobs._ChunkedTokenLogprob, "forward", "LM head forward (chunked log-softmax)", static=True)
    timer.wrap(logprobs._ChunkedTokenLogprob, "backward", "LM head backward (recomputes logits)", static=True)
    timer.wrap(trainer.accelerator, "backward", "decoder backward" + (" (with recompute)" if args.profile_gc else ""))
    timer.wrap(trainer.accelerator, "clip_grad_norm_", "clip grad norm")
    timer.wrap(AcceleratedOptimizer, "step", "AdamW step")
    examples = selfalign_inputs(pairs, MODEL_SIZES[args.model_size]["vocab_size"])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])

    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        with timer.section("update() other (optimizer set-up, plan)"):
            result = trainer.update(examples, progress=False)
        total = time.perf_counter() - t0

    tokens = count_tokens(pairs)
    print(f"selfalign update: {len(result.steps)} steps, {tokens} tokens, {total:.2f} s "
          f"({tokens / total:.0f} tokens/s under the profiler), losses "
          + " ".join(f"{s['loss']:.4f}" for s in result.steps))
    print(f"\n{'phase (exclusive time)':58s} {'calls':>6s} {'seconds':>9s} {'share':>7s}")
    for name, secs in sorted(timer.exclusive.items(), key=lambda kv: -kv[1]):
        print(f"{name:58s} {timer.calls[name]:6d} {secs:9.2f} {100 * secs / total:6.1f}%")
    for phase, (real, computed) in padding.items():
        print(f"{phase}: {computed} positions through the decoder for {real} real tokens "
              f"({100 * (1 - real / computed):.0f}% padding)")
    sort_key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print("\nTop operators by self time (torch.profiler):")
    print(prof.key_averages().table(sort_by=sort_key, row_limit=15, max_name_column_width=40))


# --------------------------------------------------------------------------- entry point
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="fp32, or bf16 autocast with fp32 weights (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--weights", choices=["auto", "bf16", "fp32"], default="auto",
                   help="the weights' dtype as selfalign's train.dtype loads them, given to BOTH libraries: auto is "
                        "an fp32 policy and a bf16 reference on a GPU (fp32 on CPU); bf16 loads both in bf16")
    p.add_argument("--model-size", choices=list(MODEL_SIZES), default=None,
                   help="default: cpu-small on CPU (cpu-tiny with --quick), qwen2-0.5b on CUDA")
    p.add_argument("--seq-len", type=int, default=None,
                   help="max prompt + response tokens (default 256 on CPU, 1024 on CUDA)")
    p.add_argument("--pairs", type=int, default=None, help="preference pairs (default 32 on CPU, 256 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 8 on CPU, 32 on CUDA)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="default 2 on CPU, 4 on CUDA")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in each CPU worker")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; 1 with --quick)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    p.add_argument("--peak-flops", type=float, default=989e12, help="device peak FLOP/s for MFU (H100 bf16 dense)")
    p.add_argument("--out-prefix", default=None, help="results path without suffix "
                   "(default bench/results/train_step_<device>[_quick])")
    p.add_argument("--quick", action="store_true", help="small model, few pairs, 1 repeat: a smoke test")
    p.add_argument("--profile", action="store_true", help="profile one selfalign update instead of benchmarking")
    p.add_argument("--profile-gc", action="store_true", help="with --profile: turn on gradient checkpointing")
    p.add_argument("--worker", choices=list(CONFIGS), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    gpu = args.device == "cuda"
    quick = args.quick and not gpu
    defaults = {
        "dtype": "bf16" if gpu else "fp32",
        "model_size": "qwen2-0.5b" if gpu else ("cpu-tiny" if quick else "cpu-small"),
        "seq_len": 1024 if gpu else (128 if quick else 256),
        "pairs": (64 if args.quick else 256) if gpu else (16 if quick else 32),
        "batch_size": 32 if gpu else 8,
        "micro_batch_size": 4 if gpu else 2,
        "repeats": 1 if args.quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size % args.micro_batch_size or args.pairs % args.batch_size:
        p.error("--batch-size must be a multiple of --micro-batch-size and --pairs a multiple of --batch-size")
    if args.seq_len < 64:
        p.error("--seq-len must be at least 64")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print(RESULT_PREFIX + json.dumps(run_worker(args)), flush=True)
    elif args.profile:
        run_profile(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
