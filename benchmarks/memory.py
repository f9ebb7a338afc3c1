"""Peak memory: each configuration runs again in a fresh subprocess (``probe_memory_in_subprocess``, whose entry
point is ``probe_main``), so no earlier row's buffers or caches count. Accelerators:
``memory_stats()["peak_bytes_in_use"]``. CPU (where memory_stats is None): the peak RSS (VmHWM) of the measured
call, after compilation and one warm-up call, with the high-water mark reset through ``/proc/self/clear_refs`` and
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so freed buffers leave the RSS; reported as growth over
the RSS before the call, beside the whole process's peak. Without clear_refs it falls back to ``ru_maxrss``
(lifetime peak, compilation included) and says so.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import resource
import subprocess
import sys
from typing import Any, Callable

import jax

from benchmarks.config import BenchmarkConfig
from benchmarks.measure import block_until_ready
from benchmarks.workbench import Workbench

def _current_rss() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # 5: reset the peak RSS (Linux >= 4.0)
    return True
  except OSError:
    return False


def measure_peak_memory(run: Callable[[], Any]) -> dict:
  """Peak memory of one call of ``run`` in this process (see the module docstring for the method)."""
  gc.collect()
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    before = stats.get("bytes_in_use", 0)
    block_until_ready(run())
    peak = device.memory_stats()["peak_bytes_in_use"]
    return {"method": "memory_stats peak_bytes_in_use", "growth_bytes": int(peak - before), "peak_bytes": int(peak)}
  if os.path.exists("/proc/self/statm") and _reset_hwm():
    before = _current_rss()
    block_until_ready(run())
    peak = _hwm()
    return {"method": "VmHWM after clear_refs reset (CPU RSS)", "growth_bytes": int(peak - before),
            "peak_bytes": int(peak)}
  scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
  block_until_ready(run())
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
  return {"method": "ru_maxrss (lifetime peak, compilation included)", "growth_bytes": int(peak - before),
          "peak_bytes": int(peak)}


def probe_memory_in_subprocess(config: BenchmarkConfig, case_id: str, timeout: float = 600.0) -> dict:
  """Runs ``case_id`` in a fresh Python process: build, compile, one warm-up call, then the measured call."""
  env = dict(os.environ)
  env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # fixed threshold: big buffers are mmapped and unmapped when freed
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ is beside scoresmooth_jax/
  env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
  code = "import sys; from benchmarks import memory; memory.probe_main(sys.argv[1], sys.argv[2])"
  try:
    done = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(config)), case_id],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=repo_root)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
  if done.returncode != 0 or not lines:
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: {' | '.join(tail)}"}
  return json.loads(lines[-1])


def probe_main(config_json: str, case_id: str) -> None:
  """Entry point of the memory subprocess: prints one JSON line."""
  config = BenchmarkConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(config_json).items()})
  bench = Workbench(config, calibrate=False, measure_flops=False)
  case = bench.case(case_id)
  block_until_ready(case.warmup())
  result = measure_peak_memory(case.run)
  print(json.dumps({**result, "devices": jax.device_count()}), flush=True)
