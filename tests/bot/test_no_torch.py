"""The bot process is an HTTP client: importing its side of the CLI must not load torch."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "accelerate")


def test_bot_side_imports_no_ml_libraries() -> None:
    code = (
        "import sys, rolecast.cli, bot.terminal.chat, bot.core.chat, formats.registry, formats.basemodel;"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
