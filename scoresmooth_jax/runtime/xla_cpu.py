"""The XLA:CPU flags the command-line scripts run with, set before JAX starts its backend.

XLA reads ``XLA_FLAGS`` once, when the first computation creates the backend; a flag set after that does nothing.
So each script calls ``apply_recommended_cpu_flags()`` first thing in ``main``, and library code never touches
``XLA_FLAGS``: a user's own process chooses its own flags.

Promises:
  * ``RECOMMENDED_CPU_XLA_FLAGS`` lets YNNPACK take the elementwise ops after a convolution (bias add, ReLU,
    residual add) into one subgraph with it. Only XLA:CPU's compiler reads it.
  * ``with_recommended_cpu_flags(xla_flags)`` returns ``xla_flags`` with the recommended flags appended. If
    ``xla_flags`` already sets ``xla_cpu_experimental_ynn_fusion_type``, the user's choice stands and the string is
    returned unchanged.
  * ``apply_recommended_cpu_flags(environ)`` does the same to ``environ["XLA_FLAGS"]`` (``os.environ`` by default)
    and returns the new value.
  * ``xla_cpu_threads()`` is the number of threads XLA:CPU computes with in this process.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# With this flag, XLA:CPU (jax 0.10.2) runs a convolution and the elementwise ops after it (bias add, ReLU, residual
# add) as one YNNPACK subgraph. Measured on the 2-core AVX-512 machines, alternating processes with and without it:
# the BatchNorm-folded ResNet-110 forward at batch 64 went from 175-177 to 262-283 samples/s, the ScoreUNet DSM
# training step from 60 to 78, and the ResNet-20 training step stayed at 246-269. Logits and gradients agree to
# float rounding (tests/test_xla_cpu.py). Tried and not better: oneDNN (xla_cpu_use_onednn), XNNPACK fusions, Eigen
# convolutions (YNNPACK off), 512-bit vectors.
_YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
RECOMMENDED_CPU_XLA_FLAGS = f"{_YNN_FUSION_FLAG}=+eltwise"


def with_recommended_cpu_flags(xla_flags: str) -> str:
  """``xla_flags`` plus ``RECOMMENDED_CPU_XLA_FLAGS``, unless it already chooses the YNNPACK fusion types."""
  if any(flag.split("=", 1)[0] == _YNN_FUSION_FLAG for flag in xla_flags.split()):
    return xla_flags
  return " ".join(part for part in (xla_flags.strip(), RECOMMENDED_CPU_XLA_FLAGS) if part)


def apply_recommended_cpu_flags(environ: MutableMapping[str, str] | None = None) -> str:
  """Sets ``environ["XLA_FLAGS"]`` to ``with_recommended_cpu_flags`` of its value; call before any JAX computation.

  To run a script with XLA's own defaults instead, set the flag yourself, e.g.
  ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-eltwise``.
  """
  environ = os.environ if environ is None else environ
  environ["XLA_FLAGS"] = with_recommended_cpu_flags(environ.get("XLA_FLAGS", ""))
  return environ["XLA_FLAGS"]


def xla_cpu_threads() -> int:
  """Threads XLA:CPU computes with: its pool has one per CPU this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # no sched_getaffinity (macOS)
    return os.cpu_count() or 1
