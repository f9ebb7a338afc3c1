"""Sequential certification: the guarantee under its own stopping rules, the cost of not correcting for looks,
and the plumbing (keys, single look = certify, one compilation, draws within n_max)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from scoresmooth_jax import noise, sequential, smoothing

NZ = noise.Gaussian(1.0)  # radii in units of sigma
THRESHOLD = float(stats.norm.cdf(1.0))  # p_A that certifies radius 1 exactly


def test_plan_doubles_up_to_n_max_and_splits_alpha():
  plan = sequential.plan(100_000, 0.001)
  assert plan.looks == (196, 391, 782, 1563, 3125, 6250, 12500, 25000, 50000, 100_000)
  assert plan.alphas == (0.0001,) * 10 and plan.alpha == pytest.approx(0.001, rel=1e-12)
  assert sequential.plan(3200, 0.05, first_look=100).looks == (100, 200, 400, 800, 1600, 3200)
  assert sequential.plan(1000, 0.01, first_look=1000).looks == (1000,)
  assert sequential.plan(1000, 0.01, first_look=5000).looks == (1000,)  # the budget caps the first look
  assert sequential.plan(1, 0.01, first_look=1).looks == (1,)
  with pytest.raises(ValueError, match="strictly increasing"):
    sequential.Plan((100, 100), (0.01, 0.01))
  with pytest.raises(ValueError, match="first_look=0"):
    sequential.plan(1000, 0.01, first_look=0)


def simulate(p_a, plan, rng, **rules):
  """Runs the procedure on binomial counts: cumulative hits at every look are drawn up front (the looks the
  procedure never reaches are simply never used), then each trial stops at its first settled look."""
  increments = np.diff((0,) + plan.looks)
  counts = np.cumsum(rng.binomial(increments[None, :], p_a[:, None]), axis=1)
  stopped = np.zeros(len(p_a), bool)
  certified = np.zeros(len(p_a), bool)
  radius = np.zeros(len(p_a))
  used = np.zeros(len(p_a), np.int64)
  for look in range(len(plan.looks)):
    out = sequential.settle(counts[:, look], look, plan, NZ, **rules)
    now = out.stop & ~stopped
    certified[now], radius[now], used[now] = out.certified[now], out.radius[now], plan.looks[look]
    stopped |= out.stop
  assert stopped.all()
  return certified, radius, used, counts


def over_certification(p_a, certified, radius):
  """A certificate is wrong when it claims more radius than p_A gives, or any class at p_A <= 1/2."""
  true_radius = np.asarray([NZ.certified_radius(p) for p in p_a])
  return certified & ((p_a <= 0.5) | (radius > true_radius + 1e-12))


# Bonferroni over the looks keeps the rate <= alpha. The same procedure with the plain level at every look
# (no correction for looking eight times) exceeds that bound (measured: about 2.5 alpha): the check has teeth.
# p_A lies just around the threshold p = Phi(1) of radius 1, where over-certifying is possible: decision mode
# asks about r = 1, radius mode stops as soon as the radius reaches max_radius = 1 (the rule that rewards a
# lucky look most).
@pytest.mark.parametrize("alpha", [0.05, 0.01])
@pytest.mark.parametrize("mode", ["decision", "radius"])
def test_over_certification_is_at_most_alpha_and_uncorrected_looks_exceed_it(alpha, mode):
  trials = 10_000
  rng = np.random.default_rng(int(alpha * 1000) + (mode == "radius"))
  plan = sequential.plan(12_800, alpha, first_look=100)
  naive = sequential.Plan(plan.looks, (alpha,) * len(plan.looks))
  rules = dict(radius=1.0) if mode == "decision" else dict(max_radius=1.0, tolerance=0.0)
  p_a = THRESHOLD + rng.uniform(-0.005, 0.001, trials)
  wrong = over_certification(p_a, *simulate(p_a, plan, rng, **rules)[:2])
  naive_wrong = over_certification(p_a, *simulate(p_a, naive, rng, **rules)[:2])
  bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)
  assert wrong.mean() <= bound, (wrong.sum(), trials)
  assert naive_wrong.mean() > bound, (naive_wrong.sum(), trials)


@pytest.mark.parametrize("alpha", [0.05, 0.01])
@pytest.mark.parametrize("rules", ["tolerance", "radii"])
def test_radius_mode_defaults_are_sound_over_a_spread_of_p_a(alpha, rules):
  trials = 4000
  rng = np.random.default_rng(7)
  plan = sequential.plan(3200, alpha, first_look=100)
  # The quarter of trials at p_A in [0.48, 0.5] go on until abstention is settled, often to n_max; without
  # max_radius, the tolerance rule also draws n_max / 2 for every image whose draws all hit.
  budget = 0.75 if rules == "tolerance" else 0.6
  rules = (dict(tolerance=sequential.default_tolerance(NZ, plan)) if rules == "tolerance"
           else dict(radii=(0.0, 0.5, 1.0, 1.5), max_radius=1.5, tolerance=0.0))
  # Near 1/2 a lucky look would certify a class that is not g's; above it, a radius that is too large.
  p_a = np.concatenate([rng.uniform(0.48, 0.5, trials // 4), rng.uniform(0.5, 0.999, trials - trials // 4)])
  certified, radius, used, _ = simulate(p_a, plan, rng, **rules)
  assert over_certification(p_a, certified, radius).mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)
  assert certified.mean() > 0.5  # the check has power: most trials certify a radius
  assert used.mean() < budget * plan.n_max and (used <= plan.n_max).all()  # and stop early


def test_easy_images_stop_at_the_first_look_and_hard_ones_go_on():
  plan = sequential.plan(100_000, 0.001)
  first = plan.looks[0]
  # All hits: certified at r = sigma after the first look; radius mode goes on until the radius is settled.
  assert sequential.settle(first, 0, plan, NZ, radius=1.0).stop
  assert not sequential.settle(first, 0, plan, NZ).stop
  assert sequential.settle(first, 0, plan, NZ, max_radius=1.0).stop
  # No hits (a misclassified image): abstention is settled in both modes.
  for rules in (dict(radius=1.0), dict()):
    out = sequential.settle(0, 0, plan, NZ, **rules)
    assert out.stop and not out.certified and out.radius == 0.0
  # p_A at the threshold: unsettled until the budget runs out.
  at_threshold = round(THRESHOLD * first)
  assert not sequential.settle(at_threshold, 0, plan, NZ, radius=1.0).stop
  assert sequential.settle(round(THRESHOLD * plan.n_max), len(plan.looks) - 1, plan, NZ, radius=1.0).stop


def test_with_reported_radii_an_image_stops_once_no_reported_radius_is_open():
  plan = sequential.plan(100_000, 0.001)
  radii = (0.0, 0.5, 1.0)
  # 80 % hits at the first look: certified at 0 (radius(L) = 0.47); 0.5 and 1.0 are open (p could be 0.86,
  # which n_max draws would certify at 1.07). The same rate at 50,000 draws settles them: certified at 0.5
  # (radius 0.82), 1.0 out of reach, although n_max draws would still add radius (tolerance 0 goes on).
  first = sequential.settle(round(0.8 * plan.looks[0]), 0, plan, NZ, radii=radii)
  assert not first.stop and 0.0 < first.radius < 0.5
  late = sequential.settle(40_000, len(plan.looks) - 2, plan, NZ, radii=radii)
  assert late.stop and late.certified and 1.0 > late.radius >= 0.5
  assert not sequential.settle(40_000, len(plan.looks) - 2, plan, NZ, tolerance=0.0).stop
  # Not yet certified at all (48 % hits), but it could be: radius 0 counts as open.
  unsure = sequential.settle(95, 0, plan, NZ, radii=(0.0,))
  assert not unsure.stop and unsure.p_lower <= 0.5


def test_tolerance_never_decides_whether_an_image_abstains():
  plan = sequential.plan(100_000, 0.001)
  tolerance, look = sequential.default_tolerance(NZ, plan), len(plan.looks) - 2  # 50,000 draws
  # 50.5 % hits: not certified yet (p_lower 0.497), and n_max draws could add at most 0.02 sigma of radius,
  # well within the tolerance; but they could still certify it, so it goes on (stopping would abstain).
  unsure = sequential.settle(25_250, look, plan, NZ, tolerance=tolerance)
  assert not unsure.certified and not unsure.stop
  assert sequential.settle(25_250, look + 1, plan, NZ, tolerance=tolerance).stop  # n_max: the budget is spent
  # 49 % hits: even n_max draws could not certify it, so abstention is settled now.
  assert sequential.settle(24_500, look, plan, NZ, tolerance=tolerance).stop
  # 51 % hits: certified (p_lower 0.502) with at most 0.02 sigma to gain: the tolerance stops it.
  settled = sequential.settle(25_500, look, plan, NZ, tolerance=tolerance)
  assert settled.certified and settled.stop


def test_run_follows_settle_look_by_look():
  rng = np.random.default_rng(3)
  plan = sequential.plan(3200, 0.01, first_look=100)
  p_a = rng.uniform(0.5, 1.0, 40)
  certified, radius, used, counts = simulate(p_a, plan, rng)
  for i in range(len(p_a)):
    seen = []

    def hits(look, num):
      seen.append(num)
      return int(counts[i, look] - (counts[i, look - 1] if look else 0))

    out = sequential.run(hits, plan, NZ)
    assert (out.certified, out.radius, out.n) == (certified[i], radius[i], used[i])
    assert sum(seen) == out.n == plan.looks[len(seen) - 1]  # each look draws only the new draws


# --- certify_sequential on a JAX classifier: f(z) = 1[w . z > c], p_A = Phi(margin / sigma) exactly.
X = jnp.full((4,), 0.5)


def linear_classifier(margin):
  w = jnp.asarray([1.0, 2.0, -2.0, 0.0]) / 3.0
  c = float(jnp.dot(w, X)) - margin
  return lambda z: jnp.stack([c - z @ w, z @ w - c], -1)


def test_single_look_is_certify_exactly():
  clf, nz = linear_classifier(0.3), noise.Gaussian(0.5)
  for i in range(3):
    key = jax.random.fold_in(jax.random.key(4), i)
    fixed = smoothing.certify(clf, X, nz, 20, 400, 0.01, key, num_classes=2, batch_size=16)
    for rules in (dict(), dict(max_radius=0.1), dict(tolerance=10.0)):
      seq = sequential.certify_sequential(clf, X, nz, 20, 400, 0.01, key, num_classes=2, batch_size=16,
                                         first_look=400, **rules)
      assert seq[:5] == fixed[:5]
      np.testing.assert_array_equal(seq.n0_counts, fixed.n0_counts)


def test_same_key_same_certificate_one_compilation_and_fresh_keys_per_look(monkeypatch):
  traces = []
  margin = 0.02  # p_A = 0.516: close to 1/2, so with tolerance 0 radius mode takes every look
  base = linear_classifier(margin)

  def clf(z):
    traces.append(z.shape)  # runs once per compilation of the counting program
    return base(z)

  keys = []
  real = smoothing.sample_counts

  def spy(*args, **kwargs):
    keys.append((args[3], tuple(np.asarray(jax.random.key_data(args[4])).ravel())))
    return real(*args, **kwargs)

  monkeypatch.setattr(smoothing, "sample_counts", spy)
  nz = noise.Gaussian(0.5)
  run = lambda key: sequential.certify_sequential(clf, X, nz, 20, 3200, 0.01, key, num_classes=2, batch_size=16,
                                                 tolerance=0.0)
  first = run(jax.random.key(9))
  # n0 and every look, each a different number of draws: one program. Building it traces the classifier at most
  # twice (smoothing._lift_weights traces it once to find the weights it closes over), and never again.
  per_program = len(traces)
  assert per_program in (1, 2)
  looks = sequential.plan(3200, 0.01).looks
  nums = [num for num, _ in keys]
  assert nums[0] == 20 and len(nums) >= 3 and first.n == looks[len(nums) - 2]
  assert nums[1:] == list(np.diff((0,) + looks[:len(nums) - 1]))
  assert len({key for _, key in keys}) == len(keys)  # selection and every look draw fresh noise
  again = run(jax.random.key(9))
  assert again[:5] == first[:5] and len(traces) == per_program
  other = run(jax.random.key(10))
  assert other[:5] != first[:5]


@pytest.mark.parametrize("margin", [-0.2, 0.01, 0.3, 2.0])
def test_draws_never_exceed_n_max_and_decision_mode_answers_at_r(margin):
  nz, clf = noise.Gaussian(0.5), linear_classifier(margin)
  common = dict(num_classes=2, batch_size=16)
  for i in range(2):
    key = jax.random.fold_in(jax.random.key(1), i)
    decision = sequential.certify_sequential(clf, X, nz, 20, 1000, 0.01, key, radius=0.25, **common)
    radius = sequential.certify_sequential(clf, X, nz, 20, 1000, 0.01, key, **common)
    for cert in (decision, radius):
      assert 1 <= cert.n <= 1000 and cert.n in sequential.plan(1000, 0.01).looks and 0 <= cert.count <= cert.n
    assert decision.radius in (0.0, 0.25) and (decision.radius == 0.25) == (decision.prediction == 1)
    if margin == 2.0:  # p_A = 1: settled at the first look
      assert decision.prediction == 1 and decision.n == sequential.plan(1000, 0.01).looks[0]
    if margin == -0.2:  # the selected class is the other one, or abstention is settled quickly
      assert decision.prediction in (0, smoothing.ABSTAIN)


@pytest.mark.parametrize("kwargs,match", [
    (dict(radius=-0.1), "radius=-0.1"), (dict(max_radius=0.0), "max_radius=0.0"),
    (dict(tolerance=-1.0), "tolerance=-1.0"), (dict(radius=0.25, max_radius=1.0), "decision mode"),
    (dict(first_look=0), "first_look=0"), (dict(n_max=0), "n_max=0"), (dict(alpha=1.0), "alpha=1.0"),
])
def test_bad_arguments_are_named(kwargs, match):
  args = dict(n_max=100, alpha=0.01)
  args.update(kwargs)
  n_max, alpha = args.pop("n_max"), args.pop("alpha")
  with pytest.raises(ValueError, match=match):
    sequential.certify_sequential(linear_classifier(0.1), X, noise.Gaussian(0.5), 10, n_max, alpha,
                                 jax.random.key(0), num_classes=2, batch_size=4, **args)
