"""A sequence-classification reward model with ITS OWN tokenizer and chat template.

The conversation is rendered as text from the prompt and the response, then tokenized by the
reward model's tokenizer: policy token ids never reach the reward model, so a reward model
whose vocabulary or template differs from the policy's scores what it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from . import Prompt, check_scores, flatten, unflatten


def render(tokenizer, prompt: Prompt, response: str) -> str:
    """The conversation as the reward model's tokenizer would write it."""
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    messages.append({"role": "assistant", "content": response})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(m["content"] for m in messages)


class RewardModelJudge:
    """Scores with AutoModelForSequenceClassification (logit 0), loaded with from_pretrained."""

    def __init__(
        self, path: str | Path, batch_size: int = 16, max_length: int = 2048, device: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        from ..models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_model(path, dtype=dtype, auto_class=AutoModelForSequenceClassification)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.labels = 0

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s : s + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=False).to(self.device)
            out += self.model(**enc).logits[:, 0].float().cpu().tolist()
        return out

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]],
              key: str = "") -> list[list[float]]:
        flat_p, flat_r = flatten(prompts, candidates)
        texts = [render(self.tokenizer, p, r) for p, r in zip(flat_p, flat_r)]
        scores = check_scores(self.score_texts(texts), len(texts), "reward model")
        self.labels += len(texts)
        return unflatten(scores, candidates)
