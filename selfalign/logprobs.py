"""Summed log-probabilities of response tokens, without materialising full-vocabulary logits.

A preference update needs one number per sequence: sum_t log pi(y_t | x, y_<t) over the
response tokens. The naive route computes float32 logits of shape [B, L, V] and keeps them
for the backward pass; with V = 150k that alone is several GB per micro-batch. Here the
decoder runs once, only the hidden states of response positions are kept, and the LM head
is applied in chunks of tokens by a custom autograd function that recomputes each chunk's
logits in the backward pass instead of storing them. Prompt positions never reach the LM
head at all.

Some model classes do more than apply the LM head: Granite divides the logits by
config.logits_scaling, Cohere multiplies them by config.logit_scale, and so on. The head
is applied here, not by the model's forward, so `head_scale` repeats what each known class
does and refuses a config that carries such a field for a class it does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import ConfigError

Tensor = torch.Tensor


@dataclass
class SequenceBatch:
    """Padded (prompt + response) token ids for one forward pass.

    input_ids:      [B, L] long, prompt tokens then response tokens, padded.
    attention_mask: [B, L] long, 1 on real tokens, 0 on padding.
    response_mask:  [B, L] bool, True on response tokens (the ones whose log-probs are summed).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())


def collate(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_token_id: int,
    padding_side: str = "right",
) -> SequenceBatch:
    """Concatenate each prompt with its response and pad to the longest sequence."""
    if len(prompts) != len(responses):
        raise ValueError(f"collate got {len(prompts)} prompts but {len(responses)} responses")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(lengths), width), dtype=torch.long)
    resp = torch.zeros((len(lengths), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        start = width - lengths[i] if padding_side == "left" else 0
        ids[i, start : start + lengths[i]] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attn[i, start : start + lengths[i]] = 1
        resp[i, start + len(p) : start + lengths[i]] = True
    return SequenceBatch(ids, attn, resp)


def _compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on `t` in, or t's own dtype outside autocast."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _ChunkedTokenLogprob(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] for N tokens, computed `chunk` tokens at a time.

    Forward keeps only hidden [N, H] and the weight; backward recomputes each chunk's logits
    (one extra matmul) so peak memory is O(chunk * V) instead of O(N * V). The matmuls run
    in the dtype autocast chose in forward, in backward too (backward runs outside autocast),
    so the gradient belongs to the forward that was computed and bf16 stays bf16 on a GPU.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int,  # type: ignore[override]
                scale: float = 1.0) -> Tensor:
        dtype = _compute_dtype(hidden)
        w = weight.to(dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s : s + chunk].to(dtype) @ w.T).float()
            if scale != 1.0:
                logits.mul_(scale)
            out[s : s + chunk] = logits.gather(1, targets[s : s + chunk, None]).squeeze(1) - logits.logsumexp(1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk, ctx.dtype, ctx.scale = chunk, dtype, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(ctx.dtype)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        rows = torch.arange(min(ctx.chunk, hidden.shape[0]), device=hidden.device)
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk].to(ctx.dtype)
            g = grad_out[s : s + ctx.chunk].float()
            # d logp / d logits = onehot(target) - softmax(logits), scaled by the upstream grad.
            logits = (h @ w.T).float()
            if ctx.scale != 1.0:
                logits.mul_(ctx.scale)
            d_logits = logits.softmax(1).mul_(-g[:, None])
            d_logits[rows[: h.shape[0]], targets[s : s + ctx.chunk]] += g
            if ctx.scale != 1.0:  # through logits = scale * (h @ w.T)
                d_logits.mul_(ctx.scale)
            d_logits = d_logits.to(ctx.dtype)
            if need_h:
                grad_h[s : s + ctx.chunk] = d_logits @ w
            if need_w:
                grad_w += (d_logits.T @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def _is_whole(weight: Tensor) -> bool:
    """False for a parameter sharded across processes: a DTensor (FSDP2) or a ZeRO-3 partition."""
    from torch.distributed.tensor import DTensor

    return not isinstance(weight, DTensor) and not hasattr(weight, "ds_id")


def token_logprobs(hidden: Tensor, lm_head: nn.Module, targets: Tensor, chunk_size: int = 1024,
                   scale: float = 1.0) -> Tensor:
    """Log-probabilities [N] of `targets` [N] under logits = scale * lm_head(hidden), hidden [N, H].

    A plain bias-free nn.Linear head takes the memory-lean custom path. Any other head (a
    LoRA-wrapped head, a biased one) is applied chunk by chunk under activation
    checkpointing, which bounds memory the same way at the cost of generality-friendly code.
    So is a head whose weight is sharded at this point (ZeRO-3 gathers a module's parameters
    in that module's forward hook; an FSDP2 head in a unit of its own): calling the module
    runs the hook that gathers the weight. Under accelerate's FSDP2 wrapping of LogprobModel
    the head belongs to the root unit, whose weights are whole during the forward.
    """
    if type(lm_head) is nn.Linear and lm_head.bias is None and _is_whole(lm_head.weight):
        return _ChunkedTokenLogprob.apply(hidden, lm_head.weight, targets, chunk_size, scale)

    def chunk_fn(h: Tensor, t: Tensor) -> Tensor:
        logits = lm_head(h).float()
        if scale != 1.0:
            logits = logits * scale
        return logits.gather(1, t[:, None]).squeeze(1) - logits.logsumexp(1)

    parts = [
        torch.utils.checkpoint.checkpoint(chunk_fn, hidden[s : s + chunk_size], targets[s : s + chunk_size], use_reentrant=False)
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


class UnsupportedModelError(ConfigError):
    """The model transforms its logits in a way this module does not reproduce."""


_GRANITE = ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")
_COHERE = ("cohere", "cohere2", "cohere2_moe", "cohere_compass")

# logits = factor * lm_head(h), by config.model_type, as each *ForCausalLM.forward of
# transformers 5.x computes them. The same field name means opposite things: Granite divides
# by logits_scaling, HyperCLOVAX multiplies by it. MiniCPM3 divides the hidden states by
# logits_scaling before its bias-free head, which is the same as dividing the logits.
HEAD_SCALES: dict[str, Callable[[object], float]] = {
    **{t: (lambda c: 1.0 / c.logits_scaling) for t in (*_GRANITE, "minicpm3")},
    "hyperclovax": lambda c: c.logits_scaling,
    **{t: (lambda c: c.logit_scale) for t in _COHERE},
    "falcon_h1": lambda c: c.lm_head_multiplier,
}

# Config fields that scale or cap logits in some model class. One of them set on a model type
# missing from HEAD_SCALES means log-probs computed from the bare head could be wrong.
_SCALING_FIELDS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier", "dim_model_base",
                   "scale_width", "mup_width_multiplier")
# Fields a model type carries but its forward never reads (MptForCausalLM ignores logit_scale).
_UNUSED_FIELDS = {"mpt": ("logit_scale",)}


def head_scale(config: object) -> float:
    """The factor a model with this config applies to its LM head's output; 1.0 for most.

    Raises UnsupportedModelError for a final-logit softcap (Gemma 2 style, not a linear
    scaling) and for a scaling field on a model type whose use of it is not known here.
    """
    if config is None:
        return 1.0
    model_type = getattr(config, "model_type", "") or ""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "final_logit_softcapping", None):
        raise UnsupportedModelError(
            f"model: {model_type or type(config).__name__} caps its logits with final_logit_softcapping="
            f"{text.final_logit_softcapping}, which selfalign's log-prob path does not apply; "
            "set final_logit_softcapping to null in the model's config.json or use a model without it")
    if model_type in HEAD_SCALES:
        return float(HEAD_SCALES[model_type](config))
    unused = _UNUSED_FIELDS.get(model_type, ())
    for name in _SCALING_FIELDS:
        value = getattr(text, name, None)
        if value is not None and name not in unused:
            raise UnsupportedModelError(
                f"model: {model_type or type(config).__name__} sets {name}={value}, and selfalign does not know how "
                f"this model type applies it to its logits (known: granite*, minicpm3, hyperclovax, cohere*, falcon_h1); log-probs "
                "would be silently wrong, so the model is refused")
    return 1.0


