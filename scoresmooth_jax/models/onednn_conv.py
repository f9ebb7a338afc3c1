"""Convolution + bias (+ residual) (+ ReLU) as one call to the oneDNN convolution kernel inside XLA:CPU.

Why: XLA:CPU (jaxlib 0.10) converts the operands of every bfloat16 convolution to float32 before YNNPACK runs it,
and hands 16-channel convolutions to Eigen, so a bfloat16 ResNet runs at the float32 rate and its first CIFAR stage
at half of it. The same jaxlib also holds oneDNN's convolution as a runtime kernel: custom-call target
``__onednn$convolution``, which XLA's oneDNN rewrite pass would emit but which jaxlib 0.10 never emits for
convolutions. Called through ``jax.ffi`` with its configuration, it keeps bfloat16 in bfloat16 (AVX512-BF16) and
fuses the bias, the residual add and the ReLU into the convolution. Measured on the 2-core AMD EPYC (Zen 4), batch
64, convolution + bias + ReLU, GFLOP/s:

  ==================  ===============  ==================  ================  ===================
  channels @ size     float32, XLA     float32, oneDNN     bfloat16, XLA     bfloat16, oneDNN
  64 @ 8 x 8          202              248                 201               446
  32 @ 16 x 16        189              209                 161               223
  16 @ 32 x 32        89               196                 71                258
  ==================  ===============  ==================  ================  ===================

The target is XLA's internal interface, not a public API, so nothing relies on it unchecked: ``available`` compiles
and runs it once per process and dtype against ``reference_fused_conv`` and says no on any error or mismatch (another
jaxlib, an ARM CPU, a CPU without bfloat16 instructions, a GPU or TPU backend); callers then use ``lax``.

Promises:
  * ``fused_conv(x, kernel, bias, stride, residual=None, relu=False)`` is
    ``[relu](conv(x, kernel) + bias [+ residual])``: NHWC images, HWIO kernel (square, odd size k), PyTorch's padding
    k // 2 on every side, the given stride. ``x``, ``kernel`` and ``residual`` share one dtype (float32 or
    bfloat16), ``bias`` is float32; oneDNN accumulates in float32 and rounds once, to ``x``'s dtype.
  * ``reference_fused_conv`` is the same function in ``lax`` (float32 accumulation, one rounding at the end).
    ``fused_conv``'s derivatives are the reference's (``jax.custom_jvp``), and under ``vmap`` it runs one batch of
    images at a time, so it composes with the rest of JAX; it runs only on the CPU backend.
  * ``available(dtype, backend)`` is True only where ``fused_conv`` was just checked to compute
    ``reference_fused_conv`` (within float32 rounding, or one bfloat16 rounding); ``fused_conv`` refuses, with a
    ValueError at trace time, a dtype for which it is False on "cpu", rather than risk oneDNN aborting the process.
  * XLA cannot serialise an executable that calls oneDNN, so JAX's persistent compilation cache skips such programs
    (with a warning) and compiles them afresh in each process.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "__onednn$convolution"
_DTYPES = ("float32", "bfloat16")
_NHWC = {"batch_dim": 0, "feature_dim": 3, "spatial_dims": [1, 2]}
_HWIO = {"input_feature_dim": 2, "output_feature_dim": 3, "spatial_dims": [0, 1]}


def _backend_config(size: int, stride: int, ops: tuple[str, ...]) -> str:
  """XLA's ``BackendConfig`` proto (xla/service/cpu/backend_config.proto) as JSON, in jaxlib 0.10's conventions:
  window values as XLA writes them (dilation 1 = none; the runtime subtracts the one oneDNN does not count)."""
  pad = size // 2  # PyTorch's padding on every side
  window = {"size": [size] * 2, "pad_left": [pad] * 2, "pad_right": [pad] * 2, "strides": [stride] * 2,
            "window_dilations": [1, 1]}
  config = {"dims": 4, "input": {"dims": 4, "data": _NHWC}, "kernel": {"dims": 4, "filter": _HWIO},
            "output": {"dims": 4, "data": _NHWC}, "window": window, "fusions": {"ops": list(ops)},
            "feature_groups": 1}
  return json.dumps({"onednn_conv_config": config}, sort_keys=True)


def _output_shape(x_shape, kernel_shape, stride: int) -> tuple[int, int, int, int]:
  size = kernel_shape[0]
  pad = size // 2
  batch, height, width, _ = x_shape
  return (batch, (height + 2 * pad - size) // stride + 1, (width + 2 * pad - size) // stride + 1, kernel_shape[-1])


def _onednn_call(stride: int, relu: bool, x, kernel, bias, *residual):
  """The custom call; ``residual`` is empty or the one array added before the ReLU."""
  ops = ("BIAS",) + (("BINARY_ADD",) if residual else ()) + (("RELU",) if relu else ())
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(_output_shape(x.shape, kernel.shape, stride), x.dtype),
                          vmap_method="sequential", custom_call_api_version=1,
                          legacy_backend_config=_backend_config(kernel.shape[0], stride, ops))
  return call(x, kernel, bias, *residual)


def reference_fused_conv(x, kernel, bias, stride: int, residual=None, relu: bool = False):
  """``fused_conv`` in ``lax``: float32 accumulation, bias and residual added in float32, one rounding to x.dtype."""
  pad = kernel.shape[0] // 2
  y = jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
  y = y + bias.astype(jnp.float32)
  if residual is not None:
    y = y + residual.astype(jnp.float32)
  return (jax.nn.relu(y) if relu else y).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def _differentiable(stride: int, relu: bool):
  """The oneDNN call for one (stride, relu), differentiated through the reference."""
  def reference(x, kernel, bias, *residual):
    return reference_fused_conv(x, kernel, bias, stride, residual[0] if residual else None, relu)

  op = jax.custom_jvp(functools.partial(_onednn_call, stride, relu))
  op.defjvp(lambda primals, tangents: jax.jvp(reference, primals, tangents))
  return op


def fused_conv(x, kernel, bias, stride: int, residual=None, relu: bool = False):
  """[relu](conv(x, kernel) + bias [+ residual]) on oneDNN; see the module docstring. CPU backend only."""
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
    raise ValueError(f"fused_conv takes a square HWIO kernel of odd size; got kernel shape {kernel.shape}.")
  if x.dtype != kernel.dtype or (residual is not None and residual.dtype != x.dtype):
    raise ValueError(f"fused_conv needs x, kernel and residual in one dtype; got {x.dtype}, {kernel.dtype}"
                     f"{'' if residual is None else f', {residual.dtype}'}. Cast them to the compute dtype.")
  if not available(x.dtype, "cpu"):
    raise ValueError(f"fused_conv: XLA:CPU's oneDNN convolution is not available for {x.dtype} here (it needs "
                     f"float32 or bfloat16, an x86-64 CPU, AVX512-BF16 for bfloat16, and a jaxlib whose oneDNN "
                     "kernel computes the reference; see onednn_conv.available). Build the network with "
                     "conv_impl='xla'.")
  return _fused(x, kernel, bias, stride, residual, relu)


def _fused(x, kernel, bias, stride: int, residual, relu: bool):
  args = (x, kernel, bias.astype(jnp.float32)) + ((residual,) if residual is not None else ())
  return _differentiable(int(stride), bool(relu))(*args)


def _cpu_flags() -> set[str]:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      return {flag for line in cpuinfo if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
  except OSError:
    return set()


# The probe's cases: (image size, kernel size, stride, residual, relu): every form the ResNets use (3x3 stride 1
# with the residual, strided 3x3, the strided 1x1 shortcut, ResNet-50's 7x7 stem), on odd sizes.
_PROBES = ((7, 3, 1, True, True), (7, 3, 2, False, True), (7, 1, 2, False, False), (9, 7, 2, False, True))


def _probe_matches(dtype_name: str, size: int, kernel_size: int, stride: int, with_residual: bool, relu: bool) -> bool:
  dtype, rng, cpu = jnp.dtype(dtype_name), np.random.default_rng(size * kernel_size), jax.devices("cpu")[0]
  x = jax.device_put(rng.normal(size=(2, size, size, 8)).astype(dtype), cpu)
  kernel = jax.device_put((0.3 * rng.normal(size=(kernel_size, kernel_size, 8, 16))).astype(dtype), cpu)
  bias = jax.device_put(rng.normal(size=16).astype(np.float32), cpu)
  out_shape = _output_shape(x.shape, kernel.shape, stride)
  residual = jax.device_put(rng.normal(size=out_shape).astype(dtype), cpu) if with_residual else None
  got = jax.jit(_fused, static_argnums=(3, 5))(x, kernel, bias, stride, residual, relu)
  want = jax.jit(reference_fused_conv, static_argnums=(3, 5))(x, kernel, bias, stride, residual, relu)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  # One bfloat16 rounding is 2^-8 relative; a wrong padding, stride or layout is off by O(1).
  tolerance = (2.0**-7 if dtype_name == "bfloat16" else 1e-5) * (1.0 + np.abs(want))
  return got.shape == want.shape and bool(np.all(np.abs(got - want) <= tolerance))


@functools.lru_cache(maxsize=None)
def _matches_reference(dtype_name: str) -> bool:
  """Runs the oneDNN call on the CPU device in every form the ResNets use and compares it with the reference."""
  try:
    # The first check may come while a network is being traced: evaluate it now, not into that trace.
    with jax.ensure_compile_time_eval():
      for case in _PROBES:
        if not _probe_matches(dtype_name, *case):
          logging.info("oneDNN convolution differs from lax for %s %s; using lax.", dtype_name, case)
          return False
  except Exception as error:  # pylint: disable=broad-except  # any failure means: not on this jaxlib / machine
    logging.info("oneDNN convolution unavailable (%s: %s); using lax.", type(error).__name__, error)
    return False
  return True


def available(dtype: Any = jnp.float32, backend: str | None = None) -> bool:
  """Whether ``fused_conv`` runs, and computes the reference, for ``dtype`` on ``backend`` (default: JAX's default
  backend). Checked once per process and dtype; needs the CPU backend on x86-64, and AVX512-BF16 for bfloat16
  (without it oneDNN has no bfloat16 convolution to run)."""
  backend = jax.default_backend() if backend is None else backend
  name = jnp.dtype(dtype).name
  if backend != "cpu" or name not in _DTYPES or platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  if name == "bfloat16" and "avx512_bf16" not in _cpu_flags():
    return False
  return _matches_reference(name)
