"""Draws per second of a Monte-Carlo counting call, with its compile time, inside a deadline.

``time_draws(count, draws_per_round, target_s, repeats, deadline)`` measures any ``count(num)`` that draws ``num``
noisy samples and returns only when they are counted (``smoothing.sample_counts``, the PyTorch peer's loop):

  1. ``count(draws_per_round)`` twice: the first call compiles (XLA, torch.compile) and runs one round, the second
     is one steady round; compile_s is their difference.
  2. ``repeats`` timed calls of k rounds each, k chosen so that a call takes about ``target_s`` (at least one
     round), and never more than what is left before ``deadline`` (in ``clock``'s seconds, by default
     ``time.monotonic()``, which every timing here uses); draws_per_s is
     the median over those calls. When not even one timed call fits, the steady round's rate is reported and
     ``timed_calls`` is 0.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np


def time_draws(count: Callable[[int], Any], draws_per_round: int, target_s: float, repeats: int,
               deadline: float = math.inf, clock: Callable[[], float] = time.monotonic) -> dict:
  """{"compile_s", "round_s", "rounds_per_call", "timed_calls", "draws_per_s", "spread"} (module docstring)."""
  start = clock()
  count(draws_per_round)
  first = clock() - start
  start = clock()
  count(draws_per_round)
  round_s = max(clock() - start, 1e-9)
  rounds = max(1, math.ceil(target_s / round_s))
  rates = []
  for _ in range(repeats):
    left = deadline - clock()
    if left < 1.5 * round_s * rounds + 1.0:  # would run into the deadline: fewer rounds, or none
      rounds = int((left - 1.0) / (1.5 * round_s))
      if rounds < 1:
        break
    start = clock()
    count(rounds * draws_per_round)
    rates.append(rounds * draws_per_round / (clock() - start))
  if rates:
    median = float(np.median(rates))
    rate, spread = median, float((max(rates) - min(rates)) / median)
  else:
    rate, spread = draws_per_round / round_s, None
  return {"compile_s": max(first - round_s, 0.0), "round_s": round_s, "rounds_per_call": rounds if rates else 1,
          "timed_calls": len(rates), "draws_per_s": rate, "spread": spread}
