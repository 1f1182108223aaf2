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


def check_classifier(path: str | Path) -> None:
    """Refuse, before loading it, a checkpoint whose config names no sequence-classification architecture (a causal
    LM): loaded as a classifier, its score head would be random weights, which transformers only warns about, and
    every label would be noise."""
    from transformers import AutoConfig

    from ..models import ModelLoadError

    architectures = AutoConfig.from_pretrained(str(path)).architectures or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelLoadError(f"{path}: is a {', '.join(architectures)}, not a sequence-classification reward model (its "
                             "score head would be random weights); give a reward model whose config.json architectures "
                             "end in ForSequenceClassification")


def check_loaded(path: str | Path, missing: Sequence[str]) -> None:
    """Refuse a reward model whose checkpoint lacks weights the classifier needs (transformers initialises them at
    random and only warns)."""
    from ..models import ModelLoadError

    if missing:
        names = sorted(missing)
        raise ModelLoadError(f"{path}: its checkpoint has no {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} "
                             "weights, which would be random; give a trained sequence-classification reward model")


class RewardModelJudge:
    """Scores with AutoModelForSequenceClassification (logit 0), loaded with from_pretrained."""

    def __init__(
        self, path: str | Path, batch_size: int = 16, max_length: int = 2048, device: str | None = None,
        dtype: torch.dtype = torch.float32, offload: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification

        from ..models import is_gguf, load_model, load_tokenizer

        self.tokenizer = load_tokenizer(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if is_gguf(path):
            self.model = load_model(path, dtype=dtype, auto_class=AutoModelForSequenceClassification)
        else:
            check_classifier(path)
            self.model, info = load_model(path, dtype=dtype, auto_class=AutoModelForSequenceClassification,
                                          output_loading_info=True)
            check_loaded(path, info["missing_keys"])
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # offload: the weights wait in CPU memory between calls, so training has the GPU's.
        self.offload = offload and self.device != "cpu"
        self.model.to("cpu" if self.offload else self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self.labels = 0
        self.keeps_answers = False

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        if self.offload:
            self.model.to(self.device)
        try:
            for s in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[s : s + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False).to(self.device)
                out += self.model(**enc).logits[:, 0].float().cpu().tolist()
        finally:
            if self.offload:
                self.model.to("cpu")
        return out

    def score(self, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]],
              key: str = "") -> list[list[float]]:
        flat_p, flat_r = flatten(prompts, candidates)
        texts = [render(self.tokenizer, p, r) for p, r in zip(flat_p, flat_r)]
        scores = check_scores(self.score_texts(texts), len(texts), "reward model")
        self.labels += len(texts)
        return unflatten(scores, candidates)
