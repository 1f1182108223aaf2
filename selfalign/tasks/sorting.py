"""The demo task: learn, from preference pairs alone, to prefer sorted lists.

Prompt "sort : 7 2 9 4", chosen "2 4 7 9", rejected another ordering of the same numbers.
The policy is a tiny random-init model, so any held-out preference it gets right after
training it learned from the pairs. Everything is built offline and saved the Hugging Face
way (save_pretrained), so training loads it through the ordinary from_pretrained path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .tiny import build_model, build_tokenizer, save_tiny

NUMBERS = [str(i) for i in range(20)]
WORDS = ["sort", ":", *NUMBERS]


def make_rows(n: int, length: int = 4, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        values = rng.sample(range(len(NUMBERS)), length)
        chosen = sorted(values)
        rejected = chosen[:]
        while rejected == chosen:
            rng.shuffle(rejected)
        rows.append({
            "prompt": "sort : " + " ".join(map(str, values)),
            "chosen": " ".join(map(str, chosen)),
            "rejected": " ".join(map(str, rejected)),
        })
    return rows


def build_task(directory: str | Path, n_rows: int = 384, seed: int = 0) -> tuple[Path, Path]:
    """Write model + tokenizer to directory/model and pairs to directory/pairs.jsonl (idempotent)."""
    directory = Path(directory)
    model_dir, data_path = directory / "model", directory / "pairs.jsonl"
    if not (model_dir / "config.json").exists():
        tokenizer = build_tokenizer(WORDS)
        model = build_model(len(tokenizer), hidden_size=64, num_layers=2, seed=seed,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
        tmp = directory / "model.tmp"
        save_tiny(tmp, model, tokenizer)
        tmp.rename(model_dir)
    if not data_path.exists():
        tmp = data_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n_rows, seed=seed)))
        tmp.rename(data_path)
    return model_dir, data_path
