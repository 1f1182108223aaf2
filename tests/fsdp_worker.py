"""Run by test_fsdp.py under `accelerate launch --config_file <shipped fsdp2.yaml>`: one update, sharded.

argv: out_path, micro_batch_size, checkpoint_every, stop_after_steps (0: run to the end).
Writes out_path (the trainable parameters, gathered), out_path.json (losses, process count,
sharding kind) and, when the update finished, out_path.policy/ (save_pretrained of the policy).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from selfalign.train import PreferenceTrainer, TrainConfig
from tests.conftest import make_examples, make_model


def main(out_path: str, micro_batch_size: int, checkpoint_every: int, stop_after: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    policy = make_model(0)
    config = TrainConfig(batch_size=8, micro_batch_size=micro_batch_size, epochs=2, learning_rate=1e-3,
                         warmup_ratio=0.0, checkpoint_every=checkpoint_every)
    trainer = PreferenceTrainer(policy, config, pad_token_id=0, reference=copy.deepcopy(policy))
    ckpt = Path(out_path + ".ckpt") if checkpoint_every else None
    result = trainer.update(make_examples(16), checkpoint_dir=ckpt, stop_after_steps=stop_after or None,
                            progress=False)
    saved = trainer.saved_policy() if not stop_after else None
    if trainer.accelerator.is_main_process:
        if saved is not None:
            torch.save({n: p.detach().cpu() for n, p in saved.named_parameters()}, out_path)
            saved.save_pretrained(out_path + ".policy")
        with open(out_path + ".json", "w") as f:
            json.dump({"losses": [s["loss"] for s in result.steps], "processes": trainer.accelerator.num_processes,
                       "sharding": trainer.sharding.kind, "resumed_from": result.resumed_from_step,
                       "dtensor": type(next(trainer.model.parameters())).__name__}, f)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:5]))