def sequence_logprobs(model: nn.Module, batch: SequenceBatch, chunk_size: int = 1024) -> Tensor:
    """Summed response-token log-probs [B] (float32) of a causal LM on a padded batch.

    Prompt and padding tokens are masked out; works for left and right padding (position
    ids are derived from the attention mask, so a left-padded row sees the same positions
    as the unpadded sequence). Logits are scaled as the model's own forward scales them
    (head_scale). Differentiable when called with gradients enabled.
    """
    scale = head_scale(getattr(model, "config", None))
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    # Token t is predicted from the hidden state at t - 1.
    predict = batch.response_mask[:, 1:]
    rows = predict.nonzero(as_tuple=True)[0]
    token_lp = token_logprobs(hidden[:, :-1][predict], model.get_output_embeddings(), batch.input_ids[:, 1:][predict],
                              chunk_size, scale)
    out = torch.zeros(batch.input_ids.shape[0], dtype=torch.float32, device=token_lp.device)
    return out.index_add(0, rows, token_lp)


class LogprobModel(nn.Module):
    """Wraps a causal LM so that its forward returns summed response log-probs [B].

    Data-parallel wrappers (DDP, FSDP) hook into forward(); wrapping the whole computation
    in one forward lets accelerate.prepare() see it.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        # Read by accelerate: FSDP2 wraps each of these layers as its own unit, DeepSpeed sizes
        # buckets from the config's hidden size.
        self._no_split_modules = getattr(model, "_no_split_modules", None)
        self.config = getattr(model, "config", None)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
        return sequence_logprobs(self.model, SequenceBatch(input_ids, attention_mask, response_mask), self.chunk_size)
