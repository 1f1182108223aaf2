"""The mid-update checkpoint: RUN/iter_NNN/train_state/update_state.pt, when it is due, and how a resumed update recognises its own.

A checkpoint holds the trainable weights, the optimizer and schedule, the steps' metrics,
the reference log-probs of the round's examples and a fingerprint of the config and
examples; a resume with other examples or another config is refused rather than mixed in.
The trainer keeps what it restores in an `UpdateState`; `UpdateCheckpoint` knows what a
save holds and when one is due.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from . import faults
from .config import to_dict
from .records import PreferenceExample, ReferenceLogps
from .train_config import TrainConfig

# A weights write that failed for want of room: a full disk, a quota, a file-size limit (ulimit -f, FAT32's 4 GiB).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def tensor_bytes(obj: object) -> int:
    """Bytes of the tensors in obj (nested dicts, lists and tuples), each storage counted once (tied weights)."""
    seen: dict[int, int] = {}

    def walk(x: object) -> None:
        if isinstance(x, torch.Tensor):
            seen[x.untyped_storage().data_ptr() or id(x)] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return sum(seen.values())


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _errno_of(error: BaseException, tmp: Path) -> int | None:
    """The errno behind a failed write: an OSError's own, the 'os error N' safetensors reports, or, since torch's
    zip writer keeps none ("unexpected pos ..."), what a one-byte write beside the partial file gets now."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"os error (\d+)", str(error))
    if found:
        return int(found.group(1))
    probe = tmp / "probe" if tmp.is_dir() else tmp
    try:
        with open(probe, "ab") as f:
            f.write(b"\0")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno
    return None


@contextmanager
def writing_weights(what: str, tmp: Path, need: int) -> Iterator[None]:
    """Weights written to `tmp` (a file or a directory, renamed into place after the block): a write that fails for
    want of room (NO_ROOM) becomes OSError(errno, 'reason while writing WHAT (about N needed, M free there)', the
    directory), with the partial temporary removed; whatever was saved before is untouched (it is renamed over only
    after a complete write)."""
    try:
        yield
    except Exception as e:  # OSError, safetensors' SafetensorError, torch's RuntimeError: each carries the cause differently
        code = _errno_of(e, tmp)
        if code not in NO_ROOM:
            raise
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(tmp.parent).free
        raise OSError(code, f"{os.strerror(code)} while writing {what} (about {_size(need)} needed, {_size(free)} "
                            "free there)", str(tmp.parent)) from e


def atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with writing_weights("a checkpoint", tmp, tensor_bytes(obj)), open(tmp, "wb") as f:
        torch.save(obj, f)
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


@dataclass
class UpdateState:
    """Where an update stands, besides its weights, optimizer and schedule: what a checkpoint restores.

    history: the metrics of every optimizer step so far, over all rounds; rounds_done: rounds
    finished; f_baseline: SAIL's running mean of F (its response term's baseline); resume: the
    restored checkpoint's state until the round it stopped in is resumed (None otherwise).
    """

    history: list[dict[str, float]] = field(default_factory=list)
    rounds_done: int = 0
    f_baseline: float | None = None
    resume: dict[str, Any] | None = None

    @property
    def resume_step(self) -> int:
        """The step within its round a pending resume starts at (0: none pending)."""
        return self.resume["step"] if self.resume is not None else 0

    def resume_reference(self, expected_fingerprint: str, checkpoint: UpdateCheckpoint) -> list[ReferenceLogps]:
        """The checkpointed round's reference log-probs, once its fingerprint matches; the resume is then used up."""
        checkpoint.check_fingerprint(self.resume, expected_fingerprint)
        reference = [ReferenceLogps(*values) for values in self.resume["ref_logps"]]
        self.resume = None
        return reference


