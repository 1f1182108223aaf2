"""Sharded training through accelerate: FSDP2 and DeepSpeed ZeRO, as `accelerate launch` configures them.

selfalign has no distribution layer of its own. A run launched with
`accelerate launch --config_file $(selfalign accelerate-config fsdp2) -m selfalign run ...`
gets an Accelerator whose state says FSDP (version 2) or DEEPSPEED; this module is the
little that the preference update must do differently then:

- the policy and its optimizer are prepared together (`accelerator.prepare(model, optimizer)`),
  which is where FSDP2 shards the parameters and DeepSpeed builds its engine; the accelerator's
  reference to each update's optimizer is dropped when the update ends;
- the frozen reference is sharded the same way (FSDP2: accelerate's fully_shard wrapping;
  ZeRO-3: an inference engine, as TRL does), so sharded models run their forwards in
  lockstep: every process runs the same number of them (`lockstep_batches`);
- generation needs whole weights: `Sharding.gathered` builds an unsharded replica of a model
  from its full state dict (gathered onto every process) inside a `with` block; the replica
  has no hooks and no collectives, so processes may generate different numbers of tokens;
- an iterate is saved from the full state dict into an ordinary `from_pretrained` directory;
  mid-update checkpoints go through `accelerator.save_state` (FSDP2: sharded DCP files;
  DeepSpeed: the engine's checkpoint) and resume under the same sharding.

Without a GPU accelerate never selects FSDP: a torchrun job on CPU is MULTI_CPU whatever
ACCELERATE_USE_FSDP says. `make_accelerator` then switches the accelerator's state to FSDP
with the plugin accelerate itself builds from the launch environment, so CPU tests drive the
same `prepare`, `clip_grad_norm_`, `save_state` and `get_state_dict` code paths a GPU run takes
(over gloo instead of NCCL). DeepSpeed is not switched on CPU: its engine needs a GPU, so a
DeepSpeed launch without one is refused (`check_deepspeed_launch`) rather than run as DDP.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType
from torch import nn

from .config import ConfigError

CONFIG_DIR = Path(__file__).parent / "accelerate_configs"
SHIPPED_CONFIGS = {
    "ddp": "data parallel on every GPU of one machine: one full copy of the model per GPU",
    "fsdp2": "FSDP2 (torch fully_shard): parameters, gradients and optimizer states sharded over the GPUs",
    "zero2": "DeepSpeed ZeRO-2: gradients and optimizer states sharded, parameters replicated",
    "zero3": "DeepSpeed ZeRO-3: parameters, gradients and optimizer states sharded",
}

Kind = Literal["none", "fsdp2", "deepspeed"]


def config_path(name: str) -> Path:
    """The shipped accelerate config file `name` (ddp, fsdp2, zero2, zero3), for `accelerate launch --config_file`."""
    if name not in SHIPPED_CONFIGS:
        raise ConfigError(f"no shipped accelerate config '{name}'; choose one of {', '.join(SHIPPED_CONFIGS)}")
    return CONFIG_DIR / f"{name}.yaml"


def make_accelerator(mixed_precision: str, **kwargs) -> Accelerator:
    """The run's Accelerator, with FSDP honoured on CPU (see the module docstring) and FSDP1 refused.

    kwargs go to Accelerator (the trackers: tracking.accelerator_kwargs)."""
    check_deepspeed_launch()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), **kwargs)
    if (accelerator.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        from accelerate.utils import FullyShardedDataParallelPlugin

        # What AcceleratorState.__init__ does on GPUs (MULTI_GPU + ACCELERATE_USE_FSDP -> FSDP, copied
        # into PartialState's shared state too, which every later AcceleratorState() reads).
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(
            f"accelerate config: fsdp_version {accelerator.state.fsdp_plugin.fsdp_version} is not supported; "
            f"set fsdp_version: 2 (FSDP2), as the shipped {config_path('fsdp2')} does")
    return accelerator


def check_deepspeed_launch() -> None:
    """Refuse a DeepSpeed launch that would not run DeepSpeed: without CUDA accelerate silently runs plain DDP."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"this launch asks for DeepSpeed ZeRO-{stage}, which needs a GPU (CUDA), and there is none: accelerate "
            f"would run it as plain data parallel, nothing sharded; on a CPU launch with the fsdp2 config "
            f"(accelerate launch --config_file {config_path('fsdp2')}) to shard, or with torchrun for data parallel")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"this launch asks for DeepSpeed ZeRO-{stage}, and deepspeed is not installed: "
                          "pip install deepspeed, or launch with the fsdp2 config (selfalign accelerate-config fsdp2)")


