"""Randomized smoothing: Clopper-Pearson, exact sharded counts, key independence, and soundness of CERTIFY."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

from scoresmooth_jax import certificate, noise, smoothing
from scoresmooth_jax.runtime import sharding

D = 4  # image shape (D,): the smoothing code is shape-agnostic


def test_public_names():
  assert smoothing.ABSTAIN == -1
  assert smoothing.Certificate._fields == ("prediction", "radius", "p_lower", "count", "n", "n0_counts")


@pytest.mark.parametrize("n", [1, 2, 10, 100, 1000, 100_000])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 0.3])
def test_clopper_pearson_matches_statsmodels(n, alpha):
  for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
    expected = proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]
    got = smoothing.clopper_pearson_lower(k, n, alpha)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-14), (k, n, alpha)
  # Distinguishes the bound from its off-by-one neighbours Beta(k, n - k) and Beta(k + 1, n - k).
  if n >= 10:
    k = n // 2
    got = smoothing.clopper_pearson_lower(k, n, alpha)
    assert got != pytest.approx(stats.beta.ppf(alpha, k, n - k), rel=1e-6)
    assert got != pytest.approx(stats.beta.ppf(alpha, k + 1, n - k), rel=1e-6)


@pytest.mark.parametrize("args", [(11, 10, 0.01), (-1, 10, 0.01), (5, 0, 0.01), (5, 10, 0.0), (5, 10, 1.0),
                                  (True, 10, 0.01), (float("nan"), 10, 0.01)])
def test_clopper_pearson_rejects_bad_arguments(args):
  with pytest.raises(ValueError):
    smoothing.clopper_pearson_lower(*args)
  with pytest.raises(ValueError):
    certificate.clopper_pearson_upper(*args)


def test_clopper_pearson_bounds_are_vectorised_and_match_statsmodels_on_both_sides():
  n, alpha = 200, 0.01
  k = np.arange(n + 1)
  lower, upper = certificate.clopper_pearson_lower(k, n, alpha), certificate.clopper_pearson_upper(k, n, alpha)
  for i in (0, 1, 77, 199, 200):
    expected_low, expected_up = proportion_confint(i, n, alpha=2 * alpha, method="beta")
    assert lower[i] == pytest.approx(expected_low, rel=1e-9, abs=1e-14)
    assert upper[i] == pytest.approx(expected_up, rel=1e-9, abs=1e-14)
    assert lower[i] == smoothing.clopper_pearson_lower(i, n, alpha)  # the scalar call is the same function
  assert np.all(np.diff(lower) > 0) and np.all(np.diff(upper) > 0) and np.all(lower < upper)
  # A real-valued count interpolates between its neighbours (sequential asks what a hit rate would certify).
  between = certificate.clopper_pearson_lower(77.5, n, alpha)
  assert lower[77] < between < lower[78]


def constant_classifier(x):
  """Always class 2 of 3."""
  return jnp.tile(jnp.asarray([0.0, 0.0, 1.0]), (x.shape[0], 1))


def first_coordinate_positive(x):
  """Class 1 when the first coordinate exceeds 1/2: with x[0] = 1/2, a fair coin under symmetric noise."""
  return jnp.stack([0.5 - x[:, 0], x[:, 0] - 0.5], axis=-1)


def bucket_of_noise(x):
  """1000 classes: the bucket of Phi((x[0] - 1/2) / 0.5), so every draw lands in a near-unique class."""
  u = jax.scipy.stats.norm.cdf((x[:, 0] - 0.5) / 0.5)
  return jax.nn.one_hot(jnp.clip((u * 1000).astype(jnp.int32), 0, 999), 1000)


X = jnp.full((D,), 0.5)


@pytest.mark.parametrize("num,batch_size", [(1, 1), (7, 3), (8, 1), (9, 1), (100, 16), (1001, 7), (64, 8)])
def test_counts_sum_exactly_to_num(num, batch_size):
  counts = smoothing.sample_counts(constant_classifier, X, noise.Gaussian(0.5), num, jax.random.key(0),
                                   num_classes=3, batch_size=batch_size)
  assert counts.dtype == np.int64
  np.testing.assert_array_equal(counts, [0, 0, num])
  counts = smoothing.sample_counts(first_coordinate_positive, X, noise.Uniform(0.5), num, jax.random.key(0),
                                   num_classes=2, batch_size=batch_size)
  assert counts.sum() == num


def test_partial_batch_is_masked_not_lost_or_padded():
  # 8 devices, batch 16: num = 129 leaves device 7 with 1 draw of a 16-wide batch. Counting noise buckets,
  # the padded draws would add extra classes and a lost batch would drop some.
  nz = noise.Gaussian(0.5)
  counts = smoothing.sample_counts(bucket_of_noise, X, nz, 129, jax.random.key(5), num_classes=1000,
                                   batch_size=16)
  assert counts.sum() == 129
  assert (counts > 0).sum() > 100  # nearly all draws land in distinct buckets


def test_same_key_same_counts_other_key_other_counts():
  nz = noise.Laplace(0.5)
  run = lambda key: smoothing.sample_counts(bucket_of_noise, X, nz, 500, key, num_classes=1000, batch_size=16)
  np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  assert not np.array_equal(run(jax.random.key(1)), run(jax.random.key(2)))


def test_devices_and_batches_draw_different_noise():
  # One batch of 64 per device. If the 8 devices shared a key, every bucket count would be a multiple of 8.
  nz = noise.Gaussian(0.5)
  counts = smoothing.sample_counts(bucket_of_noise, X, nz, 8 * 64, jax.random.key(3), num_classes=1000,
                                   batch_size=64)
  assert jax.device_count() == 8
  assert np.any(counts % 8 != 0)
  assert (counts > 0).sum() > 350
  # One device, 8 batches of 64: if the batches shared a key, every count would be a multiple of 8.
  one = sharding.data_mesh(jax.devices()[:1])
  counts = smoothing.sample_counts(bucket_of_noise, X, nz, 8 * 64, jax.random.key(3), num_classes=1000,
                                   batch_size=64, mesh=one)
  assert np.any(counts % 8 != 0)


def test_one_and_eight_devices_agree_statistically():
  # Class 1 iff the first coordinate of x + noise exceeds 0.5 + t: p = 1 - Phi(t / sigma) exactly.
  t, sigma, num = 0.2, 0.5, 40_000
  p = 1 - stats.norm.cdf(t / sigma)
  clf = lambda z: jnp.stack([0.7 - z[:, 0], z[:, 0] - 0.7], -1)
  nz = noise.Gaussian(sigma)
  k1 = smoothing.sample_counts(clf, X, nz, num, jax.random.key(7), num_classes=2, batch_size=500,
                               mesh=sharding.data_mesh(jax.devices()[:1]))[1]
  k8 = smoothing.sample_counts(clf, X, nz, num, jax.random.key(8), num_classes=2, batch_size=500)[1]
  sd = math.sqrt(p * (1 - p) / num)
  assert abs(k1 / num - p) < 4 * sd
  assert abs(k8 / num - p) < 4 * sd
  assert abs(k1 - k8) / num < 4 * math.sqrt(2) * sd


def test_certify_uses_independent_keys_for_selection_and_estimation(monkeypatch):
  seen = []
  real = smoothing.sample_counts

  def spy(clf, x, nz, num, key, **kw):
    seen.append((num, tuple(np.asarray(jax.random.key_data(key)).ravel())))
    return real(clf, x, nz, num, key, **kw)

  monkeypatch.setattr(smoothing, "sample_counts", spy)
  smoothing.certify(first_coordinate_positive, X, noise.Gaussian(0.25), 10, 20, 0.01, jax.random.key(0),
                    num_classes=2, batch_size=4)
  smoothing.predict(first_coordinate_positive, X, noise.Gaussian(0.25), 30, 0.01, jax.random.key(0),
                    num_classes=2, batch_size=4)
  assert [num for num, _ in seen] == [10, 20, 30]
  assert len({key for _, key in seen}) == 3  # selection, estimation and prediction never share a key


@pytest.mark.parametrize("kwargs,match", [
    (dict(n0=0), "n0=0"), (dict(n=0), "n=0"), (dict(alpha=0.0), "alpha=0.0"), (dict(alpha=1.5), "alpha=1.5"),
    (dict(batch_size=0), "batch_size=0"), (dict(n=2.5), "n=2.5"),
])
def test_certify_rejects_bad_arguments(kwargs, match):
  args = dict(n0=10, n=10, alpha=0.01, batch_size=4)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    smoothing.certify(first_coordinate_positive, X, noise.Gaussian(0.25), args["n0"], args["n"], args["alpha"],
                      jax.random.key(0), num_classes=2, batch_size=args["batch_size"])


def test_low_precision_images_get_float32_noise():
  seen = []

  def clf(z):
    seen.append(z.dtype)
    return constant_classifier(z)

  smoothing.sample_counts(clf, X.astype(jnp.bfloat16), noise.Gaussian(0.5), 10, jax.random.key(0),
                          num_classes=3, batch_size=4)
  assert seen and all(dtype == jnp.float32 for dtype in seen)  # every trace (weights lookup, program) saw f32


@pytest.mark.parametrize("classifier,num_classes,match", [
    (constant_classifier, 4, r"\(4, num_classes=4\)"),  # wrong num_classes
    (lambda z: constant_classifier(z)[0], 3, r"\[\(\(3,\), 'float32'\)\]"),  # one image's logits
    (lambda z: (constant_classifier(z), z), 3, "one floating array"),  # a tuple
    (lambda z: jnp.argmax(constant_classifier(z), axis=-1, keepdims=True), 1, "int32"),  # labels, not logits
])
def test_classifier_output_is_checked_before_counting(classifier, num_classes, match):
  with pytest.raises(ValueError, match=match):
    smoothing.sample_counts(classifier, X, noise.Gaussian(0.5), 10, jax.random.key(0), num_classes=num_classes,
                            batch_size=4)


def test_integer_images_are_rejected():
  with pytest.raises(ValueError, match="dtype int32"):
    smoothing.sample_counts(constant_classifier, jnp.zeros((D,), jnp.int32), noise.Gaussian(0.5), 10,
                            jax.random.key(0), num_classes=3, batch_size=4)


# Soundness: a base classifier whose smoothed probability and true robustness radius are known exactly.
# f(z) = 1[w . z > c]. Under noise u, p_A = P(w . (x + u) > c). The smoothed classifier's prediction is
# constant exactly within distance `margin` of x (in the noise's norm), so a certificate is wrong iff it
# returns the wrong class or a radius > margin. Clopper-Pearson at level alpha makes that rate <= alpha.
def _exact_setup(nz):
  if isinstance(nz, noise.Gaussian):
    # Any direction for l2: w = (1, 2, -2, 0) / 3, margin = w . x - c; p_A = Phi(margin / sigma).
    w = jnp.asarray([1.0, 2.0, -2.0, 0.0]) / 3.0
    margin = 0.6 * nz.sigma
    p_a = stats.norm.cdf(margin / nz.sigma)
  else:
    # Axis-aligned for l1 (the l1 distance to {z_0 > c} is |x_0 - c|): p_A is a 1-D tail probability.
    w = jnp.asarray([1.0, 0.0, 0.0, 0.0])
    if isinstance(nz, noise.Laplace):
      margin = 0.3 * nz.sigma
      p_a = 1 - 0.5 * math.exp(-margin / nz.scale)
    else:
      margin = 0.6 * nz.sigma
      p_a = 0.5 + margin / (2 * nz.half_width)
  c = float(jnp.dot(w, X)) - margin
  clf = lambda z: jnp.stack([c - z @ w, z @ w - c], -1)
  return clf, margin, p_a


@pytest.mark.parametrize("nz", [noise.Gaussian(0.5), noise.Laplace(0.5), noise.Uniform(0.5)],
                         ids=["gaussian", "laplace", "uniform"])
def test_certify_is_sound_on_an_exactly_known_classifier(nz):
  clf, margin, p_a = _exact_setup(nz)
  alpha, trials, n = 0.05, 600, 200
  # The radius is below the margin exactly when p_lower <= p_A, so the check has full power.
  assert nz.certified_radius(p_a) == pytest.approx(margin, rel=1e-9)
  wrong = certified = naive_wrong = 0
  for i in range(trials):
    cert = smoothing.certify(clf, X, nz, 20, n, alpha, jax.random.fold_in(jax.random.key(11), i),
                             num_classes=2, batch_size=50)
    if cert.prediction != smoothing.ABSTAIN:
      certified += 1
      wrong += cert.prediction != 1 or cert.radius > margin
    # The same draws with the point estimate k / n in place of the confidence bound.
    naive_wrong += nz.certified_radius(cert.count / cert.n) > margin
  assert certified > trials // 2  # the test has teeth: most trials do certify
  slack = 3 * math.sqrt(alpha * (1 - alpha) / trials)
  assert wrong / trials <= alpha + slack, (wrong, trials)
  # The check has power: ignoring the confidence level over-certifies in about half of the trials.
  assert naive_wrong / trials > 0.3, naive_wrong


def test_predict_abstains_on_a_coin_flip_at_the_binomial_test_rate():
  n, alpha, trials = 100, 0.05, 300
  # Exact abstention probability: a fair coin's max count fails the two-sided test at level alpha.
  abstain_prob = sum(stats.binom.pmf(k, n, 0.5) for k in range(n + 1)
                     if stats.binomtest(max(k, n - k), n, 0.5).pvalue > alpha)
  abstains = sum(
      smoothing.predict(first_coordinate_positive, X, noise.Gaussian(0.5), n, alpha,
                        jax.random.fold_in(jax.random.key(2), i), num_classes=2, batch_size=25)
      == smoothing.ABSTAIN for i in range(trials))
  sd = math.sqrt(abstain_prob * (1 - abstain_prob) / trials)
  assert abs(abstains / trials - abstain_prob) < 4 * sd + 1e-9, (abstains, abstain_prob)
  # A clear majority is predicted, not abstained on.
  far = jnp.full((D,), 0.9)
  assert smoothing.predict(first_coordinate_positive, far, noise.Gaussian(0.25), n, alpha, jax.random.key(0),
                           num_classes=2, batch_size=25) == 1
