"""Run by test_distributed.py under torchrun --nproc_per_node N: one update, params saved."""

from __future__ import annotations

import copy
import json
import sys

import torch

from selfalign.train import PreferenceTrainer, TrainConfig
from tests.conftest import make_examples, make_model


def main(out_path: str, micro_batch_size: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    policy = make_model(0)
    config = TrainConfig(batch_size=8, micro_batch_size=micro_batch_size, epochs=2, learning_rate=1e-3, warmup_ratio=0.0)
    trainer = PreferenceTrainer(policy, config, pad_token_id=0, reference=copy.deepcopy(policy))
    result = trainer.update(make_examples(16), progress=False)
    if trainer.accelerator.is_main_process:
        torch.save({n: p.detach().cpu() for n, p in trainer.policy.named_parameters()}, out_path)
        with open(out_path + ".json", "w") as f:
            json.dump({"losses": [s["loss"] for s in result.steps], "processes": trainer.accelerator.num_processes}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
