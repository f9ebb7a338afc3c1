"""The dense bfloat16 peak of an accelerator, by its device kind, and the model FLOP utilisation (MFU) against it.

MFU = achieved FLOP/s / the chip's dense bfloat16 tensor-core peak. Every row is divided by the same bfloat16 peak,
float32 rows included, so the figures compare how much of the chip each configuration uses: a float32 row cannot
reach 1 (its TF32 / float32 peak is lower), and the FLOPs are those of the networks (XLA's count), not of the
kernels that ran them.

Promises:
  * ``dense_bf16_peak_tflops(device_kind)`` is the vendor's dense (no structured sparsity) bfloat16 figure for the
    NVIDIA H100 / H200 / A100 families and TPU v4 / v5e / v5p / v6e, matched on the kind string JAX and PyTorch
    report ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "TPU v5 lite", ...), else None.
  * ``mfu(flops_per_draw, draws_per_s, peak_tflops)`` is None when any input is missing or not finite.
"""

from __future__ import annotations

import math

# (all of these substrings in the upper-cased device kind, dense bfloat16 TFLOP/s); the first match wins, so the
# more specific entries come first. NVIDIA datasheets give the figure with 2:4 sparsity; dense is half of it.
PEAKS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200", "NVL"), 835.0),   # H200 NVL: 1,671 TFLOPS sparse
    (("H200",), 989.0),         # H200 SXM (and GH200): 1,979 sparse
    (("H100", "NVL"), 835.0),   # H100 NVL: 1,671 sparse
    (("H100", "PCIE"), 756.0),  # H100 PCIe: 1,513 sparse
    (("H100",), 989.0),         # H100 SXM5 ("H100 80GB HBM3"): 1,979 sparse
    (("A100",), 312.0),         # A100 SXM4 / PCIe, 40 and 80 GB: 312 dense
    (("TPU V6",), 918.0),       # Trillium (v6e)
    (("TPU V5 LITE",), 197.0),  # v5e
    (("TPU V5",), 459.0),       # v5p
    (("TPU V4",), 275.0),
)


def dense_bf16_peak_tflops(device_kind: str | None) -> float | None:
  """The device's dense bfloat16 peak in TFLOP/s, or None for a kind not in ``PEAKS`` (a CPU, another GPU)."""
  kind = (device_kind or "").upper()
  for parts, peak in PEAKS:
    if all(part in kind for part in parts):
      return peak
  return None


def achieved_tflops(flops_per_draw: float | None, draws_per_s: float | None) -> float | None:
  """FLOPs per draw x draws per second, in TFLOP/s (None when either is missing or not finite)."""
  if flops_per_draw is None or draws_per_s is None:
    return None
  value = float(flops_per_draw) * float(draws_per_s) / 1e12
  return value if math.isfinite(value) else None


def mfu(flops_per_draw: float | None, draws_per_s: float | None, peak_tflops: float | None) -> float | None:
  """Achieved TFLOP/s over ``peak_tflops`` (module docstring), or None."""
  achieved = achieved_tflops(flops_per_draw, draws_per_s)
  if achieved is None or not peak_tflops:
    return None
  return achieved / float(peak_tflops)
