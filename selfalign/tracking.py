"""Experiment tracking: per-step training metrics as training runs, per-iteration results, hyper-parameters.

Two destinations:
- RUN/steps.jsonl, always: one line per optimizer step, appended the moment the step is taken
  (`iteration`, `step` within the iteration, `global_step` over the run, then the trainer's
  metrics under the ecosystem's names: loss, rewards/chosen, rewards/rejected,
  rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, grad_norm,
  learning_rate, num_tokens). A resumed run first cuts the file back to the steps its
  checkpoint holds and re-appends the replayed steps, which are deterministic: the file ends
  byte for byte as an uninterrupted run's (the fault tests compare it).
- The trackers `report_to` names, through accelerate (`Accelerator(log_with=...)`,
  `init_trackers`, `log`): tensorboard, wandb, trackio, mlflow, ... The flattened resolved config
  is logged as hyper-parameters; each step as `train/<metric>` at its global step; each
  iteration's metrics.json (evaluation, labels by source, stage timings) as
  `iteration/<key>` at the global step where its update ended (pi_0's at step 0).
  TensorBoard writes to RUN/tensorboard/. A resumed run logs its replayed steps again:
  trackers are a view, RUN is the record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import ConfigError

STEPS_FILE = "steps.jsonl"
# accelerate's LoggerType values (accelerate.utils.LoggerType), "all" included.
TRACKERS = ("tensorboard", "wandb", "trackio", "aim", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab", "all")
PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}


def parse_report_to(value: str) -> list[str]:
    """'none' -> []; 'tensorboard,wandb' -> ['tensorboard', 'wandb']; ConfigError naming an unknown tracker."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker '{name}' (one or more of {', '.join(TRACKERS)}, "
                              "comma-separated, or none)")
    return names


def accelerator_kwargs(report_to: str, out: Path) -> dict[str, Any]:
    """Accelerator(**this): the trackers to start and where local ones write; ConfigError if one is not installed."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import ProjectConfiguration

    names = parse_report_to(report_to)
    if not names:
        return {}
    available = {str(t.value) for t in get_available_trackers()}
    for name in names:
        if name != "all" and name not in available:
            raise ConfigError(f"report_to: {name} is not installed (pip install {PACKAGES.get(name, name)}), "
                              "or set report_to=none")
    return {"log_with": names,
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))}


def flatten(values: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dict -> {'train.beta': 0.1, ...}; lists and None become text (trackers take scalars and strings)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}{sep}", sep))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def numeric(values: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a metrics dict, flattened with '/' and prefixed: what a tracker can plot."""
    return {k: v for k, v in flatten(values, prefix, sep="/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunTracker:
    """Per-step lines in RUN/steps.jsonl and the accelerate trackers of one run (main process only writes)."""

    def __init__(self, out: Path, accelerator: Any, hyperparameters: dict[str, Any], project: str = "selfalign") -> None:
        self.out, self.accelerator = Path(out), accelerator
        self.path = self.out / STEPS_FILE
        self.iteration = 0
        self.offset = 0  # optimizer steps of the iterations before this one
        self._resumed: set[int] = set()
        self.trackers = bool(getattr(accelerator, "log_with", None))
        if self.trackers:
            accelerator.init_trackers(project, config=flatten(hyperparameters),
                                      init_kwargs={"wandb": {"name": self.out.name}})

    def begin_iteration(self, t: int) -> None:
        """Iteration t starts (or resumes) training; its global steps follow the earlier iterations' steps."""
        self.iteration = t
        self.offset = sum(len(json.loads((self.out / f"iter_{k:03d}" / "train.json").read_text())["steps"])
                          for k in range(t))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Optimizer step `step` (1-based, within the iteration) is done: append its line, log it."""
        if not self.accelerator.is_main_process:
            return
        if self.iteration not in self._resumed:  # this process's first step here: drop what it will redo
            self._resumed.add(self.iteration)
            self._cut_back(self.iteration, step)
        line = {"iteration": self.iteration, "step": step, "global_step": self.offset + step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.trackers:
            self.accelerator.log(numeric(metrics, "train/"), step=self.offset + step)

    def log_iteration(self, metrics: dict[str, Any], steps: int) -> None:
        """An iteration's metrics.json values (or pi_0's with steps=0) at the global step its update ended."""
        if self.trackers and self.accelerator.is_main_process:
            values = {k: v for k, v in metrics.items() if k != "iteration"}
            self.accelerator.log(numeric(values, "iteration/"), step=self.offset + steps if steps else 0)

    def close(self) -> None:
        if self.trackers:
            self.accelerator.end_training()

    def _cut_back(self, t: int, step: int) -> None:
        """Keep the lines before iteration t's step `step`: those of earlier iterations and of steps a
        checkpoint restored. A kill can leave a partial last line; it is dropped with the rest."""
        if not self.path.exists():
            return
        text = self.path.read_text()
        keep = []
        for line in text.splitlines(keepends=True):
            try:
                row = json.loads(line) if line.endswith("\n") else None
            except json.JSONDecodeError:
                row = None
            if row is not None and (row["iteration"] < t or (row["iteration"] == t and row["step"] < step)):
                keep.append(line)
        kept = "".join(keep)
        if kept != text:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(kept)
            os.replace(tmp, self.path)
