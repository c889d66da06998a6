"""Fixtures shared by the test modules (the Hypothesis profiles are in the repository's conftest.py)."""

from __future__ import annotations

import pytest

from tests.sharded_runner import ShardedRunner


@pytest.fixture(scope="module")
def sharded_runner():
    """A 2-rank gloo group for the sharded path (tests/sharded_runner.py), started by the first test
    of the module that uses it and stopped at the end of the module, so no worker outlives it."""
    runner = ShardedRunner()
    try:
        yield runner
    finally:
        runner.close()
