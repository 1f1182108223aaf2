"""Response generation: a Generator protocol and its transformers implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..config import check, field


@dataclass
class GenerationConfig:
    """How responses are sampled."""

    num_samples: int = field(2, help="Responses per prompt (K).")
    temperature: float = field(1.0, help="Sampling temperature; 0 means greedy decoding.")
    top_p: float = field(1.0, help="Nucleus sampling mass.")
    max_new_tokens: int = field(64, help="Longest response, in tokens.")
    batch_size: int = field(16, help="Prompts per generate() call (each expanded to num_samples rows).")

    def __post_init__(self) -> None:
        check(self.num_samples >= 1, "generation.num_samples", f"must be >= 1, got {self.num_samples}")
        check(self.temperature >= 0, "generation.temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "generation.top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 1, "generation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, "generation.batch_size", f"must be >= 1, got {self.batch_size}")


class Generator(Protocol):
    def generate(
        self, prompts: list[list[int]], config: GenerationConfig, seed: int = 0
    ) -> list[list[list[int]]]:
        """For each prompt (token ids), config.num_samples responses (token ids, ending at EOS if it was produced)."""
        ...
