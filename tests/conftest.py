"""Shared test configuration: Hypothesis profiles and small helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import HealthCheck, settings

VECTORS = Path(__file__).parent / "vectors"

settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def load_vectors(name: str) -> dict:  # type: ignore[type-arg]
    with open(VECTORS / name) as f:
        return json.load(f)
