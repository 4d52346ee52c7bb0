"""Dialogue rows as the training side reads them, and LLaMA-Factory's `dataset_info.json`.

Two row shapes, as LLaMA-Factory reads them:

- ShareGPT: ``{"id": ..., "conversations": [{"from": "system"|"human"|"gpt", "value": ...}]}``
  (an optional top-level ``"system"`` string is accepted too);
- OpenAI: ``{"id": ..., "messages": [{"role": "system"|"user"|"assistant", "content": ...}]}``.

In memory a dialogue is a list of OpenAI-style ``{"role", "content"}`` messages, which is what a
tokenizer's chat template takes. The bot writes ShareGPT rows (`bot.core.export`), the training
side reads both shapes and writes ShareGPT (`finetune.data`); both write `dataset_info.json` so
LLaMA-Factory can train on the files as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from formats.jsonfile import replacing

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLE_ALIASES = {
    "system": SYSTEM,
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
}
SHAREGPT_ROLES = {SYSTEM: "system", USER: "human", ASSISTANT: "gpt"}
DATASET_INFO = "dataset_info.json"

Message = dict[str, str]


def read_messages(obj: Any) -> tuple[list[Message] | None, list[tuple[str, str]]]:
    """A row of either shape as OpenAI-style messages, and what is wrong with it as
    `(code, message)` pairs. Turns that cannot be read are left out and reported; a row that is
    not a dialogue at all gives no messages (None)."""
    if not isinstance(obj, dict):
        return None, [("bad_format", "row is not a JSON object")]
    if isinstance(obj.get("conversations"), list):
        turns, role_key, text_key = obj["conversations"], "from", "value"
    elif isinstance(obj.get("messages"), list):
        turns, role_key, text_key = obj["messages"], "role", "content"
    else:
        return None, [("bad_format", "no 'conversations' or 'messages' list")]

    messages: list[Message] = []
    problems: list[tuple[str, str]] = []
    top_system = obj.get("system")
    if isinstance(top_system, str) and top_system.strip():
        messages.append({"role": SYSTEM, "content": top_system})
    elif top_system is not None and not isinstance(top_system, str):
        problems.append(("bad_format", "the top-level 'system' is not a string"))
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            problems.append(("bad_format", f"turn {number} has no '{role_key}'/'{text_key}'"))
            continue
        role = ROLE_ALIASES.get(str(turn[role_key]))
        if role is None:
            problems.append(("unknown_role", f"turn {number} has role {turn[role_key]!r}"))
            continue
        text = turn[text_key]
        if not isinstance(text, str):
            problems.append(("bad_format", f"turn {number} text is not a string"))
            continue
        messages.append({"role": role, "content": text})
    return messages, problems


def row_id(obj: Any, fallback: str) -> str:
    """A row's own id: a non-blank string or a number; else (missing, null, empty, a list...)
    `fallback`, its place in the file, so rows without ids are not duplicates of one another."""
    found = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(found, str) and found.strip():
        return found
    if isinstance(found, int | float) and not isinstance(found, bool):
        return str(found)
    return fallback


def sharegpt_row(row_id: str, messages: Sequence[Message]) -> dict[str, Any]:
    """OpenAI-style messages as one ShareGPT row."""
    return {
        "id": row_id,
        "conversations": [
            {"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages
        ],
    }


def openai_row(row_id: str, messages: Sequence[Message]) -> dict[str, Any]:
    """OpenAI-style messages as one OpenAI row."""
    return {
        "id": row_id,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
    }


# Line breaks to str.splitlines (and JavaScript) that json.dumps leaves raw in strings.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def jsonl_line(row: dict[str, Any]) -> str:
    """One row as a JSONL line (UTF-8 text kept readable, no line break of any kind inside)."""
    return json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


class DatasetEntry(BaseModel):
    """One entry of LLaMA-Factory's `dataset_info.json`, for a ShareGPT JSONL file."""

    model_config = ConfigDict(extra="allow")

    file_name: str
    formatting: str = "sharegpt"
    columns: dict[str, str] = Field(default_factory=lambda: {"messages": "conversations"})
    tags: dict[str, str] = Field(
        default_factory=lambda: {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": SHAREGPT_ROLES[USER],
            "assistant_tag": SHAREGPT_ROLES[ASSISTANT],
            "system_tag": SHAREGPT_ROLES[SYSTEM],
        }
    )


_DATASET_INFO = TypeAdapter(dict[str, DatasetEntry])


def dataset_info(files: Mapping[str, str]) -> dict[str, Any]:
    """`dataset_info.json` for ShareGPT files: dataset name -> file name (beside the json)."""
    return {name: DatasetEntry(file_name=file).model_dump() for name, file in files.items()}


def dataset_info_bytes(files: Mapping[str, str]) -> bytes:
    return (json.dumps(dataset_info(files), ensure_ascii=False, indent=2) + "\n").encode()


def write_dataset_info(directory: str | Path, files: Mapping[str, str]) -> Path:
    """Write `dataset_info.json` into `directory`, where the files it names are."""
    path = Path(directory) / DATASET_INFO
    with replacing(path) as f:
        f.write(dataset_info_bytes(files).decode())
    return path


def read_dataset_info(path: str | Path) -> dict[str, DatasetEntry]:
    """The entries of a `dataset_info.json` (ValueError when it is not one)."""
    return _DATASET_INFO.validate_json(Path(path).read_bytes())
