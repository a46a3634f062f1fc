"""Shared pytest setup: hypothesis profiles, import paths, and a hard check that the oracle is present.

Hypothesis in CI (``CI`` set, or ``HYPOTHESIS_PROFILE=ci``) explores *and* reproduces:

* the seed is the current commit (the first 8 hex digits of ``git rev-parse HEAD``), so every commit tries
  new inputs while a failure replays exactly on the same commit; the header of the pytest output prints it,
  and ``HYPOTHESIS_SEED=<n>`` (or ``--hypothesis-seed``) replays any run anywhere;
* the codec and container properties run more examples than their decorators ask for locally: at least
  :data:`CI_MIN_EXAMPLES` for a single property, :data:`CI_PARAM_SCALE` times as many per case for one
  parametrized over the type table (which multiplies its examples already).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "fixtures"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile(
    "ci", derandomize=False, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
settings.load_profile(PROFILE)

CI_MIN_EXAMPLES = 300
CI_PARAM_SCALE = 2
# test files whose properties get the CI budget (the convert properties run a whole conversion per example)
CI_PROPERTY_FILES = ("test_codec", "test_writer", "test_reader", "test_model_plan", "test_roundtrip")


def _commit_seed() -> int:
    if os.environ.get("HYPOTHESIS_SEED"):
        return int(os.environ["HYPOTHESIS_SEED"])
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        return int(head[:8], 16)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0  # not a git checkout: still reproducible


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # before hypothesis' own pytest_configure, which reads --hypothesis-seed
    if PROFILE == "ci" and config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(_commit_seed())


def pytest_report_header(config):
    if PROFILE != "ci":
        return f"hypothesis profile {PROFILE!r} (random inputs; CI=1 for CI's reproducible budget)"
    return (f"hypothesis profile 'ci', seed {config.getoption('hypothesis_seed', None)} "
            f"(replay: CI=1 HYPOTHESIS_SEED=<seed>)")


def pytest_collection_modifyitems(config, items):
    if PROFILE != "ci":
        return
    done = set()
    for item in items:
        fn = getattr(item, "obj", None)
        inner = getattr(fn, "hypothesis", None)
        if inner is None or id(fn) in done or not item.path.name.startswith(CI_PROPERTY_FILES):
            continue
        done.add(id(fn))
        # @given reads this attribute when the test runs; @settings(...) on the test stored it there
        current = getattr(fn, "_hypothesis_internal_use_settings", None) or settings.default
        wanted = (current.max_examples * CI_PARAM_SCALE if getattr(item, "callspec", None) is not None
                  else max(current.max_examples, CI_MIN_EXAMPLES))
        fn._hypothesis_internal_use_settings = settings(current, max_examples=wanted)


@pytest.fixture(scope="session")
def oracle():
    """The llama.cpp oracle module (tests/oracle.py); importing it fails loudly if llama-cpp-python is missing."""
    import oracle as _oracle

    _oracle.ggml()
    return _oracle


@pytest.fixture(scope="session")
def example_model() -> Path:
    return REPO / "fixtures" / "tiny-llama-f16.gguf"


@pytest.fixture(scope="session")
def example_hessians(example_model, tmp_path_factory, oracle) -> Path:
    """The example model's full input covariances (gguf-kquant hessian) over 3 chunks of 64 random tokens."""
    import numpy as np

    from gguf_kquant.model.hessian import collect_hessians

    out = tmp_path_factory.mktemp("hessians") / "tiny.hessian.gguf"
    tokens = np.random.default_rng(11).integers(3, 1024, 3 * 64)
    collect_hessians(example_model, tokens, out, ctx=64, threads=1, quiet=True)
    collect_hessians(example_model, tokens, out.with_suffix(".matrices.gguf"), ctx=64, threads=1, quiet=True,
                     factor=False)  # the same, holding H itself: example_hessian_matrices
    return out


@pytest.fixture(scope="session")
def example_hessian_matrices(example_hessians) -> Path:
    """example_hessians' collection stored as the matrices H themselves (``factor=False``)."""
    return example_hessians.with_suffix(".matrices.gguf")
