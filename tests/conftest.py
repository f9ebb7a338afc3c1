"""Test set-up: 8 simulated CPU devices, so every sharded path runs as it would on an 8-chip host."""

import os
import pathlib

import jax
import pytest

# Must happen before JAX creates its CPU backend; scripts/test.sh also exports it for subprocesses.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """../shared/fixtures beside the project; tests that need it skip with a reason when it is absent."""
  path = pathlib.Path(os.environ.get("SCORESMOOTH_FIXTURES", FIXTURES)).resolve()
  if not path.is_dir():
    pytest.skip(f"real fixtures not found at {path} (set SCORESMOOTH_FIXTURES)")
  return path
