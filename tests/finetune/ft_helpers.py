"""Dialogue rows made in the tests."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def dialogue(i: int, turns: int = 2) -> dict:
    conv = [{"from": "system", "value": "你是凉宫春日。"}]
    for t in range(turns):
        conv.append({"from": "human", "value": f"阿虚: 「第{i}个问题，第{t}轮？」"})
        conv.append(
            {"from": "gpt", "value": f"无聊！第{i}号回答{t}：去找外星人吧。" + "快点" * (i % 5)}
        )
    return {"id": f"row_{i}", "conversations": conv}
