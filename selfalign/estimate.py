"""Memory per GPU of a run, from the model's config alone (no weights loaded), before it starts.

    selfalign estimate RECIPE [key=value ...] [--sharding zero3] [--processes 8]

What a run holds at its peak, per process (per GPU), for the chosen sharding:

    parameters   the policy's weights (train.dtype; a full fine-tune keeps fp32 under `auto`)
    gradients    one per trainable weight
    optimizer    AdamW: 2 states, RMSprop: 1, per trainable weight (ZeRO adds the fp32 master copy)
    reference    a separate frozen pi_ref (none with LoRA: the base with the adapter disabled)
    reward model the judge's sequence classifier, when the method calls it (judge.dtype)
    activations  what backward keeps of one micro-batch (chosen + rejected [+ y_ref] rows of
                 max_prompt_tokens + max_new_tokens tokens), plus the chunked LM head's logits
    generation   the KV cache of one generate() call (generation.batch_size x K rows)

Training and generation do not overlap: the peak is the resident part (weights, optimizer,
reference, reward model) plus the larger of the two transients. Sharding, over P processes:

    none / ddp   everything replicated (DDP adds its gradient buckets, one more gradient copy)
    zero2        bf16 weights replicated; gradients, fp32 master weights and states split P ways
    zero3        weights (and the reference) split too, plus two gathered layers in flight
    fsdp2        fp32 weights, gradients and states split P ways (accelerate's FSDP2 with bf16
                 mixed precision), plus two unsharded bf16 layers in flight; reference split

Per-layer activations of a Llama-shaped decoder, in elements per token (what autograd saves;
checked against measured peaks in bench/memory.py): 11 * hidden (two RMSNorms at 3 each, the
rotated q, the head-repeated k and v, attention output, o_proj input) + 4 * intermediate
(gate, SiLU, up, their product). Gradient checkpointing keeps one hidden state per layer and
one layer's activations for the recompute. Attention scores are never stored (SDPA's fused
kernels); the CUDA context and allocator slack (~1-2 GiB) are not counted.

The model's config comes from its directory, the Hugging Face cache, or (hub names not
available offline) the table KNOWN below, and the printout says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .config import ConfigError, check
from .config import field as cfield
from .generation import resolved_backend
from .models import DTYPES, adapter_base, is_adapter_dir
from .tasks import BUILTIN, CONSTRAINTS, INSTRUCTIONS, SMOLLM2

GIB = 1024**3
SHARDINGS = ("none", "ddp", "fsdp2", "zero2", "zero3")
Sharding = Literal["none", "ddp", "fsdp2", "zero2", "zero3"]

# Configs of the hub models the bundled recipes name (from their config.json files), for estimates
# where the hub is out of reach. model_type plus the fields that size the weights.
KNOWN: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "HuggingFaceH4/mistral-7b-sft-beta": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False),
    "Qwen/Qwen1.5-0.5B-Chat": dict(
        model_type="qwen2", hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=151936, tie_word_embeddings=True),
    "Qwen/Qwen2-0.5B": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}


@dataclass
class HardwareConfig:
    """The hardware a recipe is meant for; `selfalign estimate` checks that the recipe fits it."""

    gpus: int = cfield(1, help="Processes (one per GPU) the recipe is launched with.")
    gpu_memory_gib: float = cfield(0.0, help="Memory of one GPU in GiB (80 GB H100: 79.6); 0: a CPU recipe, unchecked.")
    gpu: str = cfield("", help="What the GPU is, for the printout (e.g. 'H100 80GB').")
    sharding: Sharding = cfield(
        "none", help="How training is spread over the GPUs: none/ddp (replicated), fsdp2, zero2, zero3; launch "
                     "with the matching accelerate config file.")
    model_config: dict[str, Any] = cfield(
        default_factory=dict, help="Config fields of the policy (model_type, hidden_size, ...) for the estimate when "
                                   "the model's own config.json is out of reach.")

    def __post_init__(self) -> None:
        check(self.gpus >= 1, "hardware.gpus", f"must be >= 1, got {self.gpus}")
        check(self.gpu_memory_gib >= 0, "hardware.gpu_memory_gib", f"must be >= 0, got {self.gpu_memory_gib}")


@dataclass
class ModelShape:
    """What the estimate needs of a model: parameter counts and the decoder's widths."""

    name: str
    source: str  # where the config came from: "directory", "hub cache", "recipe", "known-size table"
    params: int  # every weight
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # num_key_value_heads * head_dim
    vocab: int
    layer_params: int  # one decoder layer's weights
    linear_shapes: list[tuple[str, int, int]]  # (module name, in, out) of every linear layer (LoRA sizing)


