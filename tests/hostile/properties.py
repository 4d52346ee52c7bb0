"""How many cases the property tests run.

Two hypothesis profiles: `hostile` for the default suite (200 cases a property, or
`ROLECAST_HOSTILE_EXAMPLES`), `hostile-10k` for the `slow` runs (10,000 cases a property). Each
property test takes the profile as a parameter, so `pytest -m slow tests/hostile` runs every
property at 10,000 cases and the default run at the small size; `ROLECAST_HOSTILE_PROFILE`
replaces the default run's profile (e.g. `hostile-10k` to run the big size without `-m slow`).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DEFAULT_EXAMPLES = int(os.environ.get("ROLECAST_HOSTILE_EXAMPLES", "200"))
SLOW_EXAMPLES = 10_000

settings.register_profile(
    "hostile",
    max_examples=DEFAULT_EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.large_base_example,
    ],
    print_blob=True,
)
settings.register_profile(
    "hostile-10k", parent=settings.get_profile("hostile"), max_examples=SLOW_EXAMPLES
)

PROFILES = pytest.mark.parametrize(
    "profile",
    [
        pytest.param(os.environ.get("ROLECAST_HOSTILE_PROFILE", "hostile"), id="default"),
        pytest.param("hostile-10k", id="10k", marks=pytest.mark.slow),
    ],
)


_tally: Counter[str] = Counter()


def tally(outcome: str) -> None:
    """Count one case's outcome (printed when the property ends: `pytest -s` shows it)."""
    _tally[outcome] += 1


def run_property(
    profile: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], None]
) -> None:
    """Run `check` on every case `strategy` draws, as many as `profile` says, and print how
    many cases ran and how their outcomes split."""
    _tally.clear()
    cases = Counter[str]()

    def counted(case: Any) -> None:
        cases["run"] += 1
        check(case)

    started = time.monotonic()
    settings(settings.get_profile(profile))(given(strategy)(counted))()
    outcomes = ", ".join(f"{name} {n}" for name, n in _tally.most_common())
    print(f"\n{cases['run']} cases in {time.monotonic() - started:.0f} s, none failed: {outcomes}")
