"""Shared pytest setup: hypothesis profiles, import paths, and a hard check that the oracle is present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "fixtures"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# "ci": derandomized so a CI failure reproduces locally with HYPOTHESIS_PROFILE=ci; "dev": random, more examples.
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def oracle():
    """The llama.cpp oracle module (tests/oracle.py); importing it fails loudly if llama-cpp-python is missing."""
    import oracle as _oracle

    _oracle.ggml()
    return _oracle


@pytest.fixture(scope="session")
def example_model() -> Path:
    return REPO / "fixtures" / "tiny-llama-f16.gguf"
