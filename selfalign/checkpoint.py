"""The mid-update checkpoint: RUN/iter_NNN/train_state/update_state.pt, and how a resumed update recognises its own.

A checkpoint holds the trainable weights, the optimizer and schedule, the steps' metrics,
the reference log-probs of the round's examples and a fingerprint of the config and
examples; a resume with other examples or another config is refused rather than mixed in.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from . import faults
from .config import to_dict
from .records import PreferenceExample
from .train_config import TrainConfig


def atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch reports a full disk as a failed zip write
            if shutil.disk_usage(tmp.parent).free < 1 << 20:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp)) from e
            raise
        f.flush()
        os.fsync(f.fileno())
    faults.before_rename()
    os.replace(tmp, path)
    faults.after_write(path)


def fingerprint(config: TrainConfig, examples: Sequence[PreferenceExample]) -> str:
    """What a checkpoint belongs to: the update's config and its examples' ids and routes."""
    digest = hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode())
    for ex in examples:
        digest.update(json.dumps([ex.prompt_ids, ex.chosen_ids, ex.rejected_ids, ex.ref_sample_ids,
                                  ex.route]).encode())
    return digest.hexdigest()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


class UpdateCheckpoint:
    """update_state.pt in `directory` (None: checkpointing off); saved_at is the step count at the last save."""

    def __init__(self, directory: str | Path | None, accelerator: Accelerator) -> None:
        self.path = Path(directory) / "update_state.pt" if directory is not None else None
        self.accelerator = accelerator
        self.saved_at = 0

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def exists(self) -> bool:
        return self.path is not None and self.path.exists()

    def load(self, model: nn.Module) -> dict[str, Any] | None:
        """The saved state, its trainable weights already loaded into `model`; None when there is none."""
        if not self.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        missing = set(trainable_state(model)) - set(state["trainable"])
        if missing:
            raise ValueError(f"{self.path} lacks trainable parameters such as {sorted(missing)[0]}")
        model.load_state_dict(state["trainable"], strict=False)
        return state

    def check_fingerprint(self, state: dict[str, Any], expected: str) -> None:
        if state["fingerprint"] != expected:
            raise ValueError(f"{self.path} belongs to a different update (other examples or config); "
                             "delete it to start this update afresh")

    def save(self, state: Callable[[], dict[str, Any]], steps_done: int) -> None:
        """Write state() atomically from the main process (only it builds the state); every process waits for it."""
        self.saved_at = steps_done
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(state(), self.path)
        self.accelerator.wait_for_everyone()

    def remove(self) -> None:
        """The update finished (its caller saves the policy): the checkpoint goes."""
        if self.accelerator.is_main_process and self.exists():
            self.path.unlink()

    def kept(self) -> str:
        """What a user has to go back to, for the non-finite-step message."""
        if self.exists():
            return f"the last good checkpoint is {self.path} (step {self.saved_at})"
        return "no mid-update checkpoint was saved (train.checkpoint_every=0 or none due yet)"
