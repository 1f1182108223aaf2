"""Preference and prompt data: rows (read by selfalign.sources) checked field by field, chat templates, tokenization.

Rows are `{"prompt": ..., "chosen": ..., "rejected": ...}` where each value is plain text or
a list of chat messages (`[{"role": "user", "content": "..."}]`). Column names are
configurable. A conversational prompt is rendered with the tokenizer's chat template and a
generation prompt; a response given as messages contributes its assistant content.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import faults
from .config import field
from .judges import Prompt
from .records import PreferenceExample
from .sources import DataError, chat_prompt, read_jsonl, read_rows
from .tokens import response_end_id


@dataclass
class PreferenceDataConfig:
    """Where the preference pairs come from and how they are read."""

    path: str = field("", help="Preference rows (prompt, chosen, rejected): a JSONL/JSON/Parquet/Arrow file, a "
                               "save_to_disk folder or a Hugging Face dataset name (selfalign.sources).")
    split: str = field("", help="Split of a source with several (e.g. train_prefs); empty: its only split, or train.")
    subset: str = field("", help="Configuration (subset) of a Hub dataset that has several; empty: the default.")
    prompt_field: str = field("prompt", help="Column holding the prompt (text or chat messages).")
    chosen_field: str = field("chosen", help="Column holding the preferred response.")
    rejected_field: str = field("rejected", help="Column holding the dispreferred response.")
    max_prompt_tokens: int = field(512, help="Prompts longer than this are an error (fix the data or raise it).")
    max_response_tokens: int = field(512, help="Responses longer than this are truncated to it.")
    eval_fraction: float = field(0.1, help="Fraction of rows held out to measure preference accuracy.")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file, fsync it, rename it over `path`: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    faults.before_rename()
    os.replace(tmp, path)
    faults.after_write(path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in value)


def text_or_messages(
    row: dict[str, Any], name: str, where: str, hint: str = "set the column name in the data config if it differs"
) -> Any:
    """row[name] if it is non-empty text or a non-empty message list; DataError naming where otherwise."""
    if name not in row:
        raise DataError(f"{where}: missing field '{name}' ({hint})")
    value = row[name]
    if isinstance(value, str) and value.strip():
        return value
    if _is_messages(value) and value:
        return value
    raise DataError(f"{where}: field '{name}' must be non-empty text or a list of {{role, content}} messages")


def prompt_ids(tokenizer, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt: chat template with generation prompt for messages, plain encoding for text."""
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the prompt is a list of chat messages but the tokenizer has no chat template "
                            "(give prompts as plain text, or use a model whose tokenizer has a chat_template)")
        from jinja2 import TemplateError

        try:
            return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
        except TemplateError as e:  # the template's raise_exception(), or a role it cannot render
            raise DataError(_template_refusal(tokenizer, prompt, e)) from e
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def batch_prompt_ids(tokenizer, prompts: list[str | list[dict[str, str]]]) -> list[list[int]]:
    """prompt_ids of every prompt, the chat ones through one batched apply_chat_template call and the text ones
    through one batched encode (the same ids: one template render and one encode each). Calling per prompt
    cost ~1 ms of overhead a prompt, 3 of the tiny loop's 8 seconds. Any failure is left to the caller, which
    finds the row by encoding one at a time."""
    out: list[list[int]] = [[] for _ in prompts]
    chats = [i for i, p in enumerate(prompts) if isinstance(p, list)]
    texts = [i for i, p in enumerate(prompts) if not isinstance(p, list)]
    if chats:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("chat prompts without a chat template")
        ids = tokenizer.apply_chat_template([prompts[i] for i in chats], add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        for i, row in zip(chats, ids, strict=True):
            out[i] = list(row)
    if texts:
        ids = tokenizer([prompts[i] for i in texts], add_special_tokens=True)["input_ids"]
        for i, row in zip(texts, ids, strict=True):
            out[i] = list(row)
    return out


def _template_refusal(tokenizer, messages: list[dict[str, str]], error: Exception) -> str:
    """What the chat template refused: the first message whose conversation so far fails to render (its
    position and role), else the roles of the whole conversation; the template's own words follow."""
    from jinja2 import TemplateError

    which = "the conversation (roles " + ", ".join(repr(m["role"]) for m in messages) + ")"
    for i in range(1, len(messages) + 1):
        try:
            tokenizer.apply_chat_template(messages[:i], add_generation_prompt=False, tokenize=False)
        except TemplateError:
            which = f"message {i} (role {messages[i - 1]['role']!r})"
            break
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return (f"the tokenizer's chat template rejects {which}: {reason} (use the roles and order its template "
            "accepts, e.g. system first, then user and assistant alternating)")


def located(where: str, fn, *args: Any) -> Any:
    """fn(*args), with a location-free DataError from it prefixed by `where` (file and line)."""
    try:
        return fn(*args)
    except DataError as e:
        raise DataError(f"{where}: {e}") from e


def response_ids(tokenizer, response: str | list[dict[str, str]], end_id: int | None = -1) -> list[int]:
    """Token ids of a response, ending with end_id (default: the tokenizer's EOS; None: nothing added)."""
    if isinstance(response, list):
        response = "".join(m["content"] for m in response if m["role"] == "assistant") or response[-1]["content"]
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    end = tokenizer.eos_token_id if end_id == -1 else end_id
    if end is not None:
        ids = ids + [end]
    return ids


def response_of(row: dict[str, Any], name: str, prompt: Any, where: str) -> str | list[dict[str, str]]:
    """row[name] as a response to `prompt`: its text, or the assistant turns that end its conversation.

    A conversation must end with an assistant answer, and any turns before it must be the prompt's (the
    UltraFeedback shape repeats them); otherwise the row would train on the prompt's own text as the
    response, or on an answer to another prompt. DataError naming `where` and the field then."""
    value = text_or_messages(row, name, where)
    if isinstance(value, str):
        return value
    start = len(value)
    while start and value[start - 1]["role"] == "assistant":
        start -= 1
    roles = ", ".join(m["role"] for m in value)
    if start == len(value):
        raise DataError(f"{where}: field '{name}' is a conversation with no assistant answer at its end (roles "
                        f"{roles}): it would train on the prompt's own text; fix the row or drop it")
    before = [(m["role"], m["content"].strip()) for m in value[:start]]
    if before and not (before == [(m["role"], m["content"].strip()) for m in prompt] if isinstance(prompt, list)
                       else ("user", prompt.strip()) in before):
        raise DataError(f"{where}: field '{name}' is a conversation (roles {roles}) whose turns before the answer "
                        "are not the row's prompt: it answers another prompt; fix the row or drop it")
    return value[start:]


def load_preferences(config: PreferenceDataConfig, tokenizer) -> list[PreferenceExample]:
    """Read and tokenize every row of config.path (any selfalign.sources source) into PreferenceExamples; a row
    whose conversations do not fit its prompt (response_of, sources.chat_prompt) is a DataError naming it."""
    examples = []
    ends = {True: response_end_id(tokenizer, chat=True), False: response_end_id(tokenizer, chat=False)}
    for where, row in read_rows(config.path, config.split, config.subset, split_key="data.split"):
        raw_prompt = located(where, chat_prompt, row, text_or_messages(row, config.prompt_field, where),
                             config.chosen_field, tokenizer)
        prompt = located(where, prompt_ids, tokenizer, raw_prompt)
        if len(prompt) > config.max_prompt_tokens:
            raise DataError(
                f"{where}: prompt has {len(prompt)} tokens, over max_prompt_tokens={config.max_prompt_tokens} "
                "(shorten it or raise data.max_prompt_tokens)"
            )
        end = ends[isinstance(raw_prompt, list)]
        chosen = response_ids(tokenizer, response_of(row, config.chosen_field, raw_prompt, where), end)[
            : config.max_response_tokens]
        rejected = response_ids(tokenizer, response_of(row, config.rejected_field, raw_prompt, where), end)[
            : config.max_response_tokens]
        examples.append(PreferenceExample(prompt, chosen, rejected))
    if not examples:
        raise DataError(f"{config.path}: no rows")
    return examples


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl(path)]