class UpdateCheckpoint:
    """update_state.pt in `directory` (None: checkpointing off); saved_at is the step count at the last save.

    every: train.checkpoint_every (0: saved only when a round stops early). restore() restores
    an update's model, optimizer and schedule and remembers them for save_update().

    sharded (FSDP2 / DeepSpeed): weights and optimizer are not in update_state.pt but go through
    accelerator.save_state (FSDP2: sharded DCP files; DeepSpeed: the engine's checkpoint) into
    a directory of their own, sharded_<step>, which the atomically written update_state.pt names;
    older ones are removed after it. They resume under the same launch config only.
    """

    def __init__(self, directory: str | Path | None, accelerator: Accelerator, sharded: bool = False,
                 every: int = 0) -> None:
        self.path = Path(directory) / "update_state.pt" if directory is not None else None
        self.accelerator = accelerator
        self.sharded = sharded
        self.every = every
        self.saved_at = 0
        self._training: tuple[nn.Module, torch.optim.Optimizer, Any] | None = None

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
        sharded_dir = state.get("sharded_dir")
        if bool(sharded_dir) != self.sharded:
            written = "with" if sharded_dir else "without"
            raise ValueError(f"{self.path} was written {written} FSDP2/DeepSpeed sharding; resume it under the same "
                             "accelerate launch config, or delete it to start this update afresh")
        if sharded_dir:
            self.accelerator.load_state(str(self.path.parent / sharded_dir))
            return state
        missing = set(trainable_state(model)) - set(state["trainable"])
        if missing:
            raise ValueError(f"{self.path} lacks trainable parameters such as {sorted(missing)[0]}")
        model.load_state_dict(state["trainable"], strict=False)
        return state

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> UpdateState:
        """The update's state from the checkpoint, its weights, optimizer and schedule loaded in place; a fresh
        UpdateState when there is none. The three are what save_update() saves from then on."""
        self._training = (model, optimizer, scheduler)
        state = self.load(model)
        if state is None:
            return UpdateState()
        if not self.sharded:  # sharded: accelerator.load_state restored it
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.saved_at = len(state["history"])
        return UpdateState(list(state["history"]), state["round"], state.get("f_baseline"),
                           state if state["step"] > 0 else None)

    def due(self, steps_done: int) -> bool:
        """checkpoint_every optimizer steps (counted over rounds) have passed since the last save.

        Rounds of one step (generation every step) thus save every checkpoint_every steps, not every
        round: a full fine-tune's checkpoint is three times the weights. A resumed update replays the
        rounds after its last checkpoint from their stored examples.
        """
        return bool(self.every) and steps_done - self.saved_at >= self.every

    def save_update(self, state: UpdateState, round_index: int, step: int, fingerprint: str | None,
                    reference: Sequence[ReferenceLogps]) -> None:
        """Save the update `step` optimizer steps into round `round_index` (step 0: the round before it finished).

        fingerprint and reference: the round's (fingerprint() of its examples, their reference
        log-probs); None and [] for a checkpoint at a round boundary.
        """
        model, optimizer, scheduler = self._training
        self.save(lambda: {
            "fingerprint": fingerprint,
            "round": round_index,
            "step": step,
            # Sharded: weights and optimizer go through accelerator.save_state (save()).
            "trainable": None if self.sharded else trainable_state(model),
            "optimizer": None if self.sharded else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ref_logps": [(r.chosen, r.rejected, r.ref_sample) for r in reference],
            "history": state.history,
            "f_baseline": state.f_baseline,
        }, len(state.history))

    def check_fingerprint(self, state: dict[str, Any], expected: str) -> None:
        if state["fingerprint"] != expected:
            raise ValueError(f"{self.path} belongs to a different update (other examples or config); "
                             "delete it to start this update afresh")

    def save(self, state: Callable[[], dict[str, Any]], steps_done: int) -> None:
        """Write state() atomically from the main process (only it builds the state); every process waits for it."""
        self.saved_at = steps_done
        acc = self.accelerator
        acc.wait_for_everyone()
        sharded_dir = f"sharded_{steps_done:06d}" if self.sharded else None
        if sharded_dir:
            if acc.is_main_process:
                shutil.rmtree(self.path.parent / sharded_dir, ignore_errors=True)
                self.path.parent.mkdir(parents=True, exist_ok=True)
            acc.wait_for_everyone()
            acc.save_state(str(self.path.parent / sharded_dir))  # collective
            acc.wait_for_everyone()
        if acc.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save({**state(), **({"sharded_dir": sharded_dir} if sharded_dir else {})}, self.path)
            self._remove_sharded(keep=sharded_dir)
        acc.wait_for_everyone()

    def _remove_sharded(self, keep: str | None = None) -> None:
        for old in self.path.parent.glob("sharded_*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def finish(self) -> None:
        """The update finished (its caller saves the policy): the checkpoint goes, and with it the hold on the
        optimizer (its state is twice the trainable weights)."""
        self._training = None
        if self.accelerator.is_main_process and self.exists():
            self.path.unlink()
            self._remove_sharded()

    def kept(self) -> str:
        """What a user has to go back to, for the non-finite-step message."""
        if self.exists():
            return f"the last good checkpoint is {self.path} (step {self.saved_at})"
        return "no mid-update checkpoint was saved (train.checkpoint_every=0 or none due yet)"
