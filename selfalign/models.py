"""Loading models and tokenizers: a local directory, a hub name, or a GGUF file.

Every place selfalign loads a model (policy, reference, reward model, evaluation baseline)
goes through `load_model` / `load_tokenizer`, so all of them accept the same sources:

    runs/x/iter_002/policy          a directory with config.json (save_pretrained's layout)
    HuggingFaceTB/SmolLM2-135M      a hub name (whatever from_pretrained does with it)
    path/to/model.Q4_1.gguf         a GGUF file: transformers dequantises it (needs `pip install gguf`)

A GGUF-loaded model is rebuilt as a plain model from its config and state dict: transformers
marks it "quantized with gguf" and its save_pretrained refuses it, while selfalign saves
every iterate as an ordinary safetensors directory. `materialize` does that once for a run,
so later loads read safetensors instead of dequantising again.

A source that cannot be loaded (a misspelt path, a directory without config.json or without
weights, a file that is not GGUF, a GGUF transformers cannot read) is a ModelLoadError: one
line naming the config key (where the caller gives it), the path and what to do, which the
CLI prints with exit status 2. `check_source` is the one check of a model path; callers run
it before a run starts, the loaders again as they load.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

GGUF_SUFFIX = ".gguf"
ADAPTER_CONFIG = "adapter_config.json"  # peft's save_pretrained output: a LoRA adapter over a named base model
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # anything else is meant as a local path
WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


class ModelLoadError(ConfigError):
    """A model or tokenizer source that cannot be loaded; one line naming the path and the fix."""


def is_gguf(source: str | os.PathLike) -> bool:
    return str(source).lower().endswith(GGUF_SUFFIX)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def resolve_dtype(name: str) -> torch.dtype:
    """The weights' dtype for a config value auto|bf16|fp16|fp32: auto is bf16 on a GPU that supports it, else fp32."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def is_adapter_dir(source: str | os.PathLike) -> bool:
    """A directory holding a peft adapter (adapter_config.json) and no full model of its own."""
    path = Path(os.path.expanduser(str(source)))
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def adapter_base(source: str | os.PathLike) -> str:
    """The base model an adapter directory was trained on (its adapter_config.json's base_model_name_or_path)."""
    import json

    path = Path(os.path.expanduser(str(source)))
    base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
    if not base:
        raise ModelLoadError(f"{path / ADAPTER_CONFIG}: names no base_model_name_or_path; set it to the base model")
    return base


def whole_model(source: str | os.PathLike) -> str:
    """The whole model under a chain of LoRA iterates (each adapter's base may be the previous iterate's adapter)."""
    source = str(source)
    while is_adapter_dir(source):
        source = adapter_base(source)
    return source


def check_source(source: str | os.PathLike, key: str = "") -> Path | str:
    """The source as a Path (local) or str (hub name); ModelLoadError for a local path that cannot be a model.

    key: the config key or command-line flag the path came from (model, judge.reward_model, --baseline),
    named first in the message. A hub name is left to from_pretrained (it may be in the local cache).
    """
    named = f"{key}: " if key else ""
    text = os.path.expanduser(str(source))
    if not text:
        raise ModelLoadError(f"{named}model path is empty: give a model directory, a hub name or a .gguf file")
    path = Path(text)
    if path.is_dir():
        if is_adapter_dir(path):
            return path  # a LoRA iterate: load_causal_lm merges it into its base
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}"))
            hint = (f"it holds {', '.join(ggufs)}: give that file's path" if ggufs else
                    "give a directory written by save_pretrained, a hub name, or a .gguf file")
            raise ModelLoadError(f"{named}{path}: directory has no config.json, so it is not a model directory ({hint})")
        if not any(next(path.glob(pattern), None) for pattern in WEIGHTS):
            raise ModelLoadError(f"{named}{path}: has a config.json but no weights (*.safetensors or *.bin); give the "
                                 "directory save_pretrained wrote")
        return path
    if path.is_file():
        if not is_gguf(path):
            raise ModelLoadError(f"{named}{path}: is a file but not a .gguf model; give a model directory (config.json) "
                                 "or a .gguf file")
        return path
    if is_gguf(text) or not HUB_NAME.fullmatch(text):  # a hub name is 'name' or 'owner/name'; this is a path
        raise ModelLoadError(f"{named}{path}: no such file or directory (check the spelling; a model is a directory "
                             "with config.json, a hub name such as org/name, or a .gguf file)")
    return text


@contextlib.contextmanager
def loading(key: str, source: str | os.PathLike) -> Iterator[None]:
    """Name `key` (as check_source does) in a load failure inside the block: a ConfigError gets the key in front,
    and an OSError or ValueError from transformers (raised by a loader selfalign does not wrap, such as
    AutoConfig.from_pretrained) becomes a ModelLoadError naming the key and the source."""
    try:
        yield
    except ConfigError as e:
        if str(e).startswith(f"{key}:"):
            raise
        raise type(e)(f"{key}: {e}") from e
    except (OSError, ValueError) as e:  # transformers raises both for unusable paths and names
        where = Path(os.path.expanduser(str(source)))
        raise ModelLoadError(f"{key}: {source}: cannot load ({_first_line(e)})"
                             f"{_hub_hint(where if where.exists() else str(source))}") from e