def load_prompts(path: str, field_name: str, tokenizer, max_tokens: int, split: str = "", subset: str = "",
                 chosen_field: str = "chosen", split_key: str = "split") -> list[Prompt]:
    """Prompts from any selfalign.sources source; DataError names the file, line (or row) and field of anything unusable."""
    return load_prompt_ids(path, field_name, tokenizer, max_tokens, split, subset, chosen_field, split_key)[0]


def load_prompt_ids(path: str, field_name: str, tokenizer, max_tokens: int, split: str = "", subset: str = "",
                    chosen_field: str = "chosen", split_key: str = "split") -> tuple[list[Prompt], list[list[int]]]:
    """load_prompts and each prompt's token ids, tokenized once (the length check's ids are kept: a chat
    template costs ~0.7 ms a prompt, seconds for a file of thousands)."""
    prompts, places = [], []
    for where, row in read_rows(path, split, subset, split_key=split_key):
        value = text_or_messages(row, field_name, where, hint="set prompt_field=... if the column differs")
        prompts.append(located(where, chat_prompt, row, value, chosen_field, tokenizer))
        places.append(where)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    try:
        ids = batch_prompt_ids(tokenizer, prompts)
    except Exception:  # one prompt the batch could not take: encoded one by one, the first failure names its row
        ids = [located(where, prompt_ids, tokenizer, value) for where, value in zip(places, prompts)]
    for where, tokens in zip(places, ids):
        if len(tokens) > max_tokens:
            raise DataError(f"{where}: prompt has {len(tokens)} tokens, over max_prompt_tokens={max_tokens} "
                            "(shorten it or raise max_prompt_tokens)")
    return prompts, ids
