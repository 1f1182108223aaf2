"""Model and reward-model paths checked before a run starts, and load errors turned into one line.

transformers reports a misspelt directory as "Repo id must be in the form ...", a folder with
no config.json as a tokenizer-backend error, and an uncached hub name as a connection
failure, each as a traceback. These checks name the config key, the path and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import ConfigError
from .data import DataError

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_pretrained(key: str, path: str | Path) -> None:
    """ConfigError unless `path` is a saved model directory (config.json and weights) or looks like a hub name.

    A hub name is left to from_pretrained (it may be in the local cache); see `loading`.
    """
    text = str(path)
    if text.endswith(".gguf"):
        return  # GGUF files are read by their own loader
    p = Path(text).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{key}: '{text}' is a file, not a model directory (one written by save_pretrained, "
                              "with config.json)")
        if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
            return  # a LoRA adapter (an iterate of a LoRA run): load_causal_lm merges it into its base
        if not (p / "config.json").is_file():
            raise ConfigError(f"{key}: '{text}' has no config.json, so it is not a saved model (give the directory "
                              "save_pretrained wrote, or a hub name such as org/name)")
        if not any(next(p.glob(pattern), None) for pattern in WEIGHTS):
            raise ConfigError(f"{key}: '{text}' has a config.json but no weights (*.safetensors or *.bin)")
        return
    if not HUB_NAME.fullmatch(text):
        raise ConfigError(f"{key}: no directory '{text}' (check the path; a hub name looks like org/name)")


@contextmanager
def loading(key: str, path: str | Path) -> Iterator[None]:
    """Turn a from_pretrained failure inside the block into ConfigError('key: cannot load PATH (reason)')."""
    try:
        yield
    except ConfigError as e:
        if str(e).startswith(f"{key}:"):
            raise
        # The loader names the path but not the key it came from (judge.reward_model, eval.reward_model, ...).
        raise type(e)(f"{key}: {e}") from e
    except DataError:
        raise
    except (OSError, ValueError) as e:  # transformers raises both for unusable paths and names
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        reason = lines[0][:240] if lines else type(e).__name__
        hint = "" if Path(str(path)).expanduser().exists() else \
            "; not a local directory, and not in the Hugging Face cache (HF_HOME) or reachable"
        raise ConfigError(f"{key}: cannot load '{path}' ({reason}){hint}") from e