def sharding_kind(accelerator: Accelerator) -> Kind:
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp2"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "none"


def launched_sharding(accelerator: Accelerator) -> str:
    """The sharding in force, from accelerate's state (not the recipe's hardware.sharding), in estimate's names.

    none (one process), ddp, fsdp2, zero2 or zero3; ZeRO-1 (optimizer states only) is reported
    as ddp, the estimate's nearest upper bound.
    """
    kind = sharding_kind(accelerator)
    if kind == "fsdp2":
        return "fsdp2"
    if kind == "deepspeed":
        stage = Sharding(accelerator).zero_stage
        return f"zero{stage}" if stage in (2, 3) else "ddp"
    return "ddp" if accelerator.num_processes > 1 else "none"


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and persistent buffers are on the meta device (no memory).

    Taken before sharding, it is the skeleton an unsharded replica is loaded into
    (`load_state_dict(assign=True)`). Non-persistent buffers (rotary frequencies) are not in a
    state dict, so they are copied for real; they are small.
    """
    memo: dict[int, object] = {}
    persistent = {name for name, _ in model.state_dict(keep_vars=True).items()}
    for _, p in model.named_parameters(remove_duplicate=False):
        memo.setdefault(id(p), nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    return copy.deepcopy(model, memo)


def lockstep_batches(n_rows: int, batch_rows: int, rank: int, world: int, collective: bool) -> int:
    """Batches process `rank` runs when n_rows are dealt round-robin over `world` processes, batch_rows a batch.

    With sharded parameters every forward is collective (collective=True), so every process
    runs the number the busiest process needs (an idle one runs a throwaway batch); otherwise
    each runs its own.
    """
    mine = -(-n_rows // world) if collective else len(range(rank, n_rows, world))
    return -(-mine // batch_rows)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


class Sharding:
    """What the preference update does differently when accelerate shards the models (see module docstring).

    kind "none" (one process, or DDP) changes nothing: every method then does what the trainer
    did before sharding existed.
    """

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.kind: Kind = sharding_kind(accelerator)
        self._skeletons: dict[int, nn.Module] = {}

    @property
    def sharded(self) -> bool:
        return self.kind != "none"

    @property
    def zero_stage(self) -> int:
        if self.kind != "deepspeed":
            return 0
        return int(self.accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])

    @property
    def params_sharded(self) -> bool:
        """Parameters are split across processes (FSDP2, ZeRO-3): forwards are collective."""
        return self.kind == "fsdp2" or self.zero_stage == 3

    def remember(self, module: nn.Module) -> None:
        """Keep a meta skeleton of `module` (call before sharding it) for `gathered` to fill."""
        if self.sharded and id(module) not in self._skeletons:
            self._skeletons[id(module)] = meta_copy(module)

    # ------------------------------------------------------------------ preparation
    def prepare_training(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch_rows: int,
                         max_grad_norm: float) -> tuple[nn.Module, torch.optim.Optimizer]:
        """accelerator.prepare(model, optimizer): FSDP2 shards here, DeepSpeed builds its engine here."""
        acc = self.accelerator
        if self.kind == "deepspeed":
            if acc.deepspeed_engine_wrapped is not None:
                raise RuntimeError("under DeepSpeed a PreferenceTrainer runs one update; make a new trainer "
                                   "(after accelerator.free_memory()) for the next")
            ds = acc.state.deepspeed_plugin.deepspeed_config
            # The update steps the engine itself (one boundary per optimizer step, see train._step) and
            # clips there: DeepSpeed clips inside engine.step().
            ds["train_micro_batch_size_per_gpu"] = micro_batch_rows
            ds["train_batch_size"] = micro_batch_rows * acc.num_processes
            ds["gradient_accumulation_steps"] = 1
            ds["gradient_clipping"] = float(max_grad_norm)
            ds["zero_allow_untested_optimizer"] = True  # torch's RMSprop (train.optimizer=rmsprop) is not on its list
        return acc.prepare(model, optimizer)

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """The frozen reference, sharded as the policy is (FSDP2, ZeRO-3) or placed on the device."""
        acc = self.accelerator
        if self.kind == "fsdp2":
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            return fsdp2_prepare_model(acc, model)
        if self.zero_stage == 3:
            import deepspeed

            ds = acc.state.deepspeed_plugin.deepspeed_config
            config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": dict(ds["zero_optimization"]),
                      "bf16": ds.get("bf16", {"enabled": False}), "fp16": ds.get("fp16", {"enabled": False})}
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
            return engine
        return model.to(acc.device)

    def release(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Drop the accelerator's reference to an update's prepared optimizer (its state is 2x the weights)."""
        self.accelerator._optimizers = [o for o in self.accelerator._optimizers if o is not optimizer]

    # ------------------------------------------------------------------ the optimizer step
    def accumulating(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context for a micro-batch that is not its optimizer step's last: accumulate, do not sync.

        DDP skips its all-reduce (accelerator.no_sync). FSDP2 has no no_sync: accelerate gives a
        null context and gradients are reduce-scattered every micro-batch (the same sum).
        DeepSpeed must not step its engine: accelerate's DeepSpeed backward steps it whenever
        gradients sync, so they are marked unsynced here.
        """
        if self.kind == "deepspeed":
            return self._deepspeed_accumulating()
        return self.accelerator.no_sync(model)

    @contextlib.contextmanager
    def _deepspeed_accumulating(self) -> Iterator[None]:
        state = self.accelerator.gradient_state
        state._set_sync_gradients(False)
        try:
            yield
        finally:
            state._set_sync_gradients(True)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor | float | None:
        """Clip and return the global gradient norm; None where it is unknown.

        Under DeepSpeed the engine clipped (config gradient_clipping) and stepped in the last
        backward already; this returns the norm it measured then, or None.
        """
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    # ------------------------------------------------------------------ lockstep forwards
    def lockstep_batches(self, n_rows: int, batch_rows: int) -> int:
        """lockstep_batches() for this process; collective when parameters are sharded."""
        acc = self.accelerator
        return lockstep_batches(n_rows, batch_rows, acc.process_index, acc.num_processes, self.params_sharded)

    # ------------------------------------------------------------------ whole weights
    def full_state_dict(self, prepared: nn.Module, everywhere: bool = False, prefix: str = "model."
                        ) -> dict[str, torch.Tensor]:
        """The unsharded state dict of a prepared model (collective: every process calls it).

        everywhere=False: on the main process only, on the CPU (others get {}), for saving.
        everywhere=True: on every process, on its device, for generation. `prefix` (the
        LogprobModel wrapper's) is stripped from the keys.
        """
        acc = self.accelerator
        if self.kind == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
            state = get_model_state_dict(prepared, options=options)
        elif self.zero_stage == 3:
            import deepspeed

            module = acc.unwrap_model(prepared)
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                keep = everywhere or acc.is_main_process
                state = {k: v.detach().clone() if everywhere else v.detach().cpu().clone()
                         for k, v in module.state_dict().items()} if keep else {}
        else:
            state = acc.unwrap_model(prepared).state_dict() if everywhere or acc.is_main_process else {}
        return _strip(state, prefix)

    def replica(self, module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
        """An unsharded copy of `module` (remembered before sharding) holding the tensors of `state`."""
        replica = copy.deepcopy(self._skeletons[id(module)])
        missing, unexpected = replica.load_state_dict(state, strict=False, assign=True)
        if hasattr(replica, "tie_weights"):
            replica.tie_weights()
        still_meta = [n for n, p in replica.named_parameters() if p.is_meta]
        if still_meta or unexpected:
            raise RuntimeError(f"the full state dict does not fit the model: missing {still_meta[:3]}, "
                               f"unexpected {unexpected[:3]}")
        return replica

    def saved(self, prepared: nn.Module | None, module: nn.Module) -> nn.Module | None:
        """`module` to save_pretrained on the main process (None elsewhere); every process must call it.

        Parameters sharded (FSDP2, ZeRO-3) and `prepared` the sharded model: a replica rebuilt
        from the full state dict gathered onto the main process.
        """
        main = self.accelerator.is_main_process
        if not self.params_sharded or prepared is None:
            return module if main else None
        state = self.full_state_dict(prepared)
        return self.replica(module, state) if main else None

    @contextlib.contextmanager
    def gathered(self, prepared: nn.Module | None, module: nn.Module) -> Iterator[nn.Module]:
        """`module` with whole weights for `generate`: itself unless its parameters are sharded.

        Sharded (FSDP2, ZeRO-3): a replica built from the full state dict gathered onto every
        process, freed when the block ends. It costs one all-gather and one unsharded copy of
        the weights per process while generating (in the training dtype), the price TRL pays too
        (its unwrap_model_for_generation gathers ZeRO-3 weights on every process).
        """
        if not self.params_sharded or prepared is None:
            yield module
            return
        replica = self.replica(module, self.full_state_dict(prepared, everywhere=True))
        was_training = module.training
        replica.train(False)
        try:
            yield replica
        finally:
            del replica
            module.train(was_training)
