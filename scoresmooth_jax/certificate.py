"""What a certification returns and the statistics behind it, shared by ``smoothing`` (a fixed number of draws)
and ``sequential`` (draws until the answer is settled).

Promises:
  * ``Certificate`` is the one result type of both; ``ABSTAIN`` (-1) is the class of an abstention.
  * The phase numbers are folded into an image's key, so no two purposes ever share a key.
  * ``clopper_pearson_lower`` / ``clopper_pearson_upper`` are the one-sided exact binomial bounds, vectorised,
    in float64 on the host.
  * ``check_count`` / ``check_alpha`` reject bad arguments with a message naming the value.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats

ABSTAIN = -1

SELECTION_PHASE = 0
ESTIMATION_PHASE = 1
PREDICTION_PHASE = 2
SEQUENTIAL_PHASE = 3  # sequential certification's looks after the first (the first uses ESTIMATION_PHASE)


class Certificate(NamedTuple):
  """The outcome of certifying one image.

  Attributes:
    prediction: the smoothed classifier's class, or ``ABSTAIN`` (-1) when p_lower <= 1/2.
    radius: certified radius in the noise's norm (``noise.norm``); 0.0 on ABSTAIN.
    p_lower: one-sided Clopper-Pearson lower bound on the top class's probability (level 1 - alpha, or the
      stopping look's level for sequential certification).
    count: how many of the ``n`` estimation draws the base classifier gave the selected class.
    n: number of estimation draws.
    n0_counts: int64 class counts of the n0 selection draws (which chose the class).
  """

  prediction: int
  radius: float
  p_lower: float
  count: int
  n: int
  n0_counts: np.ndarray


def check_count(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be an integer >= 1.")
  if value >= 2**31:
    raise ValueError(f"{name}={value!r} is too large: counts are accumulated in int32 on device; "
                     "split the draws into several calls and add the counts.")
  return int(value)


def check_alpha(alpha, name: str = "alpha") -> float:
  value = float(alpha)
  if not 0.0 < value < 1.0:
    raise ValueError(f"{name}={alpha!r} must lie in (0, 1): it is the probability that the certificate is "
                     "wrong (Cohen et al. use 0.001).")
  return value


def _counts(k, n):
  """``k`` and ``n`` as float64 arrays, checked: n >= 1 and 0 <= k <= n (k may be real, see below)."""
  if isinstance(k, bool) or isinstance(n, bool):
    raise ValueError(f"k={k!r}, n={n!r} must be counts, not booleans.")
  k_arr, n_arr = np.asarray(k, np.float64), np.asarray(n, np.float64)
  if not (np.all(np.isfinite(k_arr)) and np.all(n_arr >= 1) and np.all(k_arr >= 0) and np.all(k_arr <= n_arr)):
    raise ValueError(f"k={k!r} must be a count in [0, n] and n={n!r} a count >= 1.")
  return k_arr, n_arr


def _scalar_or_array(value: np.ndarray):
  return float(value) if value.ndim == 0 else value


def clopper_pearson_lower(k, n, alpha: float):
  """One-sided (1 - alpha) lower confidence bound on a binomial proportion, from ``k`` successes in ``n``.

  This is Beta.ppf(alpha; k, n - k + 1), and 0.0 for k = 0; it equals statsmodels'
  ``proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``. Computed in float64, elementwise over
  arrays (a float for scalar arguments). A real-valued ``k`` gives the Beta quantile's continuous extension
  between counts, which ``sequential`` uses to ask what a hypothetical hit rate would certify.
  """
  alpha = check_alpha(alpha)
  k, n = _counts(k, n)
  return _scalar_or_array(np.where(k <= 0, 0.0, stats.beta.ppf(alpha, np.maximum(k, 1e-300), n - k + 1.0)))


def clopper_pearson_upper(k, n, alpha: float):
  """One-sided (1 - alpha) upper confidence bound on a binomial proportion: Beta.ppf(1 - alpha; k + 1, n - k).

  1.0 for k = n. Float64, elementwise over arrays (a float for scalar arguments).
  """
  alpha = check_alpha(alpha)
  k, n = _counts(k, n)
  return _scalar_or_array(np.where(k >= n, 1.0, stats.beta.ppf(1.0 - alpha, k + 1.0, np.maximum(n - k, 1.0))))
