"""The README's table: peak memory per GPU by `selfalign estimate`, model size x method x hardware.

    .venv/bin/python bench/memory_table.py     # prints the table, writes bench/results/memory_table.md

Each cell is the estimate of a bundled paper recipe (selm_llama3_8b: SELM, full fine-tune, an 8B reward
model; sail_llama3_8b: SAIL with LoRA r 64) with `model=` swapped, from the configs in
selfalign.estimate.KNOWN (no weights are loaded). A cell fits an 80 GB GPU when it is at most 90% of
79.6 GiB (the rest for the CUDA context and allocator).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = [("Qwen1.5-0.5B", "Qwen/Qwen1.5-0.5B-Chat"), ("Phi-3-mini 3.8B", "microsoft/Phi-3-mini-4k-instruct"),
          ("Llama-3 8B", "meta-llama/Meta-Llama-3-8B-Instruct")]
METHODS = [("SELM / iterative DPO, full fine-tune + reference + 8B RM", "selm_llama3_8b", []),
           ("SAIL-PP, LoRA r 64 (no RM call)", "sail_llama3_8b", []),
           ("SAIL-PR, LoRA r 64 + 8B RM", "sail_llama3_8b", ["method=sail_pr"])]
HARDWARE = [("1 GPU", "none", 1), ("8 GPUs DDP", "ddp", 8), ("8 GPUs ZeRO-2", "zero2", 8),
            ("8 GPUs ZeRO-3", "zero3", 8), ("8 GPUs FSDP2", "fsdp2", 8)]
LIMIT_GIB = 0.9 * 79.6


def main() -> None:
    from selfalign.cli import recipe_path
    from selfalign.config import load_config
    from selfalign.estimate import GIB, estimate_run
    from selfalign.loop import RunConfig

    head = "| model | method | " + " | ".join(h for h, _, _ in HARDWARE) + " |"
    lines = [head, "|---|---|" + "---:|" * len(HARDWARE)]
    for label, name in MODELS:
        for method, recipe, extra in METHODS:
            cfg = load_config(RunConfig, recipe_path(recipe), [f"model={name}", *extra])
            cells = []
            for _, sharding, n in HARDWARE:
                peak = estimate_run(cfg, sharding, n, "cuda")[0].peak / GIB
                cells.append(f"{peak:.1f}" if peak <= LIMIT_GIB else f"**{peak:.0f}** ✗")
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results" / "memory_table.md"
    out.write_text("# Peak memory per GPU (GiB) by `selfalign estimate`\n\n" + __doc__.split("\n\n", 2)[2] + "\n"
                   + "✗: over 90% of an 80 GB GPU. Generation: 8 prompts x K per call (SELM) or 32 x 2 (SAIL), "
                   "512 + 512 tokens.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