def _gguf_args(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"{path}: loading a .gguf model needs the gguf package: pip install gguf "
                             "(or bash scripts/setup.sh real)") from None
    return str(path.parent), {"gguf_file": path.name}


def _hub_hint(where: Path | str) -> str:
    return "" if isinstance(where, Path) else \
        "; not a local path, and not in the Hugging Face cache (HF_HOME): download it there first, or give a directory"


def load_tokenizer(source: str | os.PathLike):
    """AutoTokenizer.from_pretrained for a directory, hub name or .gguf file."""
    from transformers import AutoTokenizer

    where = check_source(source)
    name, kwargs = _gguf_args(where) if isinstance(where, Path) and is_gguf(where) else (str(where), {})
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for unreadable sources
        raise ModelLoadError(f"{source}: cannot load a tokenizer ({_first_line(e)}){_hub_hint(where)}") from None


@contextlib.contextmanager
def whole_weights() -> Iterator[None]:
    """Build models with whole weights even while a DeepSpeed ZeRO-3 config is active.

    Under `accelerate launch` with a ZeRO-3 config, transformers partitions every model that
    from_pretrained / from_config builds (deepspeed.zero.Init), so a model loaded to generate or
    evaluate from on one process has empty weights ("'weight' must be 2-D", seen on an H200).
    selfalign shards the models it trains itself, in accelerator.prepare (DeepSpeed partitions a
    whole model there), so it loads every model whole: at a cost of one full copy per process
    in host memory while loading.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # transformers without its DeepSpeed integration module
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_model(source: str | os.PathLike, dtype: torch.dtype = torch.float32, auto_class: Any = None, **kwargs: Any):
    """`auto_class.from_pretrained(source, dtype=dtype)` (default AutoModelForCausalLM) for a directory, hub
    name or .gguf file; a GGUF model comes back as a plain (serializable) model of the same weights.
    Weights are whole even under ZeRO-3 (see whole_weights)."""
    with whole_weights():
        return _load_model(source, dtype, auto_class, **kwargs)


def _load_model(source: str | os.PathLike, dtype: torch.dtype, auto_class: Any, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    auto_class = auto_class or AutoModelForCausalLM
    where = check_source(source)
    if isinstance(where, Path) and is_gguf(where):
        name, gguf_kwargs = _gguf_args(where)
        try:
            loaded = auto_class.from_pretrained(name, dtype=dtype, **gguf_kwargs, **kwargs)
        except Exception as e:
            raise ModelLoadError(f"{where}: not a GGUF model transformers can read ({_first_line(e)})") from None
        return _plain_copy(loaded, auto_class, dtype)
    try:
        return auto_class.from_pretrained(str(where), dtype=dtype, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"{source}: cannot load a model ({_first_line(e)}){_hub_hint(where)}") from None


def load_causal_lm(source: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs: Any):
    """A causal LM from a directory, hub name or .gguf file (see load_model).

    A LoRA adapter directory (peft's save_pretrained output, as LoRA runs save their iterates)
    loads as its base model with the adapter merged in: a plain model of the iterate's weights.
    The base may itself be an adapter directory (an iterate trained on the previous one), so
    the chain is merged one adapter at a time and one full model is held throughout.
    """
    if is_adapter_dir(source):
        from peft import PeftModel

        base = load_causal_lm(adapter_base(source), dtype=dtype, **kwargs)
        try:
            merged = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
        except Exception as e:
            raise ModelLoadError(f"{source}: cannot load the LoRA adapter ({_first_line(e)})") from None
        merged.config._name_or_path = str(source)
        return merged
    return load_model(source, dtype=dtype, **kwargs)


def _plain_copy(model, auto_class: Any, dtype: torch.dtype):
    """The same weights in a model transformers will save: built from the config, without the GGUF quantizer."""
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = auto_class.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # Tied output embeddings are absent from a tied model's state dict on one side or the other.
    missing = [k for k in missing if k not in _tied_keys(plain)]
    if missing or unexpected:
        raise ModelLoadError(f"rebuilding the GGUF model as a plain one failed: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    plain.eval()
    return plain


def _tied_keys(model) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {k for k in model.state_dict() if k.startswith("lm_head.")}


def materialize(source: str | os.PathLike, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Save a .gguf model (and its tokenizer) as a safetensors directory at `directory`, once; returns it.

    A directory or hub name is returned unchanged: only GGUF pays to be converted, since
    every later load of a GGUF file dequantises it again.
    """
    where = check_source(source)
    if not (isinstance(where, Path) and is_gguf(where)):
        return Path(where) if isinstance(where, Path) else Path(str(where))
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = load_causal_lm(where)
    model.save_pretrained(tmp)
    (tokenizer or load_tokenizer(where)).save_pretrained(tmp)
    directory.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, directory)
    return directory
