"""The trainer's runner runs training commands: it refuses the network without a token."""

from __future__ import annotations

import os
import subprocess
import sys


def test_runner_refuses_to_listen_beyond_loopback_without_a_token() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rolecast", "runner", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ROLECAST_RUNNER_TOKEN": ""},
    )
    assert out.returncode == 2
    assert "ROLECAST_RUNNER_TOKEN" in out.stderr and "Traceback" not in out.stderr
