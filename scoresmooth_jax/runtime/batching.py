"""The per-device batch size of Monte-Carlo sampling, chosen from a memory estimate instead of by hand.

``smoothing.sample_counts`` keeps one batch per device live, so its memory is what one sampling step needs:
the noise batch, the base classifier's activations, its logits. XLA reports that for a compiled program
(``compiled.memory_analysis()``), without running it.

Promises:
  * ``estimate_step_memory(base_classifier, image_shape, batch_size)`` compiles (never runs) one sampling step
    at that per-device batch size: draw float32 Gaussian noise, add it to an image, run ``base_classifier``,
    take the argmax, which is the body of ``sample_counts``' loop. It returns XLA's argument + output + temporary
    bytes; the arrays ``base_classifier`` closes over (its weights) are lifted out as arguments, as
    ``sample_counts`` passes them on GPU / TPU, so they are counted once and never copied into the program.
  * ``auto_batch_size(base_classifier, image_shape, memory_budget_bytes)`` compiles that step at two batch sizes,
    fits memory = fixed + per_sample * batch (the live activations of a feed-forward network grow linearly with
    the batch), takes the largest power of two whose prediction fits the budget, capped at ``max_batch_size``,
    and compiles it once more to check (halving while XLA's estimate exceeds the budget), so the answer's
    estimate always fits. A budget too small for a batch of one fails with the bytes it would need.
  * ``default_memory_budget()`` is a fraction of the device's memory limit (GPU / TPU ``memory_stats``) or of the
    host's available memory (CPU).

Memory is the only thing estimated: on CPU, throughput usually peaks at a smaller batch than memory allows
(activations stop fitting in cache), so ``max_batch_size`` is the knob for that; the benchmark measures it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_MAX_BATCH_SIZE = 1024
DEFAULT_PROBE_SIZES = (8, 32)
DEFAULT_BUDGET_FRACTION = 0.5


def _step(base_classifier: Callable, image_shape: tuple[int, ...], batch_size: int):
  """One sampling step shaped like the body of ``sample_counts``' loop, as ``(step(weights, key), weights)``.

  The arrays ``base_classifier`` closes over are lifted out (``jax.make_jaxpr``: its constants are exactly those
  arrays) and passed as an argument: compiled as constants, a 550M-parameter diffusion model's 2 GiB of weights
  would be copied into every probe program, which then takes minutes and gigabytes to compile.
  """
  image = jnp.full(image_shape, 0.5, jnp.float32)
  closed = jax.make_jaxpr(base_classifier)(jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32))

  def step(weights, key):
    eps = jax.random.normal(key, (batch_size, *image_shape), jnp.float32)
    logits = jax.core.eval_jaxpr(closed.jaxpr, weights, image[None] + eps)[0]
    return jnp.argmax(logits, axis=-1)

  return step, [jax.ShapeDtypeStruct(jnp.shape(c), jnp.result_type(c)) for c in closed.consts]


def estimate_step_memory(base_classifier: Callable, image_shape: Sequence[int], batch_size: int) -> int:
  """Bytes one device needs for one sampling step at ``batch_size`` (module docstring); compiles, never runs."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
  image_shape = tuple(int(d) for d in image_shape)
  step, weights = _step(base_classifier, image_shape, int(batch_size))
  compiled = jax.jit(step).lower(weights, jax.random.key(0)).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis of compiled programs; pass "
                       "batch_size to sample_counts by hand.")
  live = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
  return int(live - stats.alias_size_in_bytes)