@dataclass
class Estimate:
    """Bytes per GPU of each component, and the peak."""

    components: dict[str, float]
    peak: float
    notes: list[str]
    phases: dict[str, float]  # resident + each transient: training, generation, judging, reference
    device: str = "cuda"

    def table(self) -> str:
        rows = [f"  {name:<28}{value / GIB:>10.2f} GiB" for name, value in self.components.items()]
        peak = "peak per GPU" if self.device == "cuda" else "peak per process (CPU)"
        return "\n".join([*rows, f"  {peak:<28}{self.peak / GIB:>10.2f} GiB"])


def _config_from(source: str, fields: dict[str, Any] | None) -> tuple[Any, str]:
    from transformers import AutoConfig

    if fields:
        fields = dict(fields)
        return AutoConfig.for_model(fields.pop("model_type"), **fields), "recipe (hardware.model_config)"
    try:
        while is_adapter_dir(source):  # a LoRA iterate: its base model's shape
            source = adapter_base(source)
        config = AutoConfig.from_pretrained(source, local_files_only=True)  # never the network
        return config, "directory" if Path(source).expanduser().is_dir() else "hub cache"
    except Exception:
        pass
    if source in KNOWN:
        fields = dict(KNOWN[source])
        return AutoConfig.for_model(fields.pop("model_type"), **fields), "known-size table (not available offline)"
    raise ConfigError(f"{source}: no config.json to estimate from (not a directory, not in the Hugging Face cache, "
                      f"not in the known-size table); add hardware.model_config (model_type, hidden_size, ...)")


