"""Sequential certification: Cohen et al.'s guarantee, drawing only until the answer is settled.

``certify`` draws the same n for every image, although most images are settled long before: a misclassified
image is known to abstain after a few hundred draws, an image far above a radius after a few hundred more.
``certify_sequential`` looks at the counts on a fixed grid and
stops as soon as more draws (up to ``n_max``) cannot change the answer the user asked for.

Statistics: Clopper-Pearson at each look, with alpha split over a fixed grid of looks (Bonferroni).
  * Looks. Cumulative estimation draws n_1 < n_2 < ... < n_K = n_max, fixed before any draw:
    n_j = ceil(n_max / 2^(K - j)), doubling up to n_max, n_1 the smallest of them that is >= ``first_look``
    (default 100: n_max = 100,000 gives K = 10 looks, 196 ... 50,000, 100,000). Look j adds the draws
    n_{j-1} + 1 .. n_j from their own key (below).
  * Bounds. At look j with count k_j of the selected class c among n_j draws, L_j and U_j are the one-sided
    (1 - alpha_j) Clopper-Pearson lower and upper bounds, alpha_j = alpha / K.
  * Guarantee (proof sketch). The selection draws are independent of the estimation draws, so condition on c
    and let p = P(f(x + u) = c). Think of all n_max estimation draws as made up front (the rounds that the
    procedure never draws are simply never looked at). For each fixed j, k_j ~ Binomial(n_j, p), so
    P(L_j > p) <= alpha_j (Clopper 1934; exact, conservative). By the union bound the event
    E = {L_j <= p for every j} has probability >= 1 - sum_j alpha_j = 1 - alpha, whatever the data do.
    On E, whichever look tau the procedure stops at -- any rule that looks at the data, as here -- has
    L_tau <= p; a certificate is returned only when L_tau > 1/2, so c is g(x)'s class (p > 1/2) and the
    radius computed from L_tau is at most the one from p, which Cohen et al. (Thm. 1; Teng et al. 2020 for
    Laplace, Yang et al. 2020 for uniform) prove g is constant within. So P(certificate wrong) <= alpha, for
    both modes and every stopping rule below. This is the "alpha-spending over a fixed grid" of group
    sequential tests (Jennison & Turnbull 2000, ch. 7) in its crudest, always-valid form; anytime-valid
    confidence sequences (Howard et al. 2021; Waudby-Smith & Ramdas 2023) would allow a look after every
    batch, but on a doubling grid Bonferroni costs little: alpha / 10 moves the bound by about 0.6 binomial
    standard deviations at n_max (z = 3.72 instead of 3.09).
  * The upper bounds U_j only decide when to stop early; the guarantee needs only the lower bounds, so a
    wrong U_j can waste or save draws, never make a certificate wrong.
  * Looking at every look with the plain level alpha (no split) is not valid: the probability that some
    L_j > p grows with the number of looks; tests/test_sequential.py measures it.

Stopping rules (``settle``, one look for many images at once; ``run`` draws look after look):
  * Decision mode (``radius=r``): stop and certify c at r as soon as L_j > 1/2 and radius(L_j) >= r; stop
    and abstain as soon as U_j <= 1/2 or radius(U_j) < r (even p = U_j could not certify r), or at n_max.
    The certificate's radius is r itself: the question asked was "robust at r?".
  * Radius mode: stop at n_max; when radius(L_j) >= ``max_radius`` (nothing larger is reported); when
    U_j <= 1/2 (abstention settled); when the best radius n_max draws could still give,
    best_j = radius(CP_lower at level alpha_K of U_j * n_max hits in n_max), capped at max_radius, exceeds the
    current radius(L_j) by at most ``tolerance`` and the image is certified (L_j > 1/2) or could not be with
    n_max draws (that CP_lower <= 1/2: whether it abstains is never left to the tolerance); or, given the
    reported ``radii``, when no reported radius r
    is still open: the image is certified at r now (L_j > 1/2, radius(L_j) >= r) or could not be with n_max
    draws (best_j < r, or CP_lower(U_j n_max) <= 1/2). The certificate's radius is radius(L_j) at the stop.
  * Defaults. first_look = 100. With ``radii`` (what a certified-accuracy table reports) tolerance = 0: the
    table is, up to the alpha / K loss, the one n_max draws per image would give, and images stop once they
    sit between two reported radii. Measured on the quickstart's digits against fixed n = n_max = 100,000
    (docs/sequential.md): 6-24 % of the draws, the same accuracy within 1 point at every radius (decision mode:
    0.4-5 %, the same accuracy). Without ``radii``, tolerance = 5 % of the largest radius any image can reach
    (all n_max draws hits, level alpha_K: 3.74 sigma for Gaussian noise at n_max = 1e5, alpha = 0.001, so
    0.19 sigma): it bounds how much radius a curve loses per image. An image
    whose every draw hits then stops at n_max / 2 (its radius grows like sigma sqrt(2 ln n): the last
    doubling adds 0.17 sigma), an image with p_A = 0.95 near n_max / 30; ``max_radius`` stops the former
    as soon as it reaches the largest radius you report.

Keys: the first look's draws use ``fold_in(key, ESTIMATION_PHASE)``, exactly ``certify``'s estimation key,
so a single look (``first_look >= n_max``) reproduces ``certify`` draw for draw; look j >= 2 uses
``fold_in(fold_in(key, SEQUENTIAL_PHASE), j)``. Every look runs the same compiled counting program
(``smoothing.sample_counts`` passes the number of draws as a traced argument), so looks never recompile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from scoresmooth_jax import noise as noise_lib
from scoresmooth_jax import smoothing
from scoresmooth_jax.certificate import (ABSTAIN, ESTIMATION_PHASE, SELECTION_PHASE, SEQUENTIAL_PHASE, Certificate,
                                         check_alpha, check_count, clopper_pearson_lower, clopper_pearson_upper)

DEFAULT_FIRST_LOOK = 100
DEFAULT_RELATIVE_TOLERANCE = 0.05


@dataclasses.dataclass(frozen=True)
class Plan:
  """The looks of a sequential certification, fixed before any draw.

  Attributes:
    looks: cumulative estimation draws at each look, strictly increasing; the last is n_max.
    alphas: error probability spent at each look. The certificate is wrong with probability <= sum(alphas).
  """

  looks: tuple[int, ...]
  alphas: tuple[float, ...]

  def __post_init__(self):
    looks = tuple(int(n) for n in self.looks)
    if not looks or looks[0] < 1 or any(b <= a for a, b in zip(looks, looks[1:])):
      raise ValueError(f"looks={self.looks!r} must be a non-empty, strictly increasing tuple of draw counts >= 1.")
    if len(self.alphas) != len(looks) or not all(0.0 < float(a) < 1.0 for a in self.alphas):
      raise ValueError(f"alphas={self.alphas!r} must hold one level in (0, 1) per look ({len(looks)} looks).")
    object.__setattr__(self, "looks", looks)
    object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))

  @property
  def n_max(self) -> int:
    return self.looks[-1]

  @property
  def alpha(self) -> float:
    """The guarantee: P(certificate wrong) <= alpha (the union bound over the looks)."""
    return math.fsum(self.alphas)


def plan(n_max: int, alpha: float, first_look: int = DEFAULT_FIRST_LOOK) -> Plan:
  """Doubling looks up to ``n_max``, the first >= ``first_look``; alpha split evenly (module docstring)."""
  n_max = check_count("n_max", n_max)
  first_look = check_count("first_look", first_look)
  alpha = check_alpha(alpha)
  looks = [n_max]
  while True:
    # Halving from the top keeps n_max itself a look, so the last look is the full budget.
    previous = math.ceil(n_max / 2 ** len(looks))
    if previous < first_look or previous >= looks[-1]:
      break
    looks.append(previous)
  looks.reverse()
  return Plan(tuple(looks), (alpha / len(looks),) * len(looks))


def _radii(nz: noise_lib.Noise, p) -> np.ndarray:
  """``nz.certified_radius`` elementwise (it is a scalar function of the host, in float64)."""
  return np.asarray([nz.certified_radius(float(q)) for q in np.ravel(p)], np.float64).reshape(np.shape(p))


def largest_radius(nz: noise_lib.Noise, the_plan: Plan) -> float:
  """The largest radius any image can be certified at: every one of n_max draws a hit, level alpha_K."""
  return float(_radii(nz, clopper_pearson_lower(the_plan.n_max, the_plan.n_max, the_plan.alphas[-1])))


def default_tolerance(nz: noise_lib.Noise, the_plan: Plan) -> float:
  return DEFAULT_RELATIVE_TOLERANCE * largest_radius(nz, the_plan)


class Outcome(NamedTuple):
  """What the looks settled, per image (arrays from ``settle``, scalars from ``run``).

  Attributes:
    stop: whether the answer is settled at this look (always at the last).
    certified: whether the selected class is certified (decision mode: at the asked radius).
    radius: the certified radius; 0.0 when not certified.
    p_lower: the lower bound at this look, at the look's level.
    count: hits of the selected class so far.
    n: estimation draws so far.
  """

  stop: np.ndarray | bool
  certified: np.ndarray | bool
  radius: np.ndarray | float
  p_lower: np.ndarray | float
  count: np.ndarray | int
  n: int


def settle(counts, look: int, the_plan: Plan, nz: noise_lib.Noise, *, radius: float | None = None,
           max_radius: float | None = None, tolerance: float = 0.0, radii: Sequence[float] | None = None) -> Outcome:
  """The stopping rules at one look, for any number of images at once (see the module docstring).

  Args:
    counts: hits of the selected class among the first ``the_plan.looks[look]`` draws (int array, any shape).
    look: 0-based index of the look.
    the_plan: the looks and the alpha spent at each.
    nz: the noise, for its certified radius.
    radius: decision mode: certify at exactly this radius or abstain. None: radius mode.
    max_radius: radius mode: stop once the radius reaches it (the largest radius you report).
    tolerance: radius mode: stop once more draws up to n_max could add at most this much radius.
    radii: radius mode: the radii you report; stop once more draws could not change at which of them the
      image is certified.
  """
  counts = np.asarray(counts, np.int64)
  n = the_plan.looks[look]
  if np.any((counts < 0) | (counts > n)):
    raise ValueError(f"counts {counts} at look {look} must lie in [0, {n}], the draws made so far.")
  # Everything below depends on the count alone: compute it once per distinct count (simulations of many
  # images have a few hundred), then spread it back.
  values, inverse = np.unique(counts, return_inverse=True)
  out = _settle_distinct(values, look, the_plan, nz, radius, max_radius, tolerance, radii)
  return Outcome(*(np.reshape(field[inverse], counts.shape) for field in out[:4]), counts, n)


def _settle_distinct(counts: np.ndarray, look: int, the_plan: Plan, nz: noise_lib.Noise, radius, max_radius,
                     tolerance, radii) -> Outcome:
  n, alpha_j, last = the_plan.looks[look], the_plan.alphas[look], look == len(the_plan.looks) - 1
  lower = clopper_pearson_lower(counts, n, alpha_j)
  current = _radii(nz, lower)  # 0.0 where lower <= 1/2
  upper = clopper_pearson_upper(counts, n, alpha_j)
  if radius is not None:
    certified = (lower > 0.5) & (current >= radius)
    # Even p = upper could not certify r: more draws would not either (with the lower bounds' probability).
    hopeless = (upper <= 0.5) | (_radii(nz, upper) < radius)
    stop = certified | hopeless | last
    return Outcome(stop, certified, np.where(certified, float(radius), 0.0), lower, counts, n)
  certified = lower > 0.5
  # The best radius n_max draws could still give, if p were as large as the data allow (upper).
  best_lower = clopper_pearson_lower(upper * the_plan.n_max, the_plan.n_max, the_plan.alphas[-1])
  best = _radii(nz, best_lower)
  if max_radius is not None:
    best = np.minimum(best, max_radius)
  # The tolerance is for radii only: an image not yet certified stops by it only once n_max draws could not
  # certify it either, so certified accuracy at r = 0 stays that of n_max draws.
  radius_settled = (best - current <= tolerance) & (certified | (best_lower <= 0.5))
  stop = radius_settled | (upper <= 0.5) | last
  if max_radius is not None:
    stop |= current >= max_radius
  if radii is not None:
    # Certified at a reported radius r means p_lower > 1/2 and radius >= r (r = 0: certified at all).
    r = np.asarray(radii, np.float64)[None, :]
    now = certified[:, None] & (current[:, None] >= r)
    possible = (best_lower[:, None] > 0.5) & (best[:, None] >= r)
    stop |= ~np.any(possible & ~now, axis=1)
  return Outcome(stop, certified, np.where(certified, current, 0.0), lower, counts, n)


def run(hits: Callable[[int, int], int], the_plan: Plan, nz: noise_lib.Noise, **rules) -> Outcome:
  """Draws look after look until ``settle`` stops; returns the stopping look's outcome (as Python scalars).

  Args:
    hits: ``hits(look, num)`` returns how many of ``num`` fresh draws (look ``look``, 0-based) hit the
      selected class. ``certify_sequential`` passes the base classifier's counts.
    the_plan, nz, **rules: as for ``settle`` (``radius``, ``max_radius``, ``tolerance``, ``radii``).
  """
  count = drawn = 0
  for look, n in enumerate(the_plan.looks):
    new = hits(look, n - drawn)
    if isinstance(new, bool) or not isinstance(new, (int, np.integer)) or not 0 <= new <= n - drawn:
      raise ValueError(f"hits(look={look}, num={n - drawn}) returned {new!r}; it must count hits among the draws.")
    count, drawn = count + int(new), n
    out = settle(count, look, the_plan, nz, **rules)
    if out.stop:
      return Outcome(True, bool(out.certified), float(out.radius), float(out.p_lower), count, n)
  raise AssertionError("unreachable: settle always stops at the last look")


def round_key(key: jax.Array, look: int) -> jax.Array:
  """The key of look ``look``'s draws (0-based); look 0 uses ``certify``'s estimation key."""
  if look == 0:
    return jax.random.fold_in(key, ESTIMATION_PHASE)
  return jax.random.fold_in(jax.random.fold_in(key, SEQUENTIAL_PHASE), look)


def _check_radius(name: str, value, allow_zero: bool) -> float | None:
  if value is None:
    return None
  r = float(value)
  if not math.isfinite(r) or r < 0 or (r == 0 and not allow_zero):
    raise ValueError(f"{name}={value!r} must be a finite radius {'>= 0' if allow_zero else '> 0'} in the noise's "
                     "norm (e.g. the noise's sigma), or None.")
  return r


def check_rules(radius=None, max_radius=None, tolerance=None, radii=None, *, prefix: str = ""):
  """Checks ``certify_sequential``'s stopping rules; returns them as floats (radii a tuple), None kept.

  ``prefix`` names where the values came from (``"certify.sequential."`` in a job config).
  """
  radius = _check_radius(f"{prefix}radius", radius, allow_zero=True)
  max_radius = _check_radius(f"{prefix}max_radius", max_radius, allow_zero=False)
  if radius is not None and (max_radius is not None or tolerance is not None or radii is not None):
    raise ValueError(f"{prefix}radius={radius} asks for decision mode, which has no max_radius={max_radius}, "
                     f"tolerance={tolerance} or radii={radii}; set radius alone, or unset it for radius mode.")
  if radii is not None:
    radii = tuple(_check_radius(f"{prefix}radii", r, allow_zero=True) for r in radii)
    if not radii:
      raise ValueError(f"{prefix}radii=() is empty: pass the radii you report (e.g. (0, 0.25, 0.5)), or None.")
  if tolerance is not None:
    if not (math.isfinite(float(tolerance)) and float(tolerance) >= 0):
      raise ValueError(f"{prefix}tolerance={tolerance!r} must be a finite radius >= 0 (0: stop only at n_max, "
                       "max_radius or a settled abstention), or None for the default.")
    tolerance = float(tolerance)
  return radius, max_radius, tolerance, radii


def certify_sequential(base_classifier: smoothing.BaseClassifier, x, nz: noise_lib.Noise, n0: int, n_max: int,
                       alpha: float, key: jax.Array, *, num_classes: int, batch_size: int,
                       radius: float | None = None, max_radius: float | None = None,
                       tolerance: float | None = None, radii: Sequence[float] | None = None,
                       first_look: int = DEFAULT_FIRST_LOOK, mesh: Mesh | None = None) -> Certificate:
  """``smoothing.certify``'s guarantee with as few estimation draws as settle the answer (module docstring).

  Args:
    base_classifier, x, nz, n0, alpha, key, num_classes, batch_size, mesh: as for ``smoothing.certify``.
    n_max: the most estimation draws any image gets (Cohen et al.'s n: 100,000).
    radius: decision mode: is g certified at this radius? Returns the class with radius ``radius``, or ABSTAIN.
    max_radius: radius mode: the largest radius you report; an image certified that far stops. None: no cap.
    tolerance: radius mode: stop once more draws up to n_max could add at most this radius. None: without
      ``radii``, 5 % of the largest radius n_max draws can certify (``default_tolerance``); with ``radii``, 0.
    radii: radius mode: the radii you report (a certified-accuracy table). The image stops as soon as more
      draws could not change at which of them it is certified, so the table is what n_max draws would give.
    first_look: estimation draws at the first look (the first of the doubling looks that is >= it). A value
      >= n_max gives a single look at n_max, which is exactly ``smoothing.certify``.

  Returns:
    A ``Certificate``; ``n`` is the number of estimation draws used, ``p_lower`` the bound at the
    stopping look (level alpha / number of looks).
  """
  n0 = check_count("n0", n0)
  the_plan = plan(n_max, alpha, first_look)
  radius, max_radius, tolerance, radii = check_rules(radius, max_radius, tolerance, radii)
  if tolerance is None:
    tolerance = 0.0 if radii is not None else default_tolerance(nz, the_plan)
  common = dict(num_classes=num_classes, batch_size=batch_size, mesh=mesh)
  n0_counts = smoothing.sample_counts(base_classifier, x, nz, n0,
                                      jax.random.fold_in(key, SELECTION_PHASE), **common)
  selected = int(np.argmax(n0_counts))

  def hits(look: int, num: int) -> int:
    return int(smoothing.sample_counts(base_classifier, x, nz, num, round_key(key, look), **common)[selected])

  out = run(hits, the_plan, nz, radius=radius, max_radius=max_radius, tolerance=float(tolerance), radii=radii)
  prediction = selected if out.certified else ABSTAIN
  return Certificate(prediction, out.radius, out.p_lower, out.count, out.n, n0_counts)