def default_memory_budget(fraction: float = DEFAULT_BUDGET_FRACTION, device: jax.Device | None = None) -> int:
  """``fraction`` of the device's memory limit (accelerators) or of the host's available memory (CPU)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction={fraction!r} must lie in (0, 1].")
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and stats.get("bytes_limit"):
    return int(fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
  available = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          available = int(line.split()[1]) * 1024
          break
  except OSError:
    pass
  if available is None:
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  # CPU devices share the host's memory.
  return int(fraction * available / max(1, len(jax.local_devices(backend="cpu"))))


def fit_step_memory(base_classifier: Callable, image_shape: Sequence[int],
                    probe_sizes: tuple[int, int] = DEFAULT_PROBE_SIZES) -> tuple[float, float]:
  """(fixed bytes, bytes per sample) of the line through ``estimate_step_memory`` at the two ``probe_sizes``."""
  small, large = sorted(int(b) for b in probe_sizes)
  if small < 1 or small == large:
    raise ValueError(f"probe_sizes={probe_sizes!r} must be two different positive batch sizes.")
  at_small = estimate_step_memory(base_classifier, image_shape, small)
  at_large = estimate_step_memory(base_classifier, image_shape, large)
  per_sample = max(at_large - at_small, 0) / (large - small)
  return at_small - per_sample * small, per_sample


def batch_size_for_budget(fixed_bytes: float, per_sample_bytes: float, memory_budget_bytes: int,
                          max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> int:
  """The largest power of two b with fixed + per_sample * b <= budget, capped at ``max_batch_size``."""
  if memory_budget_bytes <= 0:
    raise ValueError(f"memory_budget_bytes={memory_budget_bytes!r} must be positive.")
  if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, (int, np.integer)) or max_batch_size < 1:
    raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive integer.")
  if fixed_bytes + per_sample_bytes > memory_budget_bytes:
    raise ValueError(f"memory_budget_bytes={memory_budget_bytes} is too small for even one sample per step "
                     f"(estimated {int(fixed_bytes + per_sample_bytes)} bytes: {int(fixed_bytes)} fixed + "
                     f"{int(per_sample_bytes)} per sample); raise the budget or use a smaller model.")
  if per_sample_bytes <= 0:
    return int(max_batch_size)
  fits = int((memory_budget_bytes - fixed_bytes) // per_sample_bytes)
  return int(min(2 ** int(math.floor(math.log2(max(fits, 1)))), max_batch_size))


@dataclasses.dataclass(frozen=True)
class BatchSizeChoice:
  """What ``choose_batch_size`` decided, and from what."""

  batch_size: int
  fixed_bytes: float  # the fitted line's intercept
  bytes_per_sample: float  # and slope
  estimated_bytes: int  # XLA's estimate at batch_size, compiled: within the budget
  budget_bytes: int


def choose_batch_size(base_classifier: Callable, image_shape: Sequence[int], memory_budget_bytes: int | None = None,
                      *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                      probe_sizes: tuple[int, int] = DEFAULT_PROBE_SIZES) -> BatchSizeChoice:
  """``auto_batch_size`` with its reasons: the fitted line and the checked estimate."""
  budget = default_memory_budget() if memory_budget_bytes is None else int(memory_budget_bytes)
  fixed, per_sample = fit_step_memory(base_classifier, image_shape, probe_sizes)
  chosen = batch_size_for_budget(fixed, per_sample, budget, max_batch_size)
  # XLA's buffer assignment is only roughly linear (a few % off over a decade of batch sizes): check the pick.
  estimate = estimate_step_memory(base_classifier, image_shape, chosen)
  while chosen > 1 and estimate > budget:
    chosen //= 2
    estimate = estimate_step_memory(base_classifier, image_shape, chosen)
  return BatchSizeChoice(chosen, fixed, per_sample, estimate, budget)


def auto_batch_size(base_classifier: Callable, image_shape: Sequence[int], memory_budget_bytes: int | None = None,
                    *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                    probe_sizes: tuple[int, int] = DEFAULT_PROBE_SIZES) -> int:
  """The largest power-of-two per-device batch size whose estimated step memory fits ``memory_budget_bytes``.

  Args:
    base_classifier: the callable ``sample_counts`` will run (classifier, or denoiser + classifier).
    image_shape: shape of one image, e.g. (32, 32, 3).
    memory_budget_bytes: bytes one device may use for sampling (default ``default_memory_budget()``).
    max_batch_size: cap on the answer (a power of two is returned when the cap is one).
    probe_sizes: the two batch sizes compiled to fit the line.

  Returns:
    An int in [1, max_batch_size], a power of two unless capped by a max_batch_size that is not.
  """
  return choose_batch_size(base_classifier, image_shape, memory_budget_bytes, max_batch_size=max_batch_size,
                           probe_sizes=probe_sizes).batch_size
