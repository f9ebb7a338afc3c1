"""Test set-up: 8 simulated CPU devices, so every sharded path runs as it would on an 8-chip host."""

import atexit
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

# Must happen before JAX creates its CPU backend; scripts/test.sh also exports it for subprocesses.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
# Training and certification tests build new closures per run, so jit's in-memory cache cannot help; XLA's
# persistent cache is keyed on the program, so runs that compile identical programs (resume tests, repeated
# configs, the scripts the tests start as subprocesses) compile once per session. A fresh directory per session:
# nothing carries over between CI runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # exported, so the subprocesses share it
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="scoresmooth_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  """../shared/fixtures beside the project; tests that need it skip with a reason when it is absent."""
  path = pathlib.Path(os.environ.get("SCORESMOOTH_FIXTURES", FIXTURES)).resolve()
  if not path.is_dir():
    pytest.skip(f"real fixtures not found at {path} (set SCORESMOOTH_FIXTURES)")
  return path


@pytest.fixture(scope="session")
def ncsnpp_fixture(fixtures_dir):
  """(params, x, sigma, out, score_sde model config) of the small NCSN++ parity fixture."""
  import json

  import numpy as np
  from flax import traverse_util

  path = fixtures_dir / "ncsnpp_small_parity.npz"
  if not path.is_file():
    pytest.skip(f"{path} not found")
  data = np.load(path)
  flat = {tuple(k[len("param:"):].split("/")): data[k] for k in data.files if k.startswith("param:")}
  params = traverse_util.unflatten_dict(flat)["params"]
  config = json.loads((fixtures_dir / "ncsnpp_small_parity_config.json").read_text())
  return params, data["x"], data["sigma"], data["out"], config