def model_shape(source: str, fields: dict[str, Any] | None = None, classifier: bool = False) -> ModelShape:
    """Parameter counts of the model `source` names, from its config on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config, where = _config_from(source, fields)
    if classifier:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    layers = config.num_hidden_layers
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers]
    layer_params = sum(p.numel() for p in blocks[0][0].parameters()) if blocks else params // max(layers, 1)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return ModelShape(source, where, params, layers, config.hidden_size,
                      getattr(config, "intermediate_size", 4 * config.hidden_size), kv * head_dim,
                      config.vocab_size, layer_params, linears)


def lora_params(shape: ModelShape, r: int, targets: list[str] | str) -> int:
    """Adapter weights: r * (in + out) per targeted linear layer ('all-linear': every one but the LM head)."""
    total = 0
    for name, n_in, n_out in shape.linear_shapes:
        leaf = name.rsplit(".", 1)[-1]
        hit = leaf not in ("lm_head", "score") if targets == "all-linear" else leaf in targets
        total += r * (n_in + n_out) if hit else 0
    return total


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def activation_elements(shape: ModelShape, rows: int, tokens: int, checkpointing: bool) -> int:
    """Elements autograd keeps for backward over `rows` sequences of `tokens` tokens (module doc)."""
    per_layer = 11 * shape.hidden + 4 * shape.intermediate
    n = rows * tokens
    if checkpointing:
        kept = shape.layers * shape.hidden * n + per_layer * n
    else:
        kept = shape.layers * per_layer * n
    return kept + 5 * shape.hidden * n  # embeddings, final norm, the response states fed to the LM head


def estimate(cfg: Any, shape: ModelShape, reward: ModelShape | None, sharding: Sharding = "none",
             processes: int = 1, device: str = "cuda") -> Estimate:
    """Peak bytes per process of the online run `cfg` (a RunConfig) on `device` ('cuda' or 'cpu')."""
    t = cfg.train
    gpu = device == "cuda"
    # The dtypes selfalign.iterates resolves to on that device (resolve_dtype looks at this machine's GPU).
    auto_dtype = torch.bfloat16 if gpu else torch.float32
    frozen = auto_dtype if t.dtype == "auto" else DTYPES[t.dtype]
    weights = frozen if (t.lora.enabled or t.dtype != "auto") else torch.float32
    autocast = gpu and t.mixed_precision in ("auto", "bf16")
    act_bytes = 2 if autocast or _bytes(weights) == 2 else 4
    P, N = shape.params, processes
    split = N if sharding in ("fsdp2", "zero3") else 1
    states = 1 if t.optimizer == "rmsprop" else 2
    notes = []
    c: dict[str, float] = {}

    if t.lora.enabled:
        trainable = lora_params(shape, t.lora.r, t.lora.target_modules)
        shards = N if sharding in ("zero2", "zero3", "fsdp2") else 1  # the adapters' gradients and states
        c["parameters"] = P * _bytes(frozen) / split + trainable * 4
        c["gradients"] = trainable * 4 / shards
        c["optimizer states"] = trainable * 4 * (states + (1 if sharding.startswith("zero") else 0)) / shards
        notes.append(f"LoRA: {_count(trainable)} trainable of {_count(P)}; the reference is the base, "
                     "adapter disabled")
    elif sharding in ("zero2", "zero3"):
        half = 2  # DeepSpeed holds the model in bf16 and the fp32 master copy in the optimizer
        c["parameters"] = P * half / (N if sharding == "zero3" else 1)
        c["gradients"] = P * half / N
        c["optimizer states"] = P * 4 * (1 + states) / N
    else:
        w = _bytes(weights)
        c["parameters"] = P * w / split
        c["gradients"] = P * w / split * (2 if sharding == "ddp" and N > 1 else 1)
        c["optimizer states"] = P * w * states / split
    if sharding in ("fsdp2", "zero3") and N > 1:
        c["gathered layers"] = 2 * shape.layer_params * 2 * (2 if sharding == "fsdp2" else 1)

    method = cfg.method_spec
    reference_phase = 0.0  # an offloaded reference visits the GPU for its log-probs and y_ref
    if not t.lora.enabled:
        c["reference"] = 0.0 if t.offload_reference else P * _bytes(frozen) / split
        reference_phase = P * _bytes(frozen) / split if t.offload_reference else 0.0
    called = not method.is_sail or cfg.sail.g > 0
    judging = 0.0  # what scoring adds on top of the resident memory
    if reward is not None and called:
        rm_dtype = auto_dtype if cfg.judge.dtype == "auto" else DTYPES[cfg.judge.dtype]
        rm_weights = reward.params * _bytes(rm_dtype)
        c["reward model"] = 0.0 if cfg.judge.offload else rm_weights
        rm_tokens = cfg.judge.batch_size * (cfg.max_prompt_tokens + cfg.generation.max_new_tokens)
        judging = (rm_weights if cfg.judge.offload else 0.0) + 4 * rm_tokens * reward.hidden * _bytes(rm_dtype)
        if cfg.judge.offload:
            notes.append("reward model offloaded: on the GPU only while judging")
    elif reward is not None:
        notes.append(f"reward model not loaded: {cfg.method} does not call the judge")

    tokens = cfg.max_prompt_tokens + cfg.generation.max_new_tokens
    # y_ref is a row of its own unless it is always one of the pair (XPO's policy-vs-reference pair).
    with_sample = cfg.needs_ref_sample and method.pairing != "policy_vs_ref"
    rows = t.micro_batch_size * (3 if with_sample else 2)
    acts = activation_elements(shape, rows, tokens, t.gradient_checkpointing) * act_bytes
    head = 3 * min(t.logprob_chunk_size, rows * cfg.generation.max_new_tokens) * shape.vocab * 4
    c["activations"] = acts + head
    k = method.policy_samples(cfg.generation.num_samples) or 1
    gen_rows = cfg.generation.batch_size * k
    # The cache is kept in the dtype generation computes in: the engines' bf16 under ZeRO and FSDP2.
    kv_bytes = 2 if sharding in ("zero2", "zero3", "fsdp2") and gpu else _bytes(weights)
    kv = 2 * shape.layers * shape.kv_dim * gen_rows * tokens * kv_bytes
    gen_head = gen_rows * shape.vocab * 4 * 2  # one step's logits and their softmax
    c["generation (KV cache)"] = kv + gen_head
    resident = sum(v for name, v in c.items() if name not in ("activations", "generation (KV cache)", "gradients"))
    train_peak = c["activations"] + c["gradients"]
    phases = {"training": resident + train_peak, "generation": resident + c["generation (KV cache)"],
              "judging": resident + judging, "reference": resident + reference_phase}
    peak = max(phases.values())
    if resolved_backend(cfg.generation) == "vllm":
        notes.append(f"vLLM takes generation.vllm_memory={cfg.generation.vllm_memory} of the GPU while awake; "
                     "not counted")
    return Estimate(c, peak, notes, phases, device)


def estimate_run(cfg: Any, sharding: Sharding | None = None, processes: int | None = None,
                 device: str = "cuda") -> tuple[Estimate, ModelShape, ModelShape | None]:
    """The estimate for a RunConfig, its model shapes read as the module doc says."""
    hw = cfg.hardware
    source = cfg.model
    if source == BUILTIN:
        from .tasks.builtin import build_task

        source = str(build_task(progress=False).policy_dir)
    elif source in (CONSTRAINTS, INSTRUCTIONS, SMOLLM2):
        source = "HuggingFaceTB/SmolLM2-135M-Instruct"
    shape = model_shape(source, hw.model_config or None)
    reward = model_shape(cfg.judge.reward_model, classifier=True) \
        if cfg.judge.kind == "reward_model" and cfg.judge.reward_model else None
    est = estimate(cfg, shape, reward, sharding or hw.sharding, processes or hw.gpus, device)
    return est, shape, reward


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def report(cfg: Any, sharding: Sharding | None = None, processes: int | None = None,
           device: str | None = None) -> tuple[str, bool]:
    """The printout `selfalign estimate` and a starting run show, and whether the run fits its stated GPU.

    device: 'cuda' or 'cpu'; None: cuda for a recipe that states a GPU (hardware.gpu_memory_gib), else cpu.
    """
    hw = cfg.hardware
    sharding, processes = sharding or hw.sharding, processes or hw.gpus
    device = device or ("cuda" if hw.gpu_memory_gib else "cpu")
    est, shape, reward = estimate_run(cfg, sharding, processes, device)
    where = "GPU" if device == "cuda" else "process (CPU)"
    lines = [f"memory estimate per {where}: {cfg.method}, {processes} process(es), sharding {sharding}",
             f"  policy {shape.name}: {_count(shape.params)} parameters (config from the {shape.source})"]
    if reward is not None:
        lines.append(f"  reward model {reward.name}: {_count(reward.params)} parameters (config from the "
                     f"{reward.source})")
    lines.append(est.table())
    lines += [f"  note: {n}" for n in est.notes]
    fits = True
    if hw.gpu_memory_gib and device == "cuda":
        fits = est.peak <= 0.9 * hw.gpu_memory_gib * GIB
        verdict = "fits" if fits else "does NOT fit"
        lines.append(f"  {verdict} {hw.gpus} x {hw.gpu or 'GPU'} ({hw.gpu_memory_gib:g} GiB; 10% kept for the CUDA "
                     "context and allocator)")
    return "\n".join(lines), fits


def launch_report(cfg: Any, sharding: str, processes: int) -> str:
    """The memory estimate a run prints before it starts, for the sharding and processes of its launch
    (distributed.launched_sharding), with a note where the recipe states another sharding. Never raises:
    a model the estimate cannot size (its config out of reach) only says so."""
    try:
        text, _ = report(cfg, sharding, processes, device="cuda" if torch.cuda.is_available() else "cpu")
        if sharding != cfg.hardware.sharding and {sharding, cfg.hardware.sharding} != {"none", "ddp"}:
            text += (f"\n  note: the recipe states hardware.sharding {cfg.hardware.sharding}; this launch runs "
                     f"{sharding} (the accelerate config it was launched with decides)")
    except Exception as e:  # informational: a model the estimate cannot size never stops the run
        text = f"memory estimate: not available ({str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__})"
    return text
