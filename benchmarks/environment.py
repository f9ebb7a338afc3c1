"""Where a benchmark runs: the JAX backend and devices, the versions, XLA_FLAGS, the threads XLA:CPU computes with,
and whether the CPU has native bfloat16 arithmetic. Recorded with every run's results.
"""

from __future__ import annotations

import os
import platform

import jax

from benchmarks import torch_baseline
from scoresmooth_jax.runtime.xla_cpu import xla_cpu_threads


def cpu_features() -> dict:
  """Whether this CPU has native bfloat16 arithmetic (AVX-512 BF16 dot products, AMX tiles)."""
  flags: set[str] = set()
  model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
        elif line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return {"model": model, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
          "amx_bf16": "amx_bf16" in flags}


def environment() -> dict:
  device = jax.devices()[0]
  info = {"backend": jax.default_backend(), "device_kind": device.device_kind, "devices": jax.device_count(),
          "jax": jax.__version__, "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "xla_cpu_threads": xla_cpu_threads() if device.platform == "cpu" else None, "cpu": cpu_features()}
  try:
    torch = torch_baseline.import_torch()
    info["torch"] = torch.__version__
  except ImportError:
    info["torch"] = None
  return info
