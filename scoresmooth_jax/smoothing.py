"""Randomized smoothing (Cohen et al. 2019): Monte-Carlo class counts, PREDICT and CERTIFY.

The smoothed classifier is g(x) = argmax_c P_u[f(x + u) = c], u ~ noise. ``f`` (``base_classifier``) is any
JAX callable from a batch of NHWC images in [0, 1] to logits; a denoiser in front of a classifier is simply
part of ``f``.

Promises:
  * ``sample_counts`` draws exactly ``num`` noisy copies, split over every device of the mesh with
    ``jax.shard_map``; each device loops over its batches with ``lax.fori_loop``, keeps its counts on device,
    masks its partial last batch, and one ``psum`` returns the total. Peak memory is one batch per device,
    whatever ``num``. The result is an int64 numpy array that sums to ``num``.
  * ``base_classifier`` is compiled once per configuration; on CPU its weights are constants of the program up to
    ``CONSTANT_WEIGHTS_MAX_BYTES`` (faster than arguments), beyond that and on GPU/TPU they are arguments (see
    ``_counter``); its output must be one floating array of logits [batch, num_classes].
  * The selection (n0) and estimation (n) draws of ``certify`` use independent keys (``fold_in`` of the
    caller's key with distinct phase numbers); devices and batches fold in their own indices.
  * ``sequential.certify_sequential`` keeps ``certify``'s guarantee with fewer draws: it stops each image once
    its answer is settled. ``Certificate``, ``ABSTAIN`` and the bounds live in ``certificate``, which both share.
  * Statistics (Clopper-Pearson, binomial test, radii) are computed in float64 on the host.
  * Every function is pure: the same key gives the same answer on the same mesh.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

from scoresmooth_jax import noise as noise_lib
from scoresmooth_jax.certificate import (  # noqa: F401 (smoothing's public names, shared with sequential)
    ABSTAIN, ESTIMATION_PHASE, PREDICTION_PHASE, SELECTION_PHASE, Certificate, check_alpha, check_count,
    clopper_pearson_lower)
from scoresmooth_jax.runtime import sharding

BaseClassifier = Callable[[jax.Array], jax.Array]

def _check_logits(logits, batch_size: int, num_classes: int) -> None:
  """Raises (at trace time) unless the classifier returned one floating array of logits [batch, num_classes]."""
  leaves = jax.tree.leaves(logits)
  shapes = [(tuple(a.shape), str(a.dtype)) for a in leaves]
  if len(leaves) != 1 or shapes[0][0] != (batch_size, num_classes) or not jnp.issubdtype(leaves[0].dtype, jnp.inexact):
    raise ValueError(f"base_classifier maps a batch of {batch_size} images to {shapes}; it must return one "
                     f"floating array of logits of shape ({batch_size}, num_classes={num_classes}). Check "
                     "num_classes, or that the callable returns logits for a batch, not labels or one image's.")


# Closed-over weights up to this size are compiled into the CPU program as constants; larger ones are passed as
# arguments (see _counter and docs/openai.md for the measurements behind the number).
CONSTANT_WEIGHTS_MAX_BYTES = 64 * 2**20
WEIGHTS = ("auto", "constants", "arguments")


def _lift_weights(base_classifier: BaseClassifier, example: jax.ShapeDtypeStruct, mesh: Mesh, weights: str):
  """``(classify(consts, z), consts)``: the classifier with the arrays it closes over either left inside
  (consts = ()) or lifted out as one argument, replicated over the mesh once here (not copied per call)."""
  if weights == "constants":
    return (lambda consts, z: base_classifier(z)), ()
  closed = jax.make_jaxpr(base_classifier)(example)  # its consts are exactly the closed-over arrays
  nbytes = sum(int(getattr(c, "nbytes", 0)) for c in closed.consts)
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  if weights == "auto" and on_cpu and nbytes <= CONSTANT_WEIGHTS_MAX_BYTES:
    return (lambda consts, z: base_classifier(z)), ()
  consts = jax.device_put(list(closed.consts), NamedSharding(mesh, P()))
  return (lambda consts, z: jax.core.eval_jaxpr(closed.jaxpr, consts, z)[0]), consts


# Bounded: each entry holds a compiled program and the classifier (with its weights) it was built for.
@functools.lru_cache(maxsize=8)
def _counter(base_classifier: BaseClassifier, nz: noise_lib.Noise, image_shape: tuple[int, ...],
             dtype: np.dtype, num_classes: int, batch_size: int, mesh: Mesh, weights: str = "auto"):
  """Compiles (once per configuration) the sharded counting program ``(x, key, num) -> int32[num_classes]``.

  On CPU the weights ``base_classifier`` closes over are compiled into the program as constants while they are
  small, on purpose: passed as arguments instead, they cost 15 % of the annealed denoiser's throughput and
  3-5 % of a ResNet-110's on CPU (measured with scripts/benchmark.py; XLA prepares constant weights once,
  argument weights on every call). The price is a longer compilation and a copy of the weights inside the
  program, which grows with the weights: the 62.8M-parameter NCSN++ one-step row peaked at 1.80 GiB RSS with
  constants, 0.90 GiB with arguments, and a 550M-parameter diffusion model would not fit twice. So above
  ``CONSTANT_WEIGHTS_MAX_BYTES``, and always on GPU/TPU (where constants are copied into the executable and
  device memory is the scarce resource), the closed-over arrays are lifted out of the traced classifier
  (``jax.make_jaxpr``: any callable works, no protocol needed) and passed as a replicated argument.
  ``weights`` forces "constants" or "arguments" (the benchmark compares both).
  """
  num_devices = mesh.size
  example = jax.ShapeDtypeStruct((batch_size, *image_shape), dtype)
  classify, consts = _lift_weights(base_classifier, example, mesh, weights)

  def count_on_device(consts, x, key, num):
    device = lax.axis_index(sharding.DATA_AXIS)
    # Device d owns draws [d * per_device, (d + 1) * per_device) of the global index range [0, num).
    per_device = (num + num_devices - 1) // num_devices
    mine = jnp.clip(num - device * per_device, 0, per_device)
    num_batches = (mine + batch_size - 1) // batch_size
    device_key = jax.random.fold_in(key, device)
    offsets = jnp.arange(batch_size)

    def body(batch, counts):
      eps = nz.sample(jax.random.fold_in(device_key, batch), (batch_size, *image_shape), dtype)
      logits = classify(consts, x[None] + eps)
      _check_logits(logits, batch_size, num_classes)
      labels = jnp.argmax(logits, axis=-1)
      valid = (batch * batch_size + offsets) < mine  # masks the tail of the partial last batch
      hits = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) * valid[:, None].astype(jnp.int32)
      return counts + hits.sum(axis=0)

    zeros = lax.pcast(jnp.zeros((num_classes,), jnp.int32), sharding.DATA_AXIS, to="varying")
    counts = lax.fori_loop(0, num_batches, body, zeros)
    return lax.psum(counts, sharding.DATA_AXIS)

  # A jaxpr traced outside shard_map (lifted weights) mixes replicated values with the per-device batch without
  # the "varying" casts that tracing inside shard_map inserts, so its replication is not checked; the counts are
  # per-device values summed by the psum either way.
  sharded = jax.shard_map(count_on_device, mesh=mesh, in_specs=(P(), P(), P(), P()), out_specs=P(),
                          check_vma=not consts)
  return functools.partial(jax.jit(sharded), consts)


def sample_counts(base_classifier: BaseClassifier, x, nz: noise_lib.Noise, num: int, key: jax.Array, *,
                  num_classes: int, batch_size: int, mesh: Mesh | None = None, weights: str = "auto") -> np.ndarray:
  """Counts the base classifier's top-1 labels on ``num`` noisy copies of one image.

  Args:
    base_classifier: JAX callable, batch of images [B, *x.shape] in [0, 1] -> logits [B, num_classes]. Pass
      the same callable object each time: the compiled program is cached by its identity.
    x: one image (e.g. HWC) in [0, 1]; noise is drawn and added in float32 (or x's dtype if wider).
    nz: the noise (``noise.Gaussian``, ``noise.Laplace`` or ``noise.Uniform``).
    num: number of noisy copies, >= 1.
    key: a JAX PRNG key; the same key gives the same counts on the same mesh.
    num_classes: number of logits.
    batch_size: draws per device per loop step (the memory knob: one batch per device is ever live).
    mesh: 1-D mesh with axis "data" (default: all devices, ``sharding.data_mesh()``).
    weights: how the arrays base_classifier closes over enter the program: "auto" (constants on CPU up to
      ``CONSTANT_WEIGHTS_MAX_BYTES``, else arguments), "constants" or "arguments". Same counts either way.

  Returns:
    int64 numpy array [num_classes] that sums to exactly ``num``.
  """
  num = check_count("num", num)
  num_classes = check_count("num_classes", num_classes)
  batch_size = check_count("batch_size", batch_size)
  if not isinstance(nz, noise_lib.Noise):
    raise TypeError(f"nz={nz!r} must be a scoresmooth_jax.noise distribution, e.g. noise.Gaussian(sigma=0.25).")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x has dtype {x.dtype}; pass a floating image in [0, 1] (e.g. uint8 / 255).")
  # Noise is drawn and added in at least float32: a bfloat16 sampler has an 8-bit mantissa and truncates
  # the Gaussian's tails, so the draws would not follow the distribution the certificate is computed for.
  # Low-precision compute belongs inside base_classifier, after the noise (a deterministic cast is part of f).
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mesh = sharding.data_mesh() if mesh is None else mesh
  if weights not in WEIGHTS:
    raise ValueError(f"weights={weights!r}: choose one of {WEIGHTS}.")
  run = _counter(base_classifier, nz, tuple(x.shape), np.dtype(x.dtype), num_classes, batch_size, mesh, weights)
  counts = np.asarray(run(x, key, jnp.int32(num)), dtype=np.int64)
  assert counts.sum() == num, (counts.sum(), num)  # a lost or doubled batch would break the guarantee
  return counts


def predict(base_classifier: BaseClassifier, x, nz: noise_lib.Noise, n: int, alpha: float, key: jax.Array, *,
            num_classes: int, batch_size: int, mesh: Mesh | None = None) -> int:
  """Cohen et al.'s PREDICT: the smoothed classifier's class, or ABSTAIN.

  Draws ``n`` noisy copies; with top-two counts n1 >= n2 it abstains when the two-sided binomial test of
  n1 successes in n1 + n2 trials against 1/2 has p-value > ``alpha``. A returned class differs from g(x)
  with probability at most ``alpha``.
  """
  alpha = check_alpha(alpha)
  counts = sample_counts(base_classifier, x, nz, n, jax.random.fold_in(key, PREDICTION_PHASE),
                         num_classes=num_classes, batch_size=batch_size, mesh=mesh)
  top2 = np.argsort(-counts, kind="stable")[:2]
  n1 = int(counts[top2[0]])
  n2 = int(counts[top2[1]]) if counts.size > 1 else 0
  if stats.binomtest(n1, n1 + n2, 0.5).pvalue > alpha:
    return ABSTAIN
  return int(top2[0])


def certify(base_classifier: BaseClassifier, x, nz: noise_lib.Noise, n0: int, n: int, alpha: float,
            key: jax.Array, *, num_classes: int, batch_size: int, mesh: Mesh | None = None) -> Certificate:
  """Cohen et al.'s CERTIFY: a class and a radius within which g is constant, with probability >= 1 - alpha.

  ``n0`` selection draws choose the class c; ``n`` fresh, independent estimation draws count k hits of c;
  p_lower = ``clopper_pearson_lower(k, n, alpha)``. If p_lower <= 1/2 the result is ABSTAIN with radius 0,
  else the radius is ``nz.certified_radius(p_lower)`` in the norm ``nz.norm``.
  """
  n0 = check_count("n0", n0)
  n = check_count("n", n)
  alpha = check_alpha(alpha)
  common = dict(num_classes=num_classes, batch_size=batch_size, mesh=mesh)
  n0_counts = sample_counts(base_classifier, x, nz, n0, jax.random.fold_in(key, SELECTION_PHASE), **common)
  selected = int(np.argmax(n0_counts))
  counts = sample_counts(base_classifier, x, nz, n, jax.random.fold_in(key, ESTIMATION_PHASE), **common)
  count = int(counts[selected])
  p_lower = clopper_pearson_lower(count, n, alpha)
  if p_lower <= 0.5:
    return Certificate(ABSTAIN, 0.0, p_lower, count, n, n0_counts)
  return Certificate(selected, nz.certified_radius(p_lower), p_lower, count, n, n0_counts)
