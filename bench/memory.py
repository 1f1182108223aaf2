"""selfalign's memory estimate against the measured peak of real training steps, on CPU (or one GPU).

    .venv/bin/python bench/memory.py            # CPU: writes bench/results/memory_cpu.md and .json
    python bench/memory.py --device cuda --shape qwen2-0.5b --out-prefix $OUT/memory_cuda   # a GPU

Each case runs in a fresh process: it builds a random-init Llama-shaped policy (and a reference,
or LoRA adapters whose reference is the base with the adapter disabled), trains two optimizer
steps of DPO on pairs whose prompt and responses have fixed lengths (so every row is as long as
the estimate assumes), and reports the peak: the growth of the process's maximum resident set
over its size before the models were built (CPU), or torch.cuda.max_memory_allocated (GPU). The
estimate is selfalign.estimate's training phase for the same settings (resident weights,
optimizer, reference, gradients, activations); generation is not run here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    # ~20M parameters: big enough that the weights dominate the interpreter's own growth.
    "cpu-20m": dict(model_type="llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False),
    "cpu-tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}

CASES = {
    "full fine-tune + reference": [],
    "full fine-tune, gradient checkpointing": ["train.gradient_checkpointing=true"],
    "LoRA r 16 (reference = adapter off)": ["train.lora.enabled=true", "train.lora.r=16"],
    # On a GPU only by default (bf16 matmuls are slow on CPUs): every weight in bf16, as TRL given a bf16 model.
    "full fine-tune, bf16 weights": ["train.dtype=bf16"],
}
CPU_CASES = list(CASES)[:3]

WORKER = r"""
import json, sys
import torch
spec = json.loads(sys.argv[1])
from transformers import AutoConfig, AutoModelForCausalLM
from selfalign.config import load_config
from selfalign.loop import RunConfig
from selfalign.iterates import policy_dtype, frozen_dtype
from selfalign.train import PreferenceExample, PreferenceTrainer
torch.manual_seed(0)
import dataclasses
cfg = load_config(RunConfig, None, spec["overrides"])
t = dataclasses.replace(cfg.train, loss=cfg.loss, alpha=cfg.alpha)
device = spec["device"]
fields = dict(spec["shape"])
config = AutoConfig.for_model(fields.pop("model_type"), **fields)
# Warm up torch's lazy state (autograd engine, thread pools) on a throwaway model first.
tiny = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)).to(device)
tiny(torch.ones(1, 4, dtype=torch.long, device=device)).logits.sum().backward()
del tiny
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
else:
    # Reset the peak resident set (VmHWM) to the current one, so an earlier peak (imports, the warm-up)
    # cannot hide part of the growth, as ru_maxrss's lifetime maximum can.
    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
policy = AutoModelForCausalLM.from_config(config, dtype=policy_dtype(t)).to(device)
reference = None
if not t.lora.enabled:
    reference = AutoModelForCausalLM.from_config(config, dtype=frozen_dtype(t))
    reference.load_state_dict(policy.state_dict())
else:
    policy = policy.to(frozen_dtype(t))
trainer = PreferenceTrainer(policy, t, pad_token_id=0, reference=reference)
p, r = cfg.max_prompt_tokens, cfg.generation.max_new_tokens
g = torch.Generator().manual_seed(0)
ids = lambda n: torch.randint(1, config.vocab_size, (n,), generator=g).tolist()
examples = [PreferenceExample(ids(p), ids(r), ids(r)) for _ in range(2 * t.batch_size)]
trainer.update(examples, progress=False)
if device == "cuda":
    peak = torch.cuda.max_memory_allocated() - before
else:
    peak = status("VmHWM") - before
print(json.dumps({"peak": peak}))
"""


def overrides(extra: list[str], device: str) -> list[str]:
    """One micro-batch per optimizer step (4 pairs: 8 rows of 32 + 96 tokens), AdamW, method iterative DPO."""
    return ["method=iterative_dpo", "max_prompt_tokens=32", "generation.max_new_tokens=96",
            "train.micro_batch_size=4", "train.batch_size=4", "train.learning_rate=1e-5",
            f"train.mixed_precision={'bf16' if device == 'cuda' else 'no'}", *extra]


def estimated(shape: dict, extra: list[str], device: str) -> tuple[float, dict[str, float]]:
    """The estimate's training-phase peak (bytes) and its components, for the same settings."""
    from selfalign.config import load_config
    from selfalign.estimate import estimate, model_shape
    from selfalign.loop import RunConfig

    cfg = load_config(RunConfig, None, overrides(extra, device))
    est = estimate(cfg, model_shape("bench", shape), None, "none", 1, device)
    return est.phases["training"], est.components


def measured(shape: dict, extra: list[str], device: str) -> float:
    """Peak bytes of two optimizer steps in a fresh process (module doc)."""
    spec = json.dumps({"shape": shape, "overrides": overrides(extra, device), "device": device})
    out = subprocess.run([sys.executable, "-c", WORKER, spec], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--out-prefix", default=None, help="default bench/results/memory_<device>")
    parser.add_argument("--cases", type=int, default=None,
                        help="run the first N cases only (default: 3 on CPU, all 4 on a GPU)")
    args = parser.parse_args()
    shape_name = args.shape or ("cpu-20m" if args.device == "cpu" else "qwen2-0.5b")
    shape = SHAPES[shape_name]
    prefix = Path(args.out_prefix or ROOT / "bench" / "results" / f"memory_{args.device}")
    rows = []
    chosen = list(CASES)[: args.cases or (len(CPU_CASES) if args.device == "cpu" else len(CASES))]
    for name in chosen:
        extra = CASES[name]
        est, parts = estimated(shape, extra, args.device)
        peak = measured(shape, extra, args.device)
        rows.append({"case": name, "estimate_mib": est / 2**20, "measured_mib": peak / 2**20,
                     "ratio": est / peak, "components_mib": {k: v / 2**20 for k, v in parts.items()}})
        print(f"{name:<42} estimate {est / 2**20:8.1f} MiB  measured {peak / 2**20:8.1f} MiB  "
              f"estimate/measured {est / peak:.2f}", flush=True)
    lines = [f"# Memory estimate vs measured peak ({args.device}, shape {shape_name})", "",
             "`python bench/memory.py" + (f" --device {args.device}" if args.device != "cpu" else "") + "`: two "
             "DPO optimizer steps, 4 pairs of 32 + 96 tokens per step, AdamW, fp32 on CPU (bf16 weights/autocast on "
             "a GPU). Measured: growth of the peak resident set (CPU) or max_memory_allocated (GPU) from before the "
             "models were built. Estimate: `selfalign.estimate`, training phase.", "",
             "| case | estimate (MiB) | measured (MiB) | estimate / measured |", "|---|---:|---:|---:|"]
    lines += [f"| {r['case']} | {r['estimate_mib']:.1f} | {r['measured_mib']:.1f} | {r['ratio']:.2f} |" for r in rows]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.md").write_text("\n".join(lines) + "\n")
    Path(f"{prefix}.json").write_text(json.dumps({"shape": shape_name, "shape_config": shape, "rows": rows},
                                                 indent=1))
    print(f"wrote {prefix}.md and {prefix}.json")


if __name__ == "__main__":
    main()
