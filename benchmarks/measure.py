"""Timing and cost of compiled calls: every variant is compiled and run once first; then the variants compared with
each other run interleaved (A, B, C, A, B, C, ...) ``repeats`` times, and rows report the median with its spread
(max - min) / median, since the machine may be shared and interleaving keeps ratios fair while speed drifts. Also
the other processes' CPU use during each call, and XLA's cost analysis (FLOPs, bytes) of a compiled program.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from benchmarks import library_flops


def block_until_ready(out):
  """Waits for ``out``'s arrays (JAX dispatches asynchronously); anything else (e.g. PyTorch's) passes through."""
  return jax.block_until_ready(out) if any(isinstance(x, jax.Array) for x in jax.tree.leaves(out)) else out


def _cpu_busy_seconds() -> float | None:
  """Core-seconds all CPUs have spent busy since boot (/proc/stat), or None where there is no /proc/stat."""
  try:
    with open("/proc/stat") as f:
      ticks = [int(x) for x in f.readline().split()[1:]]
  except OSError:
    return None
  return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_cpu_seconds() -> float:
  times = os.times()
  return times.user + times.system + times.children_user + times.children_system


@dataclasses.dataclass
class Timing:
  """Interleaved timings: seconds per call, the last outputs, and how many cores other processes kept busy
  during each call (None where /proc/stat is missing): the contention each measurement saw."""

  seconds: dict
  outputs: dict
  others_cores: dict


UNCONTENDED_CORES = 0.25  # a call during which other processes used less than this counts as uncontended


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> Timing:
  """Runs each function once, then A, B, C, A, B, C, ... ``repeats`` times, timing every call."""
  outputs = {name: block_until_ready(fn()) for name, fn in fns.items()}
  seconds = {name: [] for name in fns}
  others = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      busy, own, start = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
      outputs[name] = block_until_ready(fn())
      wall = time.perf_counter() - start
      seconds[name].append(wall)
      if busy is not None:
        others[name].append(max(0.0, (_cpu_busy_seconds() - busy) - (_own_cpu_seconds() - own)) / wall)
  return Timing(seconds, outputs, {k: (v or None) for k, v in others.items()})


def median(values) -> float:
  """The median of ``values``, in float64."""
  return float(np.median(np.asarray(values, np.float64)))


def spread(values) -> float:
  """(max - min) / median of ``values``: how much the interleaved calls of one row varied."""
  values = np.asarray(values, np.float64)
  return float((values.max() - values.min()) / np.median(values))


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def compiled_flops(compiled) -> float:
  """XLA's cost-analysis FLOPs plus those of the oneDNN convolutions it cannot see (``library_flops``)."""
  flops = float(_cost(compiled).get("flops", float("nan")))
  return flops + library_flops.onednn_convolution_flops(compiled.as_text())


def compiled_memory_bytes(compiled) -> int | None:
  """XLA's estimate of a compiled program's memory: arguments + outputs + temporaries - aliased (None if unknown)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)
